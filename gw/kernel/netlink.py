"""Links, addresses, routes and sysctls via pyroute2 (all in the caller's network namespace).

- `ensure_bridge`: the gateway's bridge towards the Oakestra network (`network.bridge_interface`,
  default ``oakgw0``) carrying the internal addresses as /32 and /128 (on a pair, `ha.enabled`,
  keepalived adds and removes them; the daemon leaves them alone). A wider prefix would put a
  connected route for part of the Oakestra range on the bridge and steal it from the tunnel. The
  IPv6 address is added with ``IFA_F_NODAD``: without it, it stays "tentative" (unusable, not
  bindable) for as long as the link has no carrier, which is the normal state of a bridge
  without ports. Idempotent: running it again (a restart) changes nothing and duplicates nothing.
- `remove_bridge`: teardown; `bridge_address`: what the bridge carries (for the CLI).
- `readiness_problems`: why the data path cannot work now (tunnel missing, service ranges not
  routed through it, forwarding off), for ``/api/ready``.
- `public_addresses`: the global addresses of the public interfaces (default: the default
  route's), reported to the cluster at registration.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from contextlib import contextmanager
from pathlib import Path

from ..core.config import Settings
from ..core.errors import GatewayError

log = logging.getLogger(__name__)

AF_INET, AF_INET6 = 2, 10
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
RT_SCOPE_UNIVERSE = 0
FORWARDING = {"ipv4": "/proc/sys/net/ipv4/ip_forward",
              "ipv6": "/proc/sys/net/ipv6/conf/all/forwarding"}


class NetlinkFailed(GatewayError):
    """The kernel refused a link or address change, or the bridge's name is taken by another
    kind of link. The message names the interface."""

    code = "netlink_failed"


@contextmanager
def _iproute():
    from pyroute2 import IPRoute  # imported here: pure modules and unit tests never need it

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _kind(ipr, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _addresses(ipr, index: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, prefixlen, flags) of every global-scope address on the link."""
    out = []
    for msg in ipr.get_addr(index=index):
        if msg["scope"] != RT_SCOPE_UNIVERSE:
            continue  # link-local fe80::/64 and friends are the kernel's, not ours
        flags = msg.get_attr("IFA_FLAGS")
        flags = msg["flags"] if flags is None else flags
        out.append((ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")), msg["prefixlen"], flags))
    return out


def ensure_bridge(settings: Settings) -> None:
    """Make `network.bridge_interface` exist, be up and carry exactly the internal IPv4 as /32
    and the internal IPv6 as /128 (NODAD) as its global addresses. Any other global address on
    it (a previous internal IP, a wrong prefix) is removed: the bridge is ours alone. With
    `ha.enabled` the floating addresses are keepalived's: neither added nor removed here."""
    net = settings.network
    settings.require_internal_ips()
    name = net.bridge_interface
    wanted = {(net.internal_ipv4, 32), (net.internal_ipv6, 128)}
    # On a pair the internal addresses float: keepalived adds them on the master and removes
    # them on the backup. Ours would make a backup answer for the master's address.
    floating = set(settings.ha.floating) if settings.ha.enabled else set()
    try:
        with _iproute() as ipr:
            index = _index(ipr, name)
            if index is None:
                ipr.link("add", ifname=name, kind="bridge")
                index = _index(ipr, name)
                log.info("created bridge %s", name)
            elif _kind(ipr, index) != "bridge":
                raise NetlinkFailed(f"{name} exists and is not a bridge (kind "
                                    f"{_kind(ipr, index) or 'unknown'}); set "
                                    "network.bridge_interface to a free name")
            ipr.link("set", index=index, state="up")
            present = _addresses(ipr, index)
            for ip, prefix, flags in present:
                if ip in floating:
                    continue
                stale = (ip, prefix) not in wanted
                # An IPv6 address added without NODAD (by hand, by an older version) may be
                # stuck tentative or have failed DAD: replace it.
                bad = ip.version == 6 and not stale and (
                    not flags & IFA_F_NODAD or flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED))
                if stale or bad:
                    ipr.addr("del", index=index, address=str(ip), prefixlen=prefix)
                    log.info("removed %s/%d from %s", ip, prefix, name)
            keep = {(ip, prefix) for ip, prefix, flags in _addresses(ipr, index)}
            add = {(ip, prefix) for ip, prefix in wanted - keep if ip not in floating}
            for ip, prefix in sorted(add, key=lambda w: w[0].version):
                kw = {"flags": IFA_F_NODAD} if ip.version == 6 else {}
                try:
                    ipr.addr("add", index=index, address=str(ip), prefixlen=prefix, **kw)
                except Exception as exc:  # NetlinkError
                    if getattr(exc, "code", None) != errno.EEXIST:
                        raise
                log.info("added %s/%d to %s", ip, prefix, name)
    except NetlinkFailed:
        raise
    except Exception as exc:  # NetlinkError, OSError
        raise NetlinkFailed(f"could not set up bridge {name} with {net.internal_ipv4}/32 and "
                            f"{net.internal_ipv6}/128: {_reason(exc)}") from None


def remove_bridge(settings: Settings) -> bool:
    """Delete the bridge (teardown). Returns whether it existed. A link of that name that is
    not a bridge is left alone."""
    name = settings.network.bridge_interface
    try:
        with _iproute() as ipr:
            index = _index(ipr, name)
            if index is None:
                return False
            if _kind(ipr, index) != "bridge":
                log.warning("%s is not a bridge; not removing it", name)
                return False
            ipr.link("del", index=index)
            return True
    except Exception as exc:
        raise NetlinkFailed(f"could not remove bridge {name}: {_reason(exc)}") from None


def bridge_address(ifname: str, version: int) -> str | None:
    """The first global address of IP `version` on bridge `ifname`; None when there is none,
    no such link, or it cannot be read. For the CLI, which finds the daemon's API on the
    internal address the daemon put there."""
    try:
        with _iproute() as ipr:
            index = _index(ipr, ifname)
            if index is None:
                return None
            return next((str(ip) for ip, _, _ in _addresses(ipr, index)
                         if ip.version == version), None)
    except Exception:  # noqa: BLE001 - NetlinkError, OSError: the caller falls back
        return None


# -- readiness ---------------------------------------------------------------------------------

def _probe_address(network, avoid) -> str:
    """An address inside `network` to ask the kernel's route lookup about: the first host that
    is not one of our own addresses (those are local, whatever routes the range)."""
    base = network.network_address
    for offset in (1, 2, 3):
        if network.num_addresses <= offset:
            break
        ip = base + offset
        if ip not in avoid:
            return str(ip)
    return str(base)


def readiness_problems(settings: Settings) -> dict[str, str]:
    """Why the data path cannot work now, by cause; empty when it can. Cheap: a few netlink
    requests and two procfs reads, no listing of anything large."""
    net = settings.network
    tunnel = net.tunnel_interface
    problems: dict[str, str] = {}
    avoid = {net.internal_ipv4, net.internal_ipv6}
    try:
        with _iproute() as ipr:
            tun_index = _index(ipr, tunnel)
            if tun_index is None:
                problems["tunnel"] = f"the tunnel interface {tunnel} does not exist"
            else:
                link = ipr.get_links(tun_index)[0]
                if not link["flags"] & 1:  # IFF_UP
                    problems["tunnel"] = f"the tunnel interface {tunnel} is down"
            for rng in net.service_ranges:
                probe = _probe_address(rng, avoid)
                try:
                    routes = ipr.route("get", dst=probe)
                    oif = routes[0].get_attr("RTA_OIF") if routes else None
                except Exception as exc:
                    problems[f"route {rng}"] = (f"no route to {rng} (looked up {probe}: "
                                                f"{_reason(exc)}); it must go through {tunnel}")
                    continue
                if tun_index is None or oif != tun_index:
                    via = _name_of(ipr, oif) if oif else "nowhere"
                    problems[f"route {rng}"] = (f"{rng} is routed through {via}, not through "
                                                f"{tunnel} (looked up {probe})")
    except Exception as exc:
        problems["netlink"] = f"cannot read links and routes: {_reason(exc)}"
    families = {r.version for r in net.service_ranges}
    for family, path in FORWARDING.items():
        if int(family[-1]) not in families:
            continue
        try:
            on = Path(path).read_text().strip() == "1"
        except OSError as exc:
            problems[f"forwarding_{family}"] = f"cannot read {path}: {exc.strerror}"
            continue
        if not on:
            problems[f"forwarding_{family}"] = f"{family} forwarding is off ({path} is 0)"
    return problems


def _name_of(ipr, index: int) -> str:
    try:
        return ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
    except Exception:
        return f"interface #{index}"


# -- public addresses --------------------------------------------------------------------------

def default_interfaces() -> list[str]:
    """The interfaces of the default routes (IPv4 first), without duplicates."""
    names: list[str] = []
    with _iproute() as ipr:
        for family in (AF_INET, AF_INET6):
            for route in ipr.get_default_routes(family=family):
                oif = route.get_attr("RTA_OIF")
                if oif is None:
                    multipath = route.get_attr("RTA_MULTIPATH") or []
                    oif = multipath[0]["oif"] if multipath else None
                if oif is not None:
                    name = _name_of(ipr, oif)
                    if name not in names:
                        names.append(name)
    return names


def egress_interfaces(settings: Settings) -> list[str]:
    """The public interfaces as egress matches them: the configured ones, else the default
    route's as they are now."""
    from ..core import ruleset  # noqa: PLC0415 - ruleset imports config only; keep netlink light

    defaults = () if settings.network.public_interfaces else default_interfaces()
    return ruleset.public_interfaces(settings, defaults)


def public_addresses(settings: Settings) -> dict[str, str]:
    """The first global-scope, usable address of each family on the public interfaces
    (`network.public_interfaces`, else the default route's). Keys ``ipv4``/``ipv6``; a family
    without an address is missing."""
    names = list(settings.network.public_interfaces) or default_interfaces()
    found: dict[str, str] = {}
    with _iproute() as ipr:
        for name in names:
            index = _index(ipr, name)
            if index is None:
                log.warning("public interface %s does not exist", name)
                continue
            for ip, _prefix, flags in _addresses(ipr, index):
                family = "ipv4" if ip.version == 4 else "ipv6"
                if family in found or ip.is_link_local or flags & IFA_F_TENTATIVE:
                    continue
                found[family] = str(ip)
    return found


def _reason(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    if len(args) == 2 and isinstance(args[0], int):  # NetlinkError(code, text)
        return f"{args[1]} (errno {args[0]})"
    return str(exc) or type(exc).__name__
