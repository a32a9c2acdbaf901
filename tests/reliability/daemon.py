"""The daemon under test: tests/api/harness.GatewayTestbed (the real `oakestra-gw serve` in a
throwaway network namespace, with a worker namespace behind a `goProxyTun` veth), plus what
the reliability tests need on top: reading the store while the daemon is down, the storm's
endpoints, a kill that leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from gw.store.local import LocalStore
from tests.api.harness import API_PORT, TOKEN, GatewayTestbed, docs_set  # noqa: F401 - re-exported

HOST = "127.0.0.1"


@contextlib.contextmanager
def gateway(workdir: Path, **kw):
    """A harness GatewayTestbed that is closed (daemon killed, namespaces deleted) on exit."""
    gw = GatewayTestbed(workdir, **kw)
    try:
        yield gw
    finally:
        gw.close()


def store_path(gw: GatewayTestbed) -> Path:
    return Path(gw.config["store"]["path"])


def stored_docs(path: Path) -> set[tuple]:
    """The store's exposures, read under a shared lock (the daemon must be down)."""
    with LocalStore(path, shared=True) as store:
        assert store.check() == [], store.check()
        return docs_set([e.to_dict() for e in store.exposures()])


def kill(gw: GatewayTestbed, sig: int = signal.SIGKILL) -> int:
    """Signal the daemon and reap it; returns its exit status."""
    if gw.proc is None:
        return 0
    if gw.proc.poll() is None:
        gw.proc.send_signal(sig)
    try:
        return gw.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        return gw.proc.wait(timeout=10)


def reap_orphans(gw: GatewayTestbed) -> None:
    """A daemon killed -9 leaves its `nft monitor` child behind (systemd's KillMode=mixed
    would end it): end every `nft monitor` in the daemon's namespace. Only while no daemon
    runs there."""
    assert gw.proc is None or gw.proc.poll() is not None, "the daemon still runs"
    pids = subprocess.run(["ip", "netns", "pids", gw.ns.name], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"nft", b"monitor"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
