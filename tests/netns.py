"""Throwaway network namespaces for tests: created with a unique name, removed on exit (also
after a failure), with helpers to run commands and processes inside them."""

from __future__ import annotations

import itertools
import os
import subprocess
from contextlib import contextmanager

_counter = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}x{next(_counter)}"


class Netns:
    def __init__(self, prefix: str = "oakt"):
        self.name = _name(prefix)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*cmd), check=check, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd), **kw)

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> str:
        return self.run("sh", "-ec", script, check=check, timeout=timeout).stdout

    def delete(self) -> None:
        # Kill whatever still runs inside, then remove the namespace.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@contextmanager
def netns(prefix: str = "oakt"):
    ns = Netns(prefix)
    try:
        yield ns
    finally:
        ns.delete()


def veth(a: Netns, a_if: str, b: Netns, b_if: str, mtu: int | None = None) -> None:
    """A veth pair with one end in each namespace, both up."""
    subprocess.run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name",
                    b_if, "netns", b.name], check=True)
    for ns, ifname in ((a, a_if), (b, b_if)):
        if mtu:
            ns.run("ip", "link", "set", ifname, "mtu", str(mtu))
        ns.run("ip", "link", "set", ifname, "up")
