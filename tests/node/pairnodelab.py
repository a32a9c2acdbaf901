"""A gateway pair of real nodes for tests: two gateways (gwa, gwb) and an etcd witness, each a
Debian 12 container booted from nodelab's cached root file system, wired like the HA lab
(tests/ha/pairlab.py). The segments with more than two ends are bridges in a hub namespace of
their own; the sync link is a veth between the gateways.

::

    client ns 198.18.0.2/24, 2001:db8::2/64          worker ns 10.30.0.1/16, fdff:2000::1/16
        |                                                 |   (HTTP 80, echo 7000)
    brpub (hub) ---------------+                      brint (hub) ------+
        | pa                   | pb                       | ia           | ib
      eth0 198.18.0.11      eth0 198.18.0.12      goProxyTun 10.30.254.1 / .2 (MTU 1450)
       gwa ------------ sync0 198.19.77.1/.2 ------------ gwb
      etcd0 198.19.200.1    etcd0 198.19.200.2       witness etcd0 198.19.200.3
        | ea                   | eb                       | ex
    bretcd (hub) --------------+--------------------------+

Floating (on the master only, keepalived's): 198.18.0.10/24 and 2001:db8::10/64 on eth0, the
internal (SNAT) addresses 10.30.255.254/32 and fdff::fe/128 on goProxyTun, where the worker
finds them by ARP / NDP. The gateways' API listens on the floating internal IPv4 (and loopback).

A node's death (`power_loss`): its container is killed at once and its ports in the hub go
down, as a node that lost power would be seen by the others (no carrier, nothing sent).
"""

from __future__ import annotations

import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

from gw.lab.netns import Netns, veth

from .nodelab import (CLIENT_V4, CLIENT_V6, SERVICE_V4, SERVICE_V6, TUNNEL_MTU, Machine,
                      start_worker_servers, stop_worker_servers)

PUBLIC_V4, PUBLIC_V6 = "198.18.0.10", "2001:db8::10"
GATEWAYS = ("gwa", "gwb")
WITNESS = "witness"
ETCD_NET = "198.19.200"


def _delete(ns: Netns) -> None:
    if not ns.delete():
        raise RuntimeError(f"namespace {ns.name} not removed")


def etcd_address(index: int) -> str:
    """The i-th node's (1: gwa, 2: gwb, 3: the witness) address on the etcd segment."""
    return f"{ETCD_NET}.{index}"


def sync_address(index: int) -> str:
    return f"198.19.77.{index}"


class PairNodeLab:
    """The topology of the module docstring: `start()` wires it and boots the three nodes at
    once; `close()` (also after a failed start) removes everything again."""

    def __init__(self, rootfs: Path, log=print):
        tag = f"{os.getpid() % 100000}"
        # Unique per run (nspawn's machine names, the namespaces).
        names = {"hub": "h", "client": "c", "worker": "w", "gwa": "a", "gwb": "b", WITNESS: "x"}
        self.ns = {role: Netns(f"ogp{tag}{short}") for role, short in names.items()}
        self.nodes = {name: Machine(rootfs, f"oakgw-{name}-{tag}", self.ns[name].name,
                                    hostname=name, log=log)
                      for name in (*GATEWAYS, WITNESS)}
        self.servers: list[subprocess.Popen] = []
        self.www: Path | None = None
        self._stack = ExitStack()

    @property
    def client(self) -> Netns:
        return self.ns["client"]

    @property
    def worker(self) -> Netns:
        return self.ns["worker"]

    # -- setup ---------------------------------------------------------------------------------
    def start(self) -> "PairNodeLab":
        try:
            self._netns()
            self.servers, self.www = start_worker_servers(self.worker)
            self._stack.callback(lambda: stop_worker_servers(self.servers, self.www))
            for node in self.nodes.values():
                self._stack.callback(node.close)
                node.start()
            for node in self.nodes.values():
                node.wait_booted()
        except BaseException:
            self.close()
            raise
        return self

    def _netns(self) -> None:
        for ns in self.ns.values():
            Netns.create(name=ns.name)
            self._stack.callback(_delete, ns)
        hub = self.ns["hub"]
        hub.ip(*(f"link add {br} type bridge" for br in ("brpub", "brint", "bretcd")),
               *(f"link set {br} up" for br in ("brpub", "brint", "bretcd")))
        # Ports on the hub's bridges, named by segment and end: p(ublic), i(nternal), e(tcd).
        self._port(self.client, "eth0", "pc", "brpub")
        self._port(self.worker, "tun0", "iw", "brint", mtu=TUNNEL_MTU)
        self.client.ip(f"addr add {CLIENT_V4}/24 dev eth0",
                       f"addr add {CLIENT_V6}/64 dev eth0 nodad")
        self.worker.ip(f"addr add {SERVICE_V4}/16 dev tun0",
                       f"addr add {SERVICE_V6}/16 dev tun0 nodad")
        for i, name in enumerate(GATEWAYS, 1):
            ns, end = self.ns[name], name[-1]
            # Before the links exist: keepalived's floating IPv6 addresses must not wait for DAD.
            ns.sysctl("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
            self._port(ns, "eth0", f"p{end}", "brpub")
            self._port(ns, "goProxyTun", f"i{end}", "brint", mtu=TUNNEL_MTU)
            self._port(ns, "etcd0", f"e{end}", "bretcd")
            # Addresses of its own on both segments (keepalived's adverts need one on the public
            # side; without one on the tunnel the kernel drops the service routes whenever
            # keepalived takes the floating address away).
            ns.ip(f"addr add 198.18.0.1{i}/24 dev eth0",
                  f"addr add 2001:db8::1{i}/64 dev eth0 nodad",
                  f"addr add 10.30.254.{i}/32 dev goProxyTun",
                  f"addr add fdff::ff:{i}/128 dev goProxyTun nodad",
                  "route add 10.30.0.0/16 dev goProxyTun",
                  "route add fdff::/16 dev goProxyTun",
                  f"addr add {etcd_address(i)}/24 dev etcd0")
        veth(self.ns["gwa"], "sync0", self.ns["gwb"], "sync0")
        for i, name in enumerate(GATEWAYS, 1):
            self.ns[name].ip(f"addr add {sync_address(i)}/30 dev sync0")
        self._port(self.ns[WITNESS], "etcd0", "ex", "bretcd")
        self.ns[WITNESS].ip(f"addr add {etcd_address(3)}/24 dev etcd0")
        for name in GATEWAYS:
            self.ns[name].wait_links_up(["eth0", "goProxyTun", "etcd0", "sync0"])
        self.ns[WITNESS].wait_links_up(["etcd0"])

    def _port(self, ns: Netns, ifname: str, port: str, bridge: str,
              mtu: int | None = None) -> None:
        hub = self.ns["hub"]
        veth(ns, ifname, hub, port, mtu=mtu)
        hub.ip(f"link set {port} master {bridge}")

    # -- a node's death ------------------------------------------------------------------------
    def power_loss(self, name: str) -> None:
        """Gateway `name` dies: its container is killed at once, and its links lose carrier
        (its ports in the hub and its end of the sync link go down), so its kernel, which
        outlives the container's processes in the lab, neither answers nor sends."""
        self.nodes[name].power_loss()
        end = name[-1]
        self.ns["hub"].ip(*(f"link set {seg}{end} down" for seg in "pie"))
        self.ns[name].ip("link set sync0 down")

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        for node in self.nodes.values():
            node.ask_poweroff()
        self._stack.close()
