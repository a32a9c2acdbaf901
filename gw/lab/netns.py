"""Network namespaces and the links between them: the one place the lab and the tests create,
enter and remove a namespace, wire a veth pair, and run or stop a process inside one.

Nothing here touches the caller's own namespace: `inside` moves only the calling *thread*
and moves it back, and every command runs through `ip netns exec`.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CLONE_NEWNET = 0x40000000

_counter = itertools.count()


class LabError(RuntimeError):
    pass


class Built:
    """A context manager over `_build()` and `close()`: `close` also runs when the build fails
    half-way, so that what it made so far goes too."""

    def _build(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
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


def run(argv: list[str], *, check: bool = True, timeout: float = 60,
        input: str | None = None, **kw) -> subprocess.CompletedProcess:
    """`argv` with its output captured as text; LabError (naming the command and what it
    said) when it fails and `check` is set."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                          **kw)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the process, or to its whole group when it leads one (started with a session
    of its own), so that its children (nginx's workers, a shell's commands) go with it."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM, SIGKILL after `timeout`, reap, and close the pipes we hold."""
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def namespace_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def kill_namespace_processes(name: str, grace: float = 2.0) -> None:
    """SIGTERM whatever runs in the namespace, SIGKILL what is left after `grace` seconds."""
    def send(sig: int, targets: list[int]) -> None:
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    left = namespace_pids(name)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        send(sig, left)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = namespace_pids(name)


class Netns:
    """A named network namespace. `Netns(name)` only names one (to run things in or remove
    it); `Netns.create(prefix)` makes a new one with a unique name and its loopback up."""

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def create(cls, prefix: str = "oakt", name: str | None = None) -> "Netns":
        ns = cls(name or f"{prefix}{os.getpid() % 100000}x{next(_counter)}")
        run(["ip", "netns", "add", ns.name])
        try:
            ns.run("ip", "link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def exists(self) -> bool:
        return ns_path(self.name).exists()

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None, **kw) -> subprocess.CompletedProcess:
        return run(self.argv(*cmd), check=check, timeout=timeout, input=input, **kw)

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> str:
        return self.run("sh", "-ec", script, check=check, timeout=timeout).stdout

    def ip(self, *commands: str) -> None:
        """Several `ip` commands in one process (`ip -batch`)."""
        self.run("ip", "-batch", "-", input="\n".join(commands) + "\n")

    def sysctl(self, *settings: str) -> None:
        # `ip netns exec` remounts /sys and /proc/sys/net belongs to the caller's namespace.
        self.run("sysctl", "-q", "-w", *settings)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd), **kw)

    @contextmanager
    def inside(self) -> Iterator[None]:
        with inside(self.name):
            yield

    def socket(self, family: int, kind: int) -> socket.socket:
        """A socket that lives in this namespace."""
        with self.inside():
            return socket.socket(family, kind)

    def wait_links_up(self, names: list[str], timeout: float = 5) -> None:
        """Carrier comes a moment after `link set up` (the kernel's link watch): wait until
        every link in `names` is UP."""
        deadline = time.monotonic() + timeout
        while True:
            out = json.loads(self.run("ip", "-j", "link", "show").stdout)
            state = {link["ifname"]: link.get("operstate") for link in out}
            if all(state.get(n) == "UP" for n in names):
                return
            if time.monotonic() > deadline:
                raise LabError(f"links of {self.name} not up: {state}")
            time.sleep(0.02)

    def delete(self) -> bool:
        """End whatever still runs inside, then remove the namespace. False if it stays."""
        if not self.exists():
            return True
        kill_namespace_processes(self.name)
        return run(["ip", "netns", "del", self.name], check=False).returncode == 0


@contextmanager
def netns(prefix: str = "oakt") -> Iterator[Netns]:
    """A new namespace, removed on exit (also after a failure)."""
    ns = Netns.create(prefix)
    try:
        yield ns
    finally:
        ns.delete()


def veth(a: Netns, a_if: str, b: Netns, b_if: str, mtu: int | None = None) -> None:
    """A veth pair with one end in each namespace, both up."""
    run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if,
         "netns", b.name])
    for ns, ifname in ((a, a_if), (b, b_if)):
        if mtu:
            ns.run("ip", "link", "set", ifname, "mtu", str(mtu))
        ns.run("ip", "link", "set", ifname, "up")
