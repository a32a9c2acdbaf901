"""An etcd cluster for the lab: N members of Debian's etcd, each inside a given network
namespace at a given address, each with its own data directory, and the helpers the tests
need to hurt it (stop, kill, restart a member; cut a member off from its peers).

The members speak plain HTTP on the lab's addresses (client port 2379, peer port 2380), or
with `tls` HTTPS on the client port, where clients must show a certificate of the lab's CA; short
heartbeats and elections (50/500 ms) so that a lost leader is noticed within a few seconds,
and ``--max-txn-ops`` raised to the gateway's batch cap, so that one batch is one transaction.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..core.exposure import MAX_BATCH
from ..core.hosts import in_url
from .certs import LabCA, Pair
from .http import in_netns
from .netns import Built, LabError, Netns, stop_process

CLIENT_PORT, PEER_PORT = 2379, 2380
# The largest batch the API takes: a batch is one transaction.
MAX_TXN_OPS = MAX_BATCH


@dataclass
class Member:
    name: str
    ns: Netns
    address: str
    data_dir: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    blocked: list[str] = field(default_factory=list)  # peers whose traffic is dropped

    tls: bool = False

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{in_url(self.address)}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{in_url(self.address)}:{PEER_PORT}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster(Built):
    """`members`: (name, namespace, address) for each member; the namespaces must reach each
    other's addresses. Use as a context manager: every member is stopped and its data removed
    on exit."""

    def __init__(self, members: list[tuple[str, Netns, str]], *, token: str = "oakgw-lab",
                 root: Path | None = None, max_txn_ops: int = MAX_TXN_OPS, tls: bool = False):
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="oakgw-etcd-")
        self.root = Path(root or self._tmp.name)
        self.token = token
        self.max_txn_ops = max_txn_ops
        self.members = {name: Member(name, ns, address, self.root / name, tls=tls)
                        for name, ns, address in members}
        # With tls: clients must show a certificate of the lab's CA (`ca`, `client`), and the
        # members' own (for their addresses) are signed by it; peers still speak plain HTTP.
        self.ca: LabCA | None = None
        self.client: Pair | None = None
        self._served: dict[str, Pair] = {}
        if tls:
            self.ca = LabCA.create(self.root / "tls")
            self.client = self.ca.issue("client", usages=("clientAuth",))
            # A member's own certificate serves clients and is also the client certificate of
            # its JSON gateway's connection to itself: without clientAuth that connection is
            # refused and every JSON request fails ("connection closed").
            self._served = {m.name: self.ca.issue(m.name, ip=m.address,
                                                  usages=("serverAuth", "clientAuth"))
                            for m in self.members.values()}

    def _build(self) -> None:
        self.start()

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members.values()]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members.values())

    def _argv(self, m: Member) -> list[str]:
        return ["etcd", "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", self._initial_cluster(),
                "--initial-cluster-token", self.token, "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--max-txn-ops", str(self.max_txn_ops), "--logger", "zap",
                "--log-level", "warn", *self._tls_argv(m)]

    def _tls_argv(self, m: Member) -> list[str]:
        if not m.tls:
            return []
        served = self._served[m.name]
        return ["--cert-file", str(served.cert), "--key-file", str(served.key),
                "--trusted-ca-file", str(self.ca.cert), "--client-cert-auth"]

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        context.load_cert_chain(str(self.client.cert), str(self.client.key))
        return context

    def start(self, timeout: float = 30) -> None:
        for m in self.members.values():
            self.start_member(m.name, wait=False)
        for m in self.members.values():
            self.wait_healthy(m.name, timeout)

    def start_member(self, name: str, *, wait: bool = True, timeout: float = 30) -> None:
        m = self.members[name]
        assert not m.running(), f"{name} already runs"
        m.data_dir.mkdir(parents=True, exist_ok=True)
        m.log_path = self.root / f"{name}.log"
        with open(m.log_path, "ab") as log:
            m.proc = m.ns.popen(*self._argv(m), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            self.wait_healthy(name, timeout)

    def stop_member(self, name: str) -> None:
        m = self.members[name]
        if m.proc is not None:
            stop_process(m.proc)

    def kill_member(self, name: str) -> None:
        m = self.members[name]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(10)

    def health(self, name: str) -> dict | None:
        """The member's /health answer ({"health": "true"} with a leader and quorum), None if
        it does not answer."""
        m = self.members[name]

        def ask():
            with urllib.request.urlopen(f"{m.client_url}/health", timeout=2,
                                        context=self._ssl_context()) as answer:
                return json.loads(answer.read())
        try:
            return in_netns(m.ns.name, ask)
        except (OSError, ValueError):
            return None

    def wait_healthy(self, name: str, timeout: float = 30) -> None:
        m = self.members[name]
        deadline = time.monotonic() + timeout
        while (self.health(name) or {}).get("health") != "true":
            if m.proc is not None and m.proc.poll() is not None:
                raise LabError(f"etcd member {name} exited with {m.proc.returncode}:\n"
                               f"{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise LabError(f"etcd member {name} not healthy within {timeout:g} s:\n"
                               f"{self.log_tail(name)}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.members[name].log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- partitions: drop the member's peer traffic in its own namespace (nftables) -----------

    _TABLE = "oakgw_etcd_cut"

    def cut(self, name: str) -> None:
        """Cut `name` off from every other member (peer and client traffic between members):
        its own clients in its namespace still reach it, as a gateway reaches its local member
        during a partition."""
        m = self.members[name]
        others = [o.address for o in self.members.values() if o.name != name]
        rules = []
        for addr in others:
            fam = "ip6" if ":" in addr else "ip"
            rules += [f"add rule inet {self._TABLE} in {fam} saddr {addr} drop",
                      f"add rule inet {self._TABLE} out {fam} daddr {addr} drop"]
        m.ns.run("nft", "-f", "-", input="\n".join([
            f"table inet {self._TABLE}", f"delete table inet {self._TABLE}",
            f"table inet {self._TABLE} {{",
            "  chain in { type filter hook input priority -300; }",
            "  chain out { type filter hook output priority -300; }", "}", *rules]) + "\n")
        m.blocked = others

    def heal(self, name: str) -> None:
        m = self.members[name]
        m.ns.run("nft", f"table inet {self._TABLE}\ndelete table inet {self._TABLE}")
        m.blocked = []

    def close(self) -> None:
        for m in self.members.values():
            if m.proc is not None:
                stop_process(m.proc)
            if m.blocked and m.ns.exists():
                try:
                    self.heal(m.name)
                except LabError:
                    pass
        if self._tmp is not None:
            self._tmp.cleanup()
