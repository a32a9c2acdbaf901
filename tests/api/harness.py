"""A real gateway daemon (`oakestra-gw serve`) in a throwaway network namespace, built on the
lab's harness (gw/lab: `Netns`, `veth`, `GatewayDaemon`, `NetnsHttp`).

The namespace has what readiness needs: a `goProxyTun` veth (MTU 1450) into a second
"worker" namespace, routes for the service ranges through it, and forwarding on (namespaced
sysctls of the throwaway namespace only). Everything started here is stopped and removed in
`close()`, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from gw.lab.daemon import API_PORT, GatewayDaemon
from gw.lab.daemon import gateway_command as gw_command  # noqa: F401 - the tests' name for it
from gw.lab.http import in_netns  # noqa: F401 - used by the CLI tests
from gw.lab.netns import Netns, veth
from tests import oracle
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
INTERNAL_V4, INTERNAL_V6 = "10.30.255.1", "fdff::ffff:1"
PUBLIC_V4, PUBLIC_CLIENT, SERVICE_V4 = "198.18.0.1", "198.18.0.2", "10.30.0.1"


class GatewayTestbed(GatewayDaemon):
    """One daemon in namespace `ns` (plus a worker namespace behind goProxyTun), its config,
    token and log in `workdir` and its store in `workdir`/state."""

    def __init__(self, workdir: Path, *, token: str | None = TOKEN, config: dict | None = None,
                 data_path: bool = True, drift_watch: bool = True):
        self.worker: Netns | None = None
        self.client: Netns | None = None
        self.proc = None
        self.ns = Netns.create("oakapi")
        try:
            if data_path:
                self.worker = Netns.create("oakwrk")
                veth(self.ns, "goProxyTun", self.worker, "w0", mtu=1450)
                self.ns.run("ip", "route", "add", "10.30.0.0/16", "dev", "goProxyTun")
                self.ns.run("ip", "-6", "route", "add", "fdff::/16", "dev", "goProxyTun")
                self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1",
                            "net.ipv6.conf.all.forwarding=1")
            tables = {
                "api": {"host": "127.0.0.1", "port": API_PORT},
                "store": {"path": str(workdir / "state" / "exposures.json")},
                "network": {"internal_ipv4": INTERNAL_V4, "internal_ipv6": INTERNAL_V6},
            }
            for section, values in (config or {}).items():
                tables.setdefault(section, {}).update(values)
            super().__init__(self.ns, workdir, tables, token=token, drift_watch=drift_watch,
                             cwd=ROOT)
            self.store_dir = self.dir / "state"
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.kill()
        finally:
            for ns in (self.ns, self.worker, self.client):
                if ns is not None:
                    ns.delete()

    # -- a packet path through an exposure ---------------------------------------------------

    def open_path(self) -> None:
        """A client namespace on a public link (it is PUBLIC_CLIENT, the gateway PUBLIC_V4) and,
        in the worker, SERVICE_V4 with a TCP echo on port 80: `exchange` then sends a real
        packet through an exposure of SERVICE_V4:80."""
        assert self.worker is not None, "needs the data path"
        self.client = Netns.create("oakcli")
        veth(self.ns, "pub0", self.client, "c0")
        self.ns.run("ip", "addr", "add", f"{PUBLIC_V4}/24", "dev", "pub0")
        self.client.run("ip", "addr", "add", f"{PUBLIC_CLIENT}/24", "dev", "c0")
        # A /16 on the tunnel's far end: the gateway's SNAT address is on-link from there.
        self.worker.run("ip", "addr", "add", f"{SERVICE_V4}/16", "dev", "w0")
        self.worker.popen("socat", "TCP-LISTEN:80,fork,reuseaddr", "PIPE",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: ":80 " in self.worker.run("ss", "-tlnH").stdout, what="the echo")

    def exchange(self, port: int, text: str = "ping") -> str:
        """Send `text` from the client to PUBLIC_V4:port; what came back ("" for nothing)."""
        proc = self.client.run("socat", "-T5", "-", f"TCP:{PUBLIC_V4}:{port},connect-timeout=5",
                               input=text + "\n", check=False, timeout=30)
        return proc.stdout.strip()

    # -- looking at it -------------------------------------------------------------------

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns.run("nft", *args, check=check)

    def kernel(self) -> set[tuple] | None:
        """The maps' elements as tests/oracle.py reads them; None without our table."""
        return oracle.read(self.ns.argv())

    def kernel_docs(self) -> set[tuple]:
        return self.kernel() or set()

    def store_files(self) -> dict[str, bytes]:
        """The bytes of every store file (the lock file aside)."""
        return {p.name: p.read_bytes() for p in sorted(self.store_dir.iterdir())
                if p.is_file() and not p.name.endswith(".lock")}

    def state(self) -> tuple:
        """Store (via the API and on disk) and kernel, for "nothing changed" checks."""
        return (self.http().list(), self.store_files(), self.kernel_docs())


def docs_set(exposures: list[dict]) -> set[tuple]:
    return {(d["family"], d["protocol"], d["exposed_port"], d["service_ip"], d["service_port"])
            for d in exposures}


def require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("nft") is None:
        pytest.skip("needs nft")


@contextmanager
def running(path: Path, **options) -> Iterator[GatewayTestbed]:
    """A started daemon (see GatewayTestbed) that is closed afterwards, also after a failure."""
    require_root()
    gateway = GatewayTestbed(path, **options)
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.close()


def schemathesis_bin() -> str:
    local = Path(sys.executable).parent / "schemathesis"
    found = str(local) if local.exists() else shutil.which("schemathesis")
    if not found:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    return found
