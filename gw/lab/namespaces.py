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

The same module is the program the lab runs in its namespaces (``python -m gw.lab serve`` for
the worker's services).
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CLONE_NEWNET = 0x40000000
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

_counter = itertools.count()


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ns_path(name: str) -> Path:
    return Path("/run/netns") / name


def enter(name: str) -> None:
    """Move the calling *thread* into network namespace `name` (setns affects only it)."""
    target = os.open(ns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
    finally:
        os.close(target)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with the calling *thread* in network namespace `name`: sockets created in
    it stay in that namespace after the block. Other threads are not affected."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(back)


def run(argv: list[str], *, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


class LabError(RuntimeError):
    pass


class Lab:
    """Three namespaces wired as in the module docstring. Use as a context manager."""

    def __init__(self, tag: str | None = None, *, internal_v4: str = INTERNAL_V4,
                 internal_v6: str = INTERNAL_V6, keep: bool = False):
        self.tag = tag or f"{os.getpid()}x{next(_counter)}"
        self.ns = {role: f"{PREFIX}-{self.tag}-{role}" for role in ROLES}
        self.internal_v4, self.internal_v6 = internal_v4, internal_v6
        self.dir = LAB_ROOT / self.tag
        self.keep = keep
        self._procs: list[subprocess.Popen] = []
        self.daemon: "Daemon | None" = None

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
            run(["ip", "netns", "add", self.ns[role]])
            self.ip(role, "link set lo up")
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
        self._wait_links_up({"client": ["eth0"], "gateway": ["pub0", "goProxyTun"],
                             "worker": ["wtun"]})

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
            self._wait_links_up({"gateway": ["goProxyTun"], "worker": ["wtun"]})

    def delete_tunnel(self) -> None:
        """What a NetManager restart does: the TUN goes, and its routes with it (the worker's
        end of the veth goes too; its services keep listening on the wildcard address)."""
        self.ip("gateway", "link del goProxyTun")

    def _wait_links_up(self, links: dict[str, list[str]], timeout: float = 5) -> None:
        """Carrier comes a moment after `link set up` (the kernel's link watch): wait, so that
        the lab is in its final state when build() returns."""
        deadline = time.monotonic() + timeout
        for role, names in links.items():
            while True:
                out = json.loads(self.run(role, "ip", "-j", "link", "show").stdout)
                state = {link["ifname"]: link.get("operstate") for link in out}
                if all(state.get(n) == "UP" for n in names):
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"links of {role} not up: {state}")
                time.sleep(0.02)

    def remove(self) -> list[str]:
        """Stop every process we started, delete our namespaces (and whatever still runs in
        them) and our state directory. Returns what could not be removed."""
        left = []
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        for role in ROLES:
            name = self.ns[role]
            if not ns_path(name).exists():
                continue
            kill_namespace_processes(name)
            if run(["ip", "netns", "del", name], check=False).returncode != 0:
                left.append(name)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            LAB_ROOT.rmdir()  # only when no other lab uses it
        except OSError:
            pass
        return left

    # -- running things in the namespaces -----------------------------------------------------

    def argv(self, role: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role], *cmd]

    def run(self, role: str, *cmd: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        return run(self.argv(role, *cmd), check=check, timeout=timeout, input=input)

    def ip(self, role: str, *commands: str) -> None:
        """Several `ip` commands in one process (`ip -batch`)."""
        self.run(role, "ip", "-batch", "-", input="\n".join(commands) + "\n")

    def sysctl(self, role: str, *settings: str) -> None:
        # `ip netns exec` remounts /sys and /proc/sys/net belongs to the caller's namespace.
        self.run(role, "sysctl", "-q", "-w", *settings)

    def popen(self, role: str, *cmd: str, **kw) -> subprocess.Popen:
        # A session of its own: Ctrl-C reaches only the caller, which stops it in order.
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(role, *cmd), **kw)
        self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        if proc in self._procs:
            self._procs.remove(proc)

    @contextmanager
    def inside(self, role: str) -> Iterator[None]:
        with inside(self.ns[role]):
            yield

    def socket(self, role: str, family: int, kind: int) -> socket.socket:
        """A socket that lives in the namespace of `role`."""
        with self.inside(role):
            return socket.socket(family, kind)

    # -- the worker's services ----------------------------------------------------------------

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


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def kill_namespace_processes(name: str, grace: float = 2.0) -> None:
    """SIGTERM whatever runs in the namespace, SIGKILL what is left after `grace` seconds."""
    def pids() -> list[int]:
        out = run(["ip", "netns", "pids", name], check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def send(sig: int, targets: list[int]) -> None:
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    left = pids()
    send(signal.SIGTERM, left)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = pids()
    send(signal.SIGKILL, left)
    deadline = time.monotonic() + 3
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = pids()


def remove_tag(tag: str) -> list[str]:
    """Remove a lab by its tag, from outside the process that built it."""
    lab = Lab(tag)
    return lab.remove()


def list_labs() -> list[str]:
    names = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    tags = []
    for line in names:
        name = line.split(" ")[0]
        if name.startswith(PREFIX + "-") and name.endswith("-gateway"):
            tags.append(name[len(PREFIX) + 1:-len("-gateway")])
    return sorted(tags)


# -- the daemon in the gateway namespace -------------------------------------------------------

def toml(doc: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for a gateway config: tables of strings, numbers, booleans, lists."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))
    out = []
    for section, table in doc.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("oakestra-gw")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from gw.cli import main; sys.exit(main())"]


class Daemon:
    """The real `oakestra-gw serve` in the lab's gateway namespace, with its state (config,
    store, token, log) in a directory of its own."""

    TOKEN = "lab-token-0123456789abcdef"

    def __init__(self, lab: Lab, state: Path | None = None, *, overrides: dict | None = None,
                 standalone: bool = True, token: bool = True):
        self.lab = lab
        self.state = Path(state or lab.dir / "gateway")
        self.state.mkdir(parents=True, exist_ok=True)
        self.config_path = self.state / "gateway.toml"
        self.log_path = self.state / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.token = self.TOKEN if token else None
        config: dict[str, dict[str, Any]] = {
            "api": {"port": 11022},
            "store": {"path": str(self.state / "exposures.json")},
            "network": {"public_interfaces": ["pub0"]},
        }
        if token:
            token_file = self.state / "token"
            token_file.write_text(self.TOKEN + "\n")
            token_file.chmod(0o600)
            config["api"]["token_file"] = str(token_file)
        if standalone:
            config["network"].update(internal_ipv4=lab.internal_v4, internal_ipv6=lab.internal_v6)
        for section, table in (overrides or {}).items():
            config.setdefault(section, {}).update(table)
        self.config = config
        self.config_path.write_text(toml(config))

    @property
    def api_host(self) -> str:
        return self.config["api"].get("host") or self.lab.internal_v4

    @property
    def api_port(self) -> int:
        return self.config["api"]["port"]

    def start(self, wait: bool = True, timeout: float = 20,
              env: dict[str, str] | None = None) -> "Daemon":
        log = open(self.log_path, "ab")
        try:
            self.proc = self.lab.popen("gateway", *gateway_command(), "serve", "--config",
                                       str(self.config_path), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **(env or {})})
        finally:
            log.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"the gateway daemon exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")
            try:
                if self.request("GET", "/api/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError(f"the gateway daemon did not answer /api/health within "
                               f"{timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def reconfigure(self, overrides: dict[str, dict[str, Any]], timeout: float = 20) -> str:
        """Change config keys and reload (SIGHUP), as `systemctl reload` does. Returns the
        reload's last log line once the daemon has applied (or refused) the new file."""
        for section, table in overrides.items():
            self.config.setdefault(section, {}).update(table)
        self.config_path.write_text(toml(self.config))
        done = self._reloads()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reloads() == done:
            if time.monotonic() > deadline:
                raise LabError(f"the daemon did not finish a reload within {timeout:g} s:\n"
                               f"{self.log_tail()}")
            time.sleep(0.05)
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if "reload:" in line][-1]

    def _reloads(self) -> int:
        """Finished reloads so far: each ends with the reconcile's line."""
        text = self.log_path.read_text(errors="replace")
        return text.count("reconcile: ") + text.count("reconcile failed")

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.lab.forget(self.proc)
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = "",
                timeout: float = 10, host: str | None = None) -> tuple[int, Any]:
        """An HTTP request to the management API from inside the gateway namespace (allowed:
        loopback/local), at `host` (default: where it was started to listen). Returns
        (status, parsed JSON or text)."""
        import http.client

        token = self.token if token == "" else token
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        payload = None if body is None else json.dumps(body)
        with self.lab.inside("gateway"):
            conn = http.client.HTTPConnection(host or self.api_host, self.api_port,
                                              timeout=timeout)
            conn.connect()  # the socket is created here, in the gateway namespace
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


# -- probes from a namespace -------------------------------------------------------------------

def family_of(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def http_get(lab: Lab, role: str, host: str, port: int, path: str = "/", *,
             timeout: float = 5, source: str | None = None) -> tuple[int, bytes]:
    """GET over a socket created in `role`'s namespace. Raises OSError when unreachable."""
    sock = lab.socket(role, family_of(host), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(1 << 16):
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def http_post(lab: Lab, role: str, host: str, port: int, path: str, body: bytes, *,
              timeout: float = 10) -> tuple[int, bytes]:
    """POST `body` over a socket created in `role`'s namespace."""
    sock = lab.socket(role, family_of(host), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"POST {path} HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        sock.sendall(body)
        chunks = []
        while data := sock.recv(1 << 16):
            chunks.append(data)
    finally:
        sock.close()
    head, _, answer = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, answer


def udp_exchange(lab: Lab, role: str, host: str, port: int, message: bytes, *,
                 timeout: float = 2, source: str | None = None) -> bytes:
    """One datagram there and one back. Raises socket.timeout when nothing comes back."""
    sock = lab.socket(role, family_of(host), socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
        sock.send(message)
        return sock.recv(65535)
    finally:
        sock.close()


def tcp_connect(lab: Lab, role: str, host: str, port: int, *, timeout: float = 3,
                source: str | None = None) -> socket.socket:
    sock = lab.socket(role, family_of(host), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_echo(sock: socket.socket, text: bytes) -> bytes:
    """One line to the worker's TCP echo service over `sock` and its answer. Raises OSError
    when the connection is cut (reset, closed or silent past the socket's timeout)."""
    sock.sendall(text + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError("closed by the peer")
        data += chunk
    return data


class UdpFlow:
    """One UDP client socket in `role`'s namespace: every datagram belongs to one flow (one
    conntrack entry on the gateway)."""

    def __init__(self, lab: Lab, role: str, host: str, port: int):
        self.sock = lab.socket(role, family_of(host), socket.SOCK_DGRAM)
        self.sock.connect((host, port))

    def exchange(self, message: bytes, timeout: float) -> bytes | None:
        """The answer to `message`, or None when none comes within `timeout`. Raises
        ConnectionRefusedError when a port unreachable came back."""
        self.sock.settimeout(timeout)
        self.sock.send(message)
        try:
            return self.sock.recv(65535)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


# -- the worker's services (run inside the worker namespace) -----------------------------------

def _serve(role: str = "worker") -> None:
    import http.server
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "oakestra-lab-worker/1"
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            peer = self.client_address[0].removeprefix("::ffff:")
            local = self.connection.getsockname()[0].removeprefix("::ffff:")
            mss = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            if self.path.startswith("/bytes/"):
                n = int(self.path.split("/")[2])
                self._send(200, b"", length=n, extra={"X-Peer": peer, "X-Mss": str(mss)})
                block = bytes(range(256)) * 256
                while n > 0:
                    self.wfile.write(block[:n])
                    n -= len(block)
                return
            if self.path == "/whoami":
                body = json.dumps({"peer": peer, "local": local, "mss": mss}).encode()
            else:
                body = (f"hello from the {role} namespace's server at {local}; "
                        f"it sees you as {peer}\n").encode()
            self._send(200, body, extra={"X-Peer": peer, "X-Mss": str(mss)})

        def do_POST(self):
            # /upload: reads the body, answers its size (large uploads through the tunnel).
            left = int(self.headers.get("Content-Length", 0))
            total = 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                total += len(chunk)
                left -= len(chunk)
            peer = self.client_address[0].removeprefix("::ffff:")
            self._send(200, json.dumps({"received": total, "peer": peer}).encode())

        def _send(self, status, body, length=None, extra=None):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    # socketserver listens with a backlog of 5: a burst of connections would lose SYNs to a
    # full accept queue (and the client retries only after a second), as no real service does.
    class DualStack(socketserver.ThreadingMixIn, http.server.HTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        request_queue_size = 128

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                if line.strip() == b"WHOAMI":
                    peer = self.client_address[0].removeprefix("::ffff:")
                    mss = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
                    line = json.dumps({"peer": peer, "mss": mss}).encode() + b"\n"
                self.wfile.write(line)

    class EchoServer(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    # UDP echo, one socket per family, each answering from the address it was sent to (a
    # namespace with several addresses would otherwise pick any of them as the source, and a
    # client's connected socket drops an answer from another address).
    ip_pktinfo = getattr(socket, "IP_PKTINFO", 8)
    udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp4.setsockopt(socket.IPPROTO_IP, ip_pktinfo, 1)
    udp4.bind(("0.0.0.0", UDP_PORT))
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    udp6.bind(("::", UDP_PORT))

    def udp_echo(sock, level, kind):
        while True:
            data, ancillary, _flags, addr = sock.recvmsg(65535, 256)
            reply = b"echo " + data.rstrip(b"\r\n") + f" (from {addr[0]})\n".encode()
            source = []
            for cmsg_level, cmsg_type, info in ancillary:
                if (cmsg_level, cmsg_type) == (level, ip_pktinfo):
                    # in_pktinfo {ifindex, spec_dst, addr}: the source is spec_dst on the way
                    # out, the destination it came to is addr on the way in.
                    source = [(level, ip_pktinfo, bytes(4) + info[8:12] + bytes(4))]
                elif (cmsg_level, cmsg_type) == (level, kind):  # in6_pktinfo: its address
                    source = [(level, kind, info[:16] + bytes(4))]
            sock.sendmsg([reply], source, 0, addr)

    DualStack.allow_reuse_address = True
    servers = [DualStack(("::", HTTP_PORT), Handler), EchoServer(("::", ECHO_PORT), Echo)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for sock, level, kind in ((udp4, socket.IPPROTO_IP, ip_pktinfo),
                              (udp6, socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)):
        threading.Thread(target=udp_echo, args=(sock, level, kind), daemon=True).start()
    print("listening", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        _serve(*argv[1:2])
        return 0
    if argv[:1] == ["list"]:
        print("\n".join(list_labs()) or "(no lab)")
        return 0
    if argv[:1] == ["remove"] and len(argv) == 2:
        tags = list_labs() if argv[1] == "all" else [argv[1]]
        failed = [n for tag in tags for n in remove_tag(tag)]
        for tag in tags:
            print(f"removed lab {tag}")
        return 1 if failed else 0
    print("usage: python -m gw.lab serve [ROLE] | list | remove TAG|all", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
