"""A real gateway daemon (`oakestra-gw serve`) in a throwaway network namespace, and an HTTP
client whose sockets live in that namespace.

The namespace has what readiness needs: a `goProxyTun` veth (MTU 1450) into a second
"worker" namespace, routes for the service ranges through it, and forwarding on (namespaced
sysctls of the throwaway namespace only). Everything started here is stopped and removed in
`close()`, also after a failure.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from gw.lab.namespaces import inside
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


# -- running code inside a namespace ---------------------------------------------------------

def in_netns(name: str, fn, *args, **kw):
    """Run fn on a fresh thread inside network namespace `name` (setns affects only the
    calling thread); sockets it creates stay in that namespace. Returns fn's result or
    raises its exception."""
    box: dict = {}

    def target():
        try:
            with inside(name):
                box["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


class Http:
    """A minimal HTTP/1.1 client for the daemon's API, connecting from inside its namespace."""

    def __init__(self, ns_name: str, host: str = "127.0.0.1", port: int = API_PORT,
                 token: str | None = None, timeout: float = 15):
        self.ns_name, self.host, self.port = ns_name, host, port
        self.token, self.timeout = token, timeout

    def connect(self) -> socket.socket:
        return in_netns(self.ns_name, socket.create_connection, (self.host, self.port),
                        self.timeout)

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                content_type: str | None = "application/json", headers: dict | None = None,
                token: str | None | bool = True) -> Response:
        """`body` is sent as JSON; `raw` as given. `token`: True = the client's, a string,
        or None/False for no Authorization header."""
        hdrs = dict(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None and content_type:
            hdrs.setdefault("Content-Type", content_type)
        tok = self.token if token is True else (token or None)
        if tok:
            hdrs.setdefault("Authorization", f"Bearer {tok}")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.sock = self.connect()
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()

    def get(self, path, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def add(self, body, **kw) -> Response:
        return self.post("/api/service/exposure/add", body, **kw)

    def delete(self, body, **kw) -> Response:
        return self.post("/api/service/exposure/delete", body, **kw)

    def list(self) -> list[dict]:
        r = self.get("/api/service/exposure")
        assert r.status == 200, r
        return r.json["exposures"]

    def raw_exchange(self, data: bytes, read_timeout: float = 5) -> bytes:
        """Send bytes as they are; return what the server answers until it closes or pauses."""
        sock = self.connect()
        sock.settimeout(read_timeout)
        try:
            sock.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
            return b"".join(chunks)
        finally:
            sock.close()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


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
