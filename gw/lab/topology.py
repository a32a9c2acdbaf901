"""A lab of network namespaces in which the gateway does its job with real packets: used by
`oakestra-gw demo` and by the end-to-end tests.

::

    client ns                      gateway ns                                 worker ns
    eth0 198.18.0.2/24  ------  pub0 198.18.0.1/24               goProxyTun ------ wtun
         2001:db8::2/64              2001:db8::1/64              MTU 1450      MTU 1500
    routes: 10.30.0.0/16,        routes: 10.30.0.0/16, fdff::/16  fe80::1         fe80::2
            fdff::/16 via the             10.19.0.0/16, fc00::/16                 10.30.0.1/32
            gateway                       dev goProxyTun                          fdff:2000::1/128
                                  default via the client ("Internet")     a container:
                                  forwarding on (this namespace only)     10.19.0.2, fc00::2
                                                                          default via fe80::1
                                  oakgw0 (the daemon's bridge):
                                     internal 10.30.255.1/32, fdff:ffff::1/128

- ``goProxyTun`` stands in for NetManager's TUN: a veth whose gateway end has the tunnel's MTU
  (1450). Its worker end keeps 1500 (and sends one segment per packet), as a container behind
  a real tunnel does: without the gateway's MSS clamp, the service's full-size segments would
  be dropped silently on their way into the gateway and large downloads would stall.
- The worker's default route goes back through the tunnel (IPv4 over an IPv6 link-local next
  hop), so the service IPs *would* answer anyone the gateway forwards: what the client cannot
  reach, it cannot reach because of the gateway's firewall, not for lack of a route.
- The client routes the Oakestra ranges (service IPs, the gateway's internal IPs) through the
  gateway, so "unreachable" checks are meaningful. It does not route the container networks,
  as the Internet does not: a container's connection out is answered only when the gateway
  NATs it to its public address (egress).

Nothing outside the namespaces is touched: each namespace has its own links, routes, sysctls,
nftables and conntrack table. `Lab` removes everything it created (processes, namespaces, its
state directory) on exit, on failure and on Ctrl-C; ``python -m gw.lab remove TAG`` removes a
lab that was kept (``--keep``).
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .daemon import API_PORT, GatewayDaemon
from .netns import LabError, Netns, run, stop_process

PREFIX = "oakgw"
ROLES = ("client", "gateway", "worker")
LAB_ROOT = Path(os.environ.get("OAKGW_LAB_DIR", "/run/oakestra-gw-lab"))

# Public side (the "Internet"): 198.18.0.0/15 and 2001:db8::/32 (benchmarking/documentation).
CLIENT_V4, GATEWAY_V4 = "198.18.0.2", "198.18.0.1"
CLIENT_V6, GATEWAY_V6 = "2001:db8::2", "2001:db8::1"
# Oakestra side: service IPs in 10.30.0.0/16 and fdff::/16.
SERVICE_V4, SERVICE_V6 = "10.30.0.1", "fdff:2000::1"
INTERNAL_V4, INTERNAL_V6 = "10.30.255.1", "fdff:ffff::1"
SERVICE_RANGES = ("10.30.0.0/16", "fdff::/16")
# A container's own addresses in the worker (Oakestra's container networks, 10.16.0.0/12 and
# fc00::/7): what egress sends from. The gateway routes their subnets into the tunnel; the
# subnets are narrower than the container networks so that they never cover the service IPs.
CONTAINER_V4, CONTAINER_V6 = "10.19.0.2", "fc00::2"
CONTAINER_SUBNETS = ("10.19.0.0/16", "fc00::/16")
TUNNEL_MTU = 1450
HTTP_PORT, UDP_PORT, ECHO_PORT = 80, 53, 7
LAB_TOKEN = "lab-token-0123456789abcdef"

_counter = itertools.count()


class Lab:
    """Three namespaces wired as in the module docstring. Use as a context manager."""

    def __init__(self, tag: str | None = None, *, internal_v4: str = INTERNAL_V4,
                 internal_v6: str = INTERNAL_V6, keep: bool = False):
        self.tag = tag or f"{os.getpid()}x{next(_counter)}"
        self.ns = {role: f"{PREFIX}-{self.tag}-{role}" for role in ROLES}
        self.netns = {role: Netns(name) for role, name in self.ns.items()}
        self.internal_v4, self.internal_v6 = internal_v4, internal_v6
        self.dir = LAB_ROOT / self.tag
        self.keep = keep
        self._procs: list[subprocess.Popen] = []
        self.daemon: GatewayDaemon | None = None

    # -- build and remove ---------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self.build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if not self.keep:
            self.remove()

    def build(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "lab.json").write_text(json.dumps({"tag": self.tag, "ns": self.ns}))
        for role in ROLES:
            Netns.create(name=self.ns[role])
        c, g, w = (self.ns[r] for r in ROLES)
        # client <-> gateway: the public side.
        run(["ip", "link", "add", "eth0", "netns", c, "type", "veth", "peer", "name", "pub0",
             "netns", g])
        # addrgenmode none: no kernel-made link-local addresses appearing later (after DAD),
        # so a namespace's addresses are exactly the ones listed here.
        self.ip("client", "link set eth0 addrgenmode none", "addr add 198.18.0.2/24 dev eth0",
                "addr add 2001:db8::2/64 dev eth0 nodad", "link set eth0 up",
                f"route add {SERVICE_RANGES[0]} via {GATEWAY_V4}",
                f"route add {SERVICE_RANGES[1]} via {GATEWAY_V6}")
        self.sysctl("gateway", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        self.ip("gateway", "link set pub0 addrgenmode none",
                "addr add 198.18.0.1/24 dev pub0",
                "addr add 2001:db8::1/64 dev pub0 nodad", "link set pub0 up",
                f"route add default via {CLIENT_V4}", f"route add default via {CLIENT_V6}")
        self.add_tunnel(wait=False)
        for role, names in (("client", ["eth0"]), ("gateway", ["pub0", "goProxyTun"]),
                            ("worker", ["wtun"])):
            self.netns[role].wait_links_up(names)

    def add_tunnel(self, wait: bool = True) -> None:
        """gateway <-> worker: the tunnel stand-in, with the routes NetManager gives it."""
        run(["ip", "link", "add", "goProxyTun", "netns", self.ns["gateway"], "type", "veth",
             "peer", "name", "wtun", "netns", self.ns["worker"]])
        self.ip("gateway", "link set goProxyTun addrgenmode none",
                f"link set goProxyTun mtu {TUNNEL_MTU}",
                "addr add fe80::1/64 dev goProxyTun nodad", "link set goProxyTun up",
                f"route add {SERVICE_RANGES[0]} dev goProxyTun",
                f"route add {SERVICE_RANGES[1]} dev goProxyTun",
                f"route add {CONTAINER_SUBNETS[0]} dev goProxyTun",
                f"route add {CONTAINER_SUBNETS[1]} dev goProxyTun")
        # One segment per packet from the worker, as on a real link: a veth would otherwise pass
        # a 64 KB GSO packet whole and the gateway would cut it for pub0, hiding MTU problems.
        self.ip("worker", "link set wtun gso_max_segs 1", "link set wtun addrgenmode none",
                "addr add fe80::2/64 dev wtun nodad",
                f"addr add {SERVICE_V4}/32 dev wtun", f"addr add {SERVICE_V6}/128 dev wtun nodad",
                f"addr add {CONTAINER_V4}/32 dev wtun",
                f"addr add {CONTAINER_V6}/128 dev wtun nodad",
                "link set wtun up",
                "route add 0.0.0.0/0 via inet6 fe80::1 dev wtun",
                "route add ::/0 via fe80::1 dev wtun")
        if wait:
            self.netns["gateway"].wait_links_up(["goProxyTun"])
            self.netns["worker"].wait_links_up(["wtun"])

    def delete_tunnel(self) -> None:
        """What a NetManager restart does: the TUN goes, and its routes with it (the worker's
        end of the veth goes too; its services keep listening on the wildcard address)."""
        self.ip("gateway", "link del goProxyTun")

    def remove(self) -> list[str]:
        """Stop every process we started, delete our namespaces (and whatever still runs in
        them) and our state directory. Returns what could not be removed."""
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        left = [ns.name for ns in self.netns.values() if not ns.delete()]
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            LAB_ROOT.rmdir()  # only when no other lab uses it
        except OSError:
            pass
        return left

    # -- running things in the namespaces -----------------------------------------------------

    def argv(self, role: str, *cmd: str) -> list[str]:
        return self.netns[role].argv(*cmd)

    def run(self, role: str, *cmd: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        return self.netns[role].run(*cmd, check=check, timeout=timeout, input=input)

    def ip(self, role: str, *commands: str) -> None:
        """Several `ip` commands in one process (`ip -batch`)."""
        self.netns[role].ip(*commands)

    def sysctl(self, role: str, *settings: str) -> None:
        self.netns[role].sysctl(*settings)

    def popen(self, role: str, *cmd: str, **kw) -> subprocess.Popen:
        """A process in `role`'s namespace, stopped when the lab is removed."""
        # A session of its own: Ctrl-C reaches only the caller, which stops it in order.
        kw.setdefault("start_new_session", True)
        proc = self.netns[role].popen(*cmd, **kw)
        self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        if proc in self._procs:
            self._procs.remove(proc)

    @contextmanager
    def inside(self, role: str) -> Iterator[None]:
        with self.netns[role].inside():
            yield

    def socket(self, role: str, family: int, kind: int) -> socket.socket:
        """A socket that lives in the namespace of `role`."""
        return self.netns[role].socket(family, kind)

    # -- what runs in it ----------------------------------------------------------------------

    def start_services(self, role: str = "worker") -> subprocess.Popen:
        """HTTP on 80 (dual stack), UDP echo on 53, TCP echo on 7, in the worker namespace (or
        in the client's: a server on the Internet for egress). Returns when all listen."""
        proc = self.popen(role, sys.executable, "-m", "gw.lab", "serve", role,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "listening":
            stop_process(proc)
            raise LabError(f"the {role}'s services did not start (said {line!r})")
        return proc


def lab_daemon(lab: Lab, state: Path | None = None, *, overrides: dict | None = None,
               standalone: bool = True, token: bool = True) -> GatewayDaemon:
    """The gateway daemon of `lab`'s gateway namespace (not started), its state in `state`
    (the lab's directory by default). `standalone` gives it the lab's internal addresses;
    without, the cluster hands them out."""
    config: dict = {"api": {"port": API_PORT},
                    "store": {"path": str(Path(state or lab.dir / "gateway") / "exposures.json")},
                    "network": {"public_interfaces": ["pub0"]}}
    if standalone:
        config["network"].update(internal_ipv4=lab.internal_v4, internal_ipv6=lab.internal_v6)
    for section, table in (overrides or {}).items():
        config.setdefault(section, {}).update(table)
    return GatewayDaemon(lab.netns["gateway"], Path(state or lab.dir / "gateway"), config,
                         token=LAB_TOKEN if token else None, api_host=lab.internal_v4)


def remove_tag(tag: str) -> list[str]:
    """Remove a lab by its tag, from outside the process that built it."""
    return Lab(tag).remove()


def list_labs() -> list[str]:
    names = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    tags = []
    for line in names:
        name = line.split(" ")[0]
        if name.startswith(PREFIX + "-") and name.endswith("-gateway"):
            tags.append(name[len(PREFIX) + 1:-len("-gateway")])
    return sorted(tags)
