"""Our table's codec. Pure: the transactions the firewall sends, written as nft text, and
nft's JSON listings, read as exposures and chains (see docs/architecture.md; the firewall
reads the kernel's maps over netlink instead, decoded by gw/core/elements.py).

A transaction is a tuple of the ops below: the libnftables session renders it with `script`,
the fake (gw/kernel/fake.py) applies it structurally. Only typed, validated values reach this
module (ints, ``ipaddress`` objects, protocol words, interface names checked against a strict
pattern), so no user string becomes nft syntax.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Union

from .config import Settings
from .exposure import Exposure, Key

FAMILY, TABLE_NAME = "inet", "oakestra_gw"
TABLE = f"{FAMILY} {TABLE_NAME}"
MAPS = {"ipv4": "expose_v4", "ipv6": "expose_v6"}
LOOPBACK = {"ipv4": ipaddress.ip_network("127.0.0.0/8"), "ipv6": ipaddress.ip_network("::1/128")}
# The unspecified address is never a packet's destination: it keeps a set of service ranges
# valid nft (an anonymous set cannot be empty) for a family that has none.
NOWHERE = {"ipv4": ipaddress.ip_network("0.0.0.0/32"), "ipv6": ipaddress.ip_network("::/128")}


# Waitress's connection limit, and how many of its slots remote sources may take together:
# the rest stays free for the gateway's own connections (the watchdog's health probe). The
# skeleton's input chain holds API_REMOTE_CAP as a literal (nft takes no variable there).
API_CONNECTION_LIMIT = 1000
API_REMOTE_CAP = 900


def skeleton_path() -> Path:
    return Path(str(resources.files("gw") / "rules" / "gateway.nft"))


# A deny-port placeholder for an empty egress.deny_ports (an anonymous set cannot be empty):
# TCP port 0 is no connection's destination.
NO_PORT = "tcp . 0"


def skeleton_vars(settings: Settings, default_interfaces: Iterable[str] = ()) -> dict[str, str]:
    """The values `rules/gateway.nft` refers to as ``$name``, rendered as nft expressions.
    `default_interfaces`: the default route's interfaces, the public ones when
    network.public_interfaces is empty (the caller reads them from the kernel)."""
    settings.require_internal_ips()
    return {**_base_vars(settings), **egress_vars(settings, default_interfaces)}


def public_interfaces(settings: Settings, default_interfaces: Iterable[str] = ()) -> list[str]:
    """The interfaces egress leaves by: the configured ones, else the default route's."""
    return list(settings.network.public_interfaces or dict.fromkeys(default_interfaces))


def egress_status(settings: Settings, default_interfaces: Iterable[str] = ()) -> dict:
    """Whether egress NATs anything, and out of which interfaces (/api/ready)."""
    public = public_interfaces(settings, default_interfaces)
    on = settings.egress_enabled and bool(public)
    return {"enabled": on, "interfaces": public if on else []}


def egress_pins(settings: Settings, default_interfaces: Iterable[str] = ()) -> dict:
    """The address egress leaves with, by family, when it is not the interface's own: on a
    pair (ha.enabled), the first floating public address of each family, on
    ha.public_interface. Masquerading there would pick the node's own address; a flow bound
    to it could not move to the other node (its answers come back to the dead one)."""
    ha = settings.ha
    if not ha.enabled or ha.public_interface not in public_interfaces(settings,
                                                                      default_interfaces):
        return {}
    pins = {}
    for interface in ha.public_addresses:
        pins.setdefault("ipv4" if interface.version == 4 else "ipv6", interface.ip)
    return pins


def egress_vars(settings: Settings, default_interfaces: Iterable[str] = ()) -> dict[str, str]:
    """Egress off, or no public interface to leave by: sources that no packet has, so the NAT
    and the policy match nothing (the chains keep one shape either way). The same for the
    pinned source address (`egress_pins`) of a family that has none."""
    eg = settings.egress
    public = public_interfaces(settings, default_interfaces)
    sources = eg.sources if egress_status(settings, default_interfaces)["enabled"] else ()
    pins = egress_pins(settings, default_interfaces)
    ports = sorted(set(eg.deny_ports))
    return {
        # lo is never a forwarded packet's way out: a valid set when none is known.
        "public_if": "{ " + ", ".join(f'"{name}"' for name in public or ["lo"]) + " }",
        "egress_src_v4": _set(sources, "ipv4", NOWHERE["ipv4"]),
        "egress_src_v6": _set(sources, "ipv6", NOWHERE["ipv6"]),
        "egress_pin_if": f'"{settings.ha.public_interface}"' if pins else '"lo"',
        **{f"egress_pin_src_{v}": _set(sources if family in pins else (), family,
                                       NOWHERE[family])
           for family, v in (("ipv4", "v4"), ("ipv6", "v6"))},
        **{f"egress_pin_{v}": str(pins.get(family, NOWHERE[family].network_address))
           for family, v in (("ipv4", "v4"), ("ipv6", "v6"))},
        "egress_deny_v4": _set(eg.deny_destinations, "ipv4", NOWHERE["ipv4"]),
        "egress_deny_v6": _set(eg.deny_destinations, "ipv6", NOWHERE["ipv6"]),
        "egress_deny_ports": "{ " + ", ".join([f"{proto} . {port}" for port, proto in ports]
                                              or [NO_PORT]) + " }",
        "egress_cap": str(eg.max_connections_per_source),
    }


def _base_vars(settings: Settings) -> dict[str, str]:
    net, api = settings.network, settings.api
    return {
        "tunnel_if": f'"{net.tunnel_interface}"',
        "bridge_if": f'"{net.bridge_interface}"',
        "internal_ipv4": str(net.internal_ipv4),
        "internal_ipv6": str(net.internal_ipv6),
        "api_port": str(api.port),
        "api_allow_v4": _set(api.allowed_sources, "ipv4", LOOPBACK["ipv4"]),
        "api_allow_v6": _set(api.allowed_sources, "ipv6", LOOPBACK["ipv6"]),
        "service_v4": _set(net.service_ranges, "ipv4", NOWHERE["ipv4"]),
        "service_v6": _set(net.service_ranges, "ipv6", NOWHERE["ipv6"]),
    }


def _set(networks, family: str, always) -> str:
    version = 4 if family == "ipv4" else 6
    nets = [n for n in networks if n.version == version] + [always]
    # Overlapping intervals are an error in an nft set: merge them first.
    return "{ " + ", ".join(str(n) for n in ipaddress.collapse_addresses(nets)) + " }"


def element(e: Exposure) -> str:
    return f"{e.protocol} . {e.exposed_port} : {e.service_ip} . {e.service_port}"


def _by_family(exposures: Iterable[Exposure]) -> dict[str, list[Exposure]]:
    groups: dict[str, list[Exposure]] = {"ipv4": [], "ipv6": []}
    for e in exposures:
        groups[e.family].append(e)
    return groups


# -- transactions: what the firewall sends -------------------------------------------------

@dataclass(frozen=True)
class AddElements:
    """Elements of one family's map. The kernel refuses a key it holds with another target."""

    family: str
    exposures: tuple[Exposure, ...]


@dataclass(frozen=True)
class DeleteElements:
    """Keys of one family's map. The kernel refuses a key it does not hold."""

    family: str
    keys: tuple[Key, ...]


@dataclass(frozen=True)
class ReplaceTable:
    """Our table made anew from the skeleton with these values, without elements; it need
    not exist before."""

    variables: dict[str, str] = field(hash=False)
    skeleton: Path


@dataclass(frozen=True)
class DeleteTable:
    """Our table gone; never refused, whether or not it exists."""


Op = Union[AddElements, DeleteElements, ReplaceTable, DeleteTable]
Transaction = tuple  # of Op, applied all or nothing


def adds(exposures: Iterable[Exposure]) -> list[AddElements]:
    return [AddElements(fam, tuple(group)) for fam, group in _by_family(exposures).items()
            if group]


def deletes(exposures: Iterable[Exposure]) -> list[DeleteElements]:
    return [DeleteElements(fam, tuple(e.key for e in group))
            for fam, group in _by_family(exposures).items() if group]


def change_tx(add: Iterable[Exposure] = (), remove: Iterable[Exposure] = (),
              present: Iterable[Key] | None = None) -> Transaction:
    """One transaction that makes the maps hold `add` and not hold `remove`. `present` is the
    set of keys the kernel holds among them; None means it holds exactly what the store says
    (the removed keys, not the added ones). In a map, `add element` of an existing key with
    another value fails with EEXIST and `delete element` of a missing key with ENOENT, so what
    is present is deleted first."""
    add, remove = list(add), list(remove)
    if present is None:
        stale = remove
    else:
        present = set(present)
        stale = [e for e in add + remove if e.key in present]
    return (*deletes(stale), *adds(add))


def load_tx(variables: dict[str, str], exposures: Iterable[Exposure],
            skeleton: Path | None = None) -> Transaction:
    """Replace our table in one transaction: skeleton plus every element."""
    return (ReplaceTable(dict(variables), skeleton or skeleton_path()), *adds(exposures))


def script(tx: Transaction) -> str:
    """The nft text of a transaction, one command a line."""
    return "\n".join(line for op in tx for line in _lines(op))


def _lines(op: Op) -> list[str]:
    if isinstance(op, AddElements):
        return [f"add element {TABLE} {MAPS[op.family]} "
                f"{{ {', '.join(element(e) for e in op.exposures)} }}"]
    if isinstance(op, DeleteElements):
        return [f"delete element {TABLE} {MAPS[op.family]} "
                f"{{ {', '.join(f'{proto} . {port}' for _, proto, port in op.keys)} }}"]
    if isinstance(op, ReplaceTable):
        # Creating the table first makes the delete succeed when it does not exist; other
        # tables are never named.
        return [*defines(op.variables), f"table {TABLE}", f"delete table {TABLE}",
                f'include "{op.skeleton}"', *cap_rules(op.variables)]
    if isinstance(op, DeleteTable):
        return [f"table {TABLE}", f"delete table {TABLE}"]
    raise TypeError(f"not an nft op: {op!r}")


def add_elements(exposures: Iterable[Exposure]) -> list[str]:
    return [script((op,)) for op in adds(exposures)]


def cap_rules(variables: dict[str, str]) -> list[str]:
    """Chain egress_cap's rules: `ct count over` takes a number, not a variable."""
    cap = int(variables["egress_cap"])
    return [f"add rule {TABLE} egress_cap add @egress_conns_{v} {{ {ip} saddr ct count over "
            f"{cap} }} counter name egress_drop_cap drop" for v, ip in (("v4", "ip"), ("v6", "ip6"))]


def defines(variables: dict[str, str]) -> list[str]:
    # libnftables applies add_var() values only to cmd_from_file(), not to a buffer: a buffer
    # that defines them and includes the skeleton loads table and elements in one transaction.
    return [f"redefine {name} = {value}" for name, value in variables.items()]



def render(settings: Settings, exposures: Iterable[Exposure] = (),
           skeleton: Path | None = None, default_interfaces: Iterable[str] = ()) -> str:
    """The whole ruleset as the gateway would load it, as one nft script (for `rules show`)."""
    skeleton = skeleton or skeleton_path()
    body = skeleton.read_text().split("\n", 1)[1]  # drop the shebang; defines go first
    variables = skeleton_vars(settings, default_interfaces)
    return "\n".join(["#!/usr/sbin/nft -f", *defines(variables), "", f"table {TABLE}",
                      f"delete table {TABLE}", body.rstrip("\n"), *cap_rules(variables),
                      *add_elements(exposures), ""])


# -- listings: what the kernel gives back (`nft -j list ...`) ------------------------------

Target = tuple  # (service_ip, service_port) as an ipaddress object and an int


@dataclass
class Listing:
    """What our table holds: read over netlink by the firewall (gw/kernel/nfnl.py), or from
    `nft -j list table` by `parse_listing` (the tests' oracle, teardown)."""

    elements: dict[Key, Target]
    chains: dict[str, list]  # chain name -> its rules, without handles, equal for equal loads
    unreadable: bool = False


# Without a protocols database (/etc/protocols: Debian's netbase, absent on a minimal system)
# libnftables lists a map key's protocol as its number.
PROTOCOL_NUMBERS = {"6": "tcp", "17": "udp"}


def element_json(e: Exposure) -> list:
    """A map element as `nft -j` lists it: the shape `parse_listing` reads."""
    return [{"concat": [e.protocol, e.exposed_port]},
            {"concat": [str(e.service_ip), e.service_port]}]


def parse_listing(listing: dict) -> Listing | None:
    """Our maps' elements and chains' rules from `nft -j list table` output; None when the
    table is gone. Elements in a shape we never write (a comment, a timeout: someone else's)
    cannot be read as exposures: they mark the listing unreadable."""
    elements: dict[Key, Target] = {}
    chains: dict[str, list] = {}
    seen_map, unreadable = False, False
    for item in listing.get("nftables", []):
        if "rule" in item:
            rule = {k: v for k, v in item["rule"].items() if k != "handle"}
            chains.setdefault(rule.get("chain"), []).append(rule)
        elif "chain" in item:
            chains.setdefault(item["chain"]["name"], [])
        m = item.get("map")
        if not m or m.get("name") not in MAPS.values():
            continue
        seen_map = True
        family = "ipv4" if m["name"] == MAPS["ipv4"] else "ipv6"
        for pair in m.get("elem", []):
            try:
                (proto, port), (ip, service_port) = pair[0]["concat"], pair[1]["concat"]
                target = (ipaddress.ip_address(ip), int(service_port))
            except (KeyError, TypeError, ValueError, IndexError):
                unreadable = True
                continue
            elements[(family, PROTOCOL_NUMBERS.get(str(proto), proto), int(port))] = target
    return Listing(elements, chains, unreadable) if seen_map else None


def parse_counters(listing: dict) -> dict[str, int]:
    """Packets by counter name from `nft -j list counters table ...`."""
    return {item["counter"]["name"]: int(item["counter"].get("packets", 0))
            for item in listing.get("nftables", []) if "counter" in item}
