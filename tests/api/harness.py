"""A real gateway daemon (`oakestra-gw serve`) in a throwaway network namespace, and an HTTP
client whose sockets live in that namespace.

The namespace has what readiness needs: a `goProxyTun` veth (MTU 1450) into a second
"worker" namespace, routes for the service ranges through it, and forwarding on (namespaced
sysctls of the throwaway namespace only). Everything started here is stopped and removed in
`close()`, also after a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from gw.lab.http import NetnsHttp as Http
from gw.lab.http import in_netns  # noqa: F401 - used by the CLI tests
from tests import oracle
from tests.helpers import wait_for
from tests.netns import Netns, veth

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
API_PORT = 11022
INTERNAL_V4, INTERNAL_V6 = "10.30.255.1", "fdff::ffff:1"
PUBLIC_V4, PUBLIC_CLIENT, SERVICE_V4 = "198.18.0.1", "198.18.0.2", "10.30.0.1"


def gw_command() -> list[str]:
    script = Path(sys.executable).parent / "oakestra-gw"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gw.cli"]


# -- the daemon ----------------------------------------------------------------------------

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


class Gateway:
    """One daemon in namespace `ns` (plus a worker namespace behind goProxyTun)."""

    def __init__(self, workdir: Path, *, token: str | None = TOKEN, config: dict | None = None,
                 data_path: bool = True, drift_watch: bool = True):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = self.dir / "state"
        self.config_path = self.dir / "gateway.toml"
        self.log_path = self.dir / "daemon.log"
        self.token = token
        # Off for tests that tamper with the table on purpose and repair it with SIGHUP.
        self.drift_watch = drift_watch
        self.proc: subprocess.Popen | None = None
        self.ns = Netns("oakapi")
        self.worker: Netns | None = None
        self.client: Netns | None = None
        self._log_offset = 0
        try:
            if data_path:
                self.worker = Netns("oakwrk")
                veth(self.ns, "goProxyTun", self.worker, "w0", mtu=1450)
                self.ns.run("ip", "route", "add", "10.30.0.0/16", "dev", "goProxyTun")
                self.ns.run("ip", "-6", "route", "add", "fdff::/16", "dev", "goProxyTun")
                self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1",
                            "net.ipv6.conf.all.forwarding=1")
            self.config = {
                "api": {"host": "127.0.0.1", "port": API_PORT},
                "store": {"path": str(self.store_dir / "exposures.json")},
                "network": {"internal_ipv4": INTERNAL_V4, "internal_ipv6": INTERNAL_V6},
            }
            if token:
                token_file = self.dir / "token"
                token_file.write_text(token + "\n")
                token_file.chmod(0o600)
                self.config["api"]["token_file"] = str(token_file)
            for section, values in (config or {}).items():
                self.config.setdefault(section, {}).update(values)
            self.write_config()
        except BaseException:
            self.close()
            raise

    # -- config and process --------------------------------------------------------------

    def write_config(self, text: str | None = None) -> None:
        if text is None:
            lines = []
            for section, values in self.config.items():
                lines.append(f"[{section}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
            text = "\n".join(lines) + "\n"
        self.config_path.write_text(text)

    def start(self, *, wait: bool = True, env: dict | None = None,
              args: list[str] | None = None) -> "Gateway":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        self._log_offset = self.log_path.stat().st_size
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        environ.update(PYTHONUNBUFFERED="1", OAKESTRA_GW_DRIFT_WATCH="1" if self.drift_watch
                       else "0", **(env or {}))
        self.proc = self.ns.popen(*gw_command(), *(args or ["serve", "--config",
                                                            str(self.config_path)]),
                                  stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=ROOT)
        log.close()
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http().get("/api/health").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon did not serve within {timeout} s:\n{self.log()}")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored signal {sig}:\n{self.log()}")

    def log(self, since_start: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[self._log_offset if since_start else 0:].decode(errors="replace")

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log(since_start=True)
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log()}")

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        finally:
            self.ns.delete()
            for ns in (self.worker, self.client):
                if ns is not None:
                    ns.delete()

    # -- a packet path through an exposure ---------------------------------------------------

    def open_path(self) -> None:
        """A client namespace on a public link (it is PUBLIC_CLIENT, the gateway PUBLIC_V4) and,
        in the worker, SERVICE_V4 with a TCP echo on port 80: `exchange` then sends a real
        packet through an exposure of SERVICE_V4:80."""
        assert self.worker is not None, "needs the data path"
        self.client = Netns("oakcli")
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

    def http(self, token: str | None | bool = True, **kw) -> Http:
        return Http(self.ns.name, token=self.token if token is True else (token or None), **kw)

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
def running(path: Path, **options) -> Iterator["Gateway"]:
    """A started daemon (see Gateway) that is closed afterwards, also after a failure."""
    require_root()
    gateway = Gateway(path, **options)
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
