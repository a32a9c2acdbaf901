"""A gateway pair with everything real: two gateway daemons sharing one table on etcd, keepalived
moving the floating addresses, conntrackd syncing the flows, a client on the public segment and
a worker on the internal one.

::

    client ns (bridge brpub)                                  worker ns (bridge brint)
    198.18.0.2/24, 2001:db8::2/64                             10.30.0.1/16, fdff:2000::1/16
        |  pa1                   pa2  |                       services: HTTP 80, echo 7, UDP 53
        |                             |                           |  wa1            wa2  |
      pub0 198.18.0.11      pub0 198.18.0.12     goProxyTun 10.30.254.1 (A)   10.30.254.2 (B)
       gateway A  ---- sync0 (198.19.77.1/.2) ----  gateway B
       etcd m1 (etcd0)                              etcd m2 (etcd0)         witness: etcd m3

- Floating: 198.18.0.10/24 and 2001:db8::10/64 on pub0, the internal (SNAT) addresses
  10.30.255.254/32 and fdff::fe/128 on goProxyTun, all on the master only. The internal segment
  stands in for the Oakestra network: the worker finds the SNAT address by ARP / NDP, so it
  moves with gratuitous ARP and unsolicited NA as it would on a real segment.
- A dead node is a gateway whose links are cut at the far end (its bridge ports in the client's
  and the worker's namespaces, its etcd port, the sync link): it sees lost carrier, as a node
  that lost power would be seen by the others.
- Each gateway's API listens where the cluster calls it, the floating internal IPv4 (bound
  with IP_FREEBIND, so the backup's daemon listens as well and answers once it is master), and
  on loopback, where the lab and the node's own clients ask that node's daemon.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from gw.core import ha
from gw.core.config import load_config
from gw.lab.daemon import GatewayDaemon, gateway_command
from gw.lab.netns import Built, LabError, Netns, stop_process
from gw.lab.topology import LAB_TOKEN
from tests.helpers import wait_for

from .lab import cluster_in

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_V4, PUBLIC_V6 = "198.18.0.10", "2001:db8::10"
CLIENT_V4, CLIENT_V6 = "198.18.0.2", "2001:db8::2"
INTERNAL_V4, INTERNAL_V6 = "10.30.255.254", "fdff::fe"
SERVICE_V4, SERVICE_V6 = "10.30.0.1", "fdff:2000::1"
PREFIX = "/oakgw-pair"
NAMES = ("a", "b")


class Node:
    """One gateway of the pair: its namespace, its daemon, and keepalived and conntrackd in it."""

    def __init__(self, name: str, index: int, ns: Netns, state: Path):
        self.name, self.index, self.ns, self.state = name, index, ns, state
        self.daemon: GatewayDaemon | None = None
        self.settings: ha.HaSettings | None = None
        self.keepalived: subprocess.Popen | None = None
        self.conntrackd: subprocess.Popen | None = None

    def configure(self, etcd_endpoints: list[str], api_host: str, **ha_changes) -> None:
        hastate = self.state / "ha"
        hastate.mkdir(parents=True, exist_ok=True)
        peer = 3 - self.index
        config = {
            "api": {"host": api_host, "port": 11022},
            "store": {"path": str(self.state / "exposures.json"), "backend": "etcd",
                      "prefix": PREFIX, "endpoints": etcd_endpoints},
            "network": {"internal_ipv4": INTERNAL_V4, "internal_ipv6": INTERNAL_V6,
                        "public_interfaces": ["pub0"]},
            # The services reach the Internet through the pair too (egress).
            "egress": {"enabled": True},
            "ha": {"enabled": True, "router_id": f"gw-{self.name}",
                   "priority": 150 if self.index == 1 else 100,
                   "advert_interval": 0.1, "preempt_delay": 1,
                   "public_interface": "pub0",
                   "public_addresses": [f"{PUBLIC_V4}/24", f"{PUBLIC_V6}/64"],
                   "internal_interface": "goProxyTun",
                   "sync_interface": "sync0", "sync_address": f"198.19.77.{self.index}",
                   "sync_peer": f"198.19.77.{peer}", "state_dir": str(hastate), **ha_changes},
        }
        self.daemon = GatewayDaemon(self.ns, self.state, config, token=LAB_TOKEN, cwd=ROOT)
        self.all_settings = load_config(self.daemon.config_path)
        self.settings = self.all_settings.ha

    # -- the processes ---------------------------------------------------------------------

    def start_conntrackd(self) -> None:
        Path(self.settings.conntrackd_conf).write_text(ha.render_conntrackd(
            self.settings, local=self.all_settings.etcd_addresses))
        self.conntrackd = self.ns.popen(*ha.conntrackd_command(self.settings),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.ns.run(*ha.conntrackd_command(self.settings, "-s"),
                                     check=False).returncode == 0,
                 timeout=30, what=f"gateway {self.name}'s conntrackd answers")

    def start_keepalived(self) -> None:
        notify = " ".join([*gateway_command(), "ha", "notify", "--config",
                           str(self.daemon.config_path), "--log-file",
                           str(self.state / "notify.log")])
        Path(self.settings.keepalived_conf).write_text(
            ha.render_keepalived(self.settings, notify))
        check = self.ns.run("keepalived", "--config-test", "-f", self.settings.keepalived_conf,
                            check=False)
        if check.returncode != 0:
            raise LabError(f"keepalived --config-test: {check.stderr}")
        self.keepalived = self.ns.popen(
            *ha.keepalived_command(self.settings), cwd=ROOT,
            stdout=open(self.state / "keepalived.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def stop_keepalived(self) -> None:
        if self.keepalived is not None:
            stop_process(self.keepalived, timeout=10)
            self.keepalived = None

    def stop(self) -> None:
        self.stop_keepalived()
        if self.conntrackd is not None:
            stop_process(self.conntrackd, timeout=10)
        if self.daemon is not None and self.daemon.proc is not None \
                and self.daemon.proc.poll() is None:
            self.daemon.stop()

    # -- what it shows ---------------------------------------------------------------------

    def role(self) -> str:
        status, body = self.daemon.request("GET", "/api/ready", token="")
        return body.get("ha", {}).get("role", "?") if isinstance(body, dict) else "?"

    def holds_public_address(self) -> bool:
        return f"{PUBLIC_V4}/24" in self.ns.run("ip", "-o", "addr", "show", "pub0").stdout

    def logs(self) -> str:
        return "\n".join(f"--- {self.name} {name}\n" + (self.state / name).read_text()[-3000:]
                         for name in ("keepalived.log", "notify.log", "daemon.log")
                         if (self.state / name).exists())


class PairLab(Built):
    """The topology of the module docstring. Use as a context manager; `start()` starts etcd,
    the daemons, conntrackd and keepalived and returns once A is master and B backup."""

    def __init__(self, root: Path, **ha_changes):
        self.root = root
        self.ha_changes = ha_changes
        self._stack = ExitStack()
        self.client = self.worker = self.witness = None
        self.nodes: list[Node] = []
        self.cluster = None
        self.services: subprocess.Popen | None = None

    @property
    def a(self) -> Node:
        return self.nodes[0]

    @property
    def b(self) -> Node:
        return self.nodes[1]

    def _ns(self, prefix: str) -> Netns:
        ns = Netns.create(prefix)
        self._stack.callback(ns.delete)
        return ns

    def _build(self) -> None:
        self.client, self.worker = self._ns("oakpc"), self._ns("oakpw")
        gws = [self._ns(f"oakp{n}") for n in NAMES]
        self.witness = self._ns("oakpx")
        self.client.ip("link add brpub type bridge", "link set brpub up",
                       f"addr add {CLIENT_V4}/24 dev brpub",
                       f"addr add {CLIENT_V6}/64 dev brpub nodad")
        self.worker.ip("link add brint type bridge", "link set brint up",
                       f"addr add {SERVICE_V4}/16 dev brint",
                       f"addr add {SERVICE_V6}/16 dev brint nodad",
                       # Egress: out through whichever gateway holds the internal address.
                       f"route add default via {INTERNAL_V4}",
                       f"route add default via {INTERNAL_V6}")
        for i, ns in enumerate(gws, 1):
            ns.sysctl("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                      "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
            for ifname, far, port, bridge, mtu in (
                    ("pub0", self.client, f"pa{i}", "brpub", None),
                    ("goProxyTun", self.worker, f"wa{i}", "brint", 1450)):
                subprocess.run(["ip", "link", "add", ifname, "netns", ns.name, "type", "veth",
                                "peer", "name", port, "netns", far.name], check=True)
                far.ip(f"link set {port} master {bridge}", f"link set {port} up")
                if mtu:
                    ns.ip(f"link set {ifname} mtu {mtu}")
                ns.ip(f"link set {ifname} up")
            # Node addresses of its own on both segments: keepalived's adverts need one on the
            # public side, and without one on the tunnel the kernel flushes the service routes
            # through it whenever keepalived takes the last (floating) address away.
            ns.ip(f"addr add 198.18.0.1{i}/24 dev pub0",
                  f"addr add 2001:db8::1{i}/64 dev pub0 nodad",
                  f"addr add 10.30.254.{i}/32 dev goProxyTun",
                  f"addr add fdff::ff:{i}/128 dev goProxyTun nodad",
                  "route add 10.30.0.0/16 dev goProxyTun",
                  "route add fdff::/16 dev goProxyTun",
                  f"route add default via {CLIENT_V4}")
        subprocess.run(["ip", "link", "add", "sync0", "netns", gws[0].name, "type", "veth",
                        "peer", "name", "sync0", "netns", gws[1].name], check=True)
        for i, ns in enumerate(gws, 1):
            ns.ip(f"addr add 198.19.77.{i}/30 dev sync0", "link set sync0 up")
        for ns in gws:
            ns.wait_links_up(["pub0", "goProxyTun", "sync0"])
        self.cluster = self._stack.enter_context(cluster_in([*gws, self.witness]))
        for i, (name, ns) in enumerate(zip(NAMES, gws), 1):
            node = Node(name, i, ns, self.root / name)
            mine = self.cluster.members[f"m{i}"]
            others = [u for u in self.cluster.endpoints if u != mine.client_url]
            node.configure([mine.client_url, *others], INTERNAL_V4, **self.ha_changes)
            self.nodes.append(node)
            self._stack.callback(node.stop)
        self.services = self.worker.popen(sys.executable, "-m", "gw.lab", "serve", "worker",
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True, cwd=ROOT)
        self._stack.callback(stop_process, self.services)
        if self.services.stdout.readline().strip() != "listening":
            raise LabError("the worker's services did not start")

    def start(self) -> None:
        for node in self.nodes:
            node.daemon.start()
            node.start_conntrackd()
        for node in self.nodes:
            node.start_keepalived()
        self.wait_roles("master", "backup")

    def roles(self) -> tuple[str, str]:
        return self.a.role(), self.b.role()

    def wait_roles(self, a: str, b: str, timeout: float = 60) -> None:
        wait_for(lambda: self.roles() == (a, b), timeout=timeout,
                 what=f"A {a}, B {b}", log=self.logs)

    def logs(self) -> str:
        return "\n".join(n.logs() for n in self.nodes)

    # -- a node's death and return ---------------------------------------------------------

    def _links(self, node: Node) -> list[tuple[Netns, str]]:
        i = node.index
        return [(self.client, f"pa{i}"), (self.worker, f"wa{i}"), (node.ns, "sync0"),
                (self.cluster.hub, f"p{i}")]

    def cut(self, node: Node) -> None:
        """The node dies, as the others see it: every link of it goes dark at the far end."""
        for ns, ifname in self._links(node):
            ns.ip(f"link set {ifname} down")

    def heal(self, node: Node) -> None:
        for ns, ifname in self._links(node):
            ns.ip(f"link set {ifname} up")

    def close(self) -> None:
        self._stack.close()
