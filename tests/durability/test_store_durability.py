"""Durability of gw.store: a writer process commits and acknowledges changes; it is killed -9,
or its filesystem loses everything not yet fsync'd (a loop-mounted ext4 shut down with
EXT4_IOC_SHUTDOWN / NOLOGFLUSH); then the store must hold every acknowledged change, and at most
the one in flight more. Disk full and read-only filesystems are real ones (tmpfs, a read-only
bind mount)."""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crashwriter import apply_changes
from gw.core.errors import StoreUnavailable
from gw.core.exposure import Exposure
from gw.store.local import LocalStore
from tests.fs import Ext4, fill, mount_namespace, require_tools

WRITER = Path(__file__).with_name("crashwriter.py")
ROUNDS = 50


def run_writer(path: Path, seed: int, seconds: float, *, power_loss=None, fsync=True) -> int:
    """Runs a writer for `seconds`, then kills it -9 and returns how many commits it
    acknowledged. With power_loss, the writer is frozen first (SIGSTOP: no syscall of it is in
    flight any more) and power_loss() called: like a machine that loses power, it acknowledges
    nothing after that. (Not freezing it lets an fsync that raced the ext4 shutdown return 0 for
    a transaction the shutdown threw away: an ack no real machine could have sent.)"""
    argv = [sys.executable, str(WRITER), str(path), str(seed)] + ([] if fsync else ["--no-fsync"])
    writer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(seconds)
        if power_loss:
            os.kill(writer.pid, signal.SIGSTOP)
            os.waitpid(writer.pid, os.WUNTRACED)
            power_loss()
    finally:
        writer.kill()
        out, err = writer.communicate(timeout=30)
    acks = [line for line in out.splitlines() if line.startswith("ack ")]
    assert acks == [f"ack {i}" for i in range(len(acks))], out
    assert writer.returncode == -signal.SIGKILL, f"the writer died by itself: {err}"
    return len(acks)


def state_of(path: Path) -> tuple[dict, dict]:
    # Read-only: a writer's close compacts, and the next round would start from a fresh
    # snapshot instead of the torn records this one left.
    with LocalStore(path, shared=True) as store:
        assert store.check() == []
        return {e.key: e for e in store.exposures()}, store.meta()


def expected_states(base: tuple[dict, dict], seed: int, acked: int):
    """What the store may hold: all acked changes, and maybe the one in flight."""
    for n in (acked, acked + 1):
        docs, meta = dict(base[0]), dict(base[1])
        apply_changes(docs, meta, seed, 0, n)
        yield docs, meta


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir())
            if p.is_file() and not p.name.endswith(".lock")}


def check_round(path: Path, base, seed: int, acked: int,
                carried: list | None = None) -> tuple[dict, dict]:
    left = store_bytes(path)
    got = state_of(path)
    assert store_bytes(path) == left, "reading the store changed it"
    if carried is not None and any(name.endswith(".journal") and data
                                   for name, data in left.items()):
        carried.append(seed)  # the next round starts on this journal, as a restart would
    assert got in list(expected_states(base, seed, acked)), (
        f"seed {seed}: {acked} changes acked, the store holds another state")
    return got


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_change(tmp_path):
    """Each round the writer continues on the store the last one left (torn records, rotated
    journals, half-written snapshots included)."""
    path = tmp_path / "exposures.json"
    rnd = random.Random(1)
    state, total = ({}, {}), 0
    carried: list[int] = []
    for seed in range(ROUNDS):
        acked = run_writer(path, seed, rnd.uniform(0.15, 0.6))
        state = check_round(path, state, seed, acked, carried)
        total += acked
    assert total > ROUNDS * 20, "the writer hardly wrote: the test proves little"
    assert len(carried) > ROUNDS // 2, f"only rounds {carried} left a journal for the next"


# --- power loss ----------------------------------------------------------------------------------

@pytest.fixture
def mount_ns():
    with mount_namespace() as ns:
        yield ns


@pytest.fixture
def ext4(mount_ns, tmp_path):
    require_tools("mkfs.ext4", "losetup")
    fs = None
    try:
        try:
            fs = Ext4(mount_ns, tmp_path)
            fs.mount()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot loop-mount an ext4 image here: {e.stderr.strip()}")
        yield fs
    finally:
        if fs is not None:
            fs.unmount()


@pytest.mark.slow
@pytest.mark.kernel
def test_power_loss_loses_no_acknowledged_change(ext4):
    path = ext4.path / "state" / "exposures.json"
    rnd = random.Random(2)
    state, total = ({}, {}), 0
    carried: list[int] = []
    for seed in range(ROUNDS):
        acked = run_writer(path, seed, rnd.uniform(0.15, 0.6), power_loss=ext4.shutdown)
        ext4.remount()
        state = check_round(path, state, seed, acked, carried)
        total += acked
    assert total > ROUNDS * 10, "the writer hardly wrote: the test proves little"
    assert len(carried) > ROUNDS // 2, f"only rounds {carried} left a journal for the next"


@pytest.mark.kernel
def test_the_power_loss_test_catches_a_missing_fsync(ext4):
    """The same harness with a store that does not fsync: acknowledged changes get lost (ext4
    commits its journal every 5 s, and nothing forces it sooner), and the check sees it."""
    caught = []
    for seed in range(3):
        path = ext4.path / f"nofsync{seed}" / "exposures.json"
        acked = run_writer(path, seed, 1.0, power_loss=ext4.shutdown, fsync=False)
        ext4.remount()
        assert acked > 0
        try:
            check_round(path, ({}, {}), seed, acked)
        except AssertionError:
            caught.append(seed)
    assert caught == [0, 1, 2], "a store without fsync survived a power loss: the test is blind"


# --- a full or read-only filesystem --------------------------------------------------------------

def exposure(port: int, service_id: str | None = None) -> Exposure:
    return Exposure(port, "udp", ipaddress.ip_address("10.30.0.1"), 1, service_id)


@pytest.mark.kernel
def test_a_full_disk_refuses_the_change_and_the_store_recovers(mount_ns, tmp_path):
    (tmp_path / "small").mkdir()
    mount_ns.run("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tmp_path / "small"))
    small = mount_ns.path(tmp_path / "small")
    path = small / "exposures.json"
    store = LocalStore(path)
    store.commit(put=[exposure(1), exposure(2)], meta={"gateway_id": "g"})
    journal = path.with_name("exposures.json.journal")
    journal_bytes = journal.read_bytes()
    filler = fill(small)
    # Bigger than what is left of the journal's last page: it is written in part, then fails.
    big = {"put": [exposure(p, service_id="x" * 200) for p in range(10, 100)],
           "delete": [("ipv4", "udp", 1)], "meta": {"full": True}}
    with pytest.raises(StoreUnavailable, match="ENOSPC"):
        store.commit(**big)
    assert store.exposures() == [exposure(1), exposure(2)]
    assert store.meta() == {"gateway_id": "g"}
    assert journal.read_bytes() == journal_bytes  # the partial record was cut
    store.close()  # its compaction fails: logged, nothing lost
    filler.unlink()
    with LocalStore(path) as store:
        assert store.exposures() == [exposure(1), exposure(2)]
        store.commit(**big)
    with LocalStore(path) as store:
        assert len(store) == 91 and store.meta() == {"gateway_id": "g", "full": True}


@pytest.mark.kernel
def test_a_read_only_filesystem_refuses_the_change_and_the_store_recovers(mount_ns, tmp_path):
    rw, view = tmp_path / "rw", tmp_path / "view"
    with LocalStore(rw / "exposures.json") as store:
        store.commit(put=[exposure(1)])
    view.mkdir()
    mount_ns.run("mount", "--bind", str(rw), str(view))
    mount_ns.run("mount", "-o", "remount,bind,ro", str(view))
    store = LocalStore(mount_ns.path(view) / "exposures.json")  # reading works
    assert store.exposures() == [exposure(1)]
    with pytest.raises(StoreUnavailable, match="EROFS"):
        store.commit(put=[exposure(2)])
    assert store.exposures() == [exposure(1)]
    mount_ns.run("mount", "-o", "remount,bind,rw", str(view))
    store.commit(put=[exposure(2)])
    store.close()
    with LocalStore(rw / "exposures.json") as store:
        assert store.exposures() == [exposure(1), exposure(2)]
