"""gw.store: round trips, the journal format, corruption handling, locks, failed writes, and a
hypothesis state machine that checks random commits/compactions/reopens/crashes against a model."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tinydb import TinyDB

import gw.store.files
import gw.store.state
import gw.store.local
import gw.store.snapshot
from gw.core.errors import InvalidInput, StoreCorrupt, StoreLocked, StoreUnavailable
from gw.core.exposure import Exposure, key_of
from gw.store.local import LocalStore
from gw.store.records import encode_record


def doc(port=8080, protocol="tcp", family="ipv4", ip=None, service_port=80, service_id=None):
    ip = ip or ("10.30.0.1" if family == "ipv4" else "fdff::1")
    return Exposure(port, protocol, ipaddress.ip_address(ip), service_port, service_id)


def key(e):
    return e.key


class SmallStore(LocalStore):
    """Compacts after a few hundred bytes of journal, so that tests go through compactions."""
    COMPACT_MIN_BYTES = 300


def crash(store: LocalStore) -> None:
    """What a kill -9 leaves behind: the files as they are (no compaction at close), the lock
    released. Reaches into the store, as only a test may."""
    with store._compaction:  # let a background compaction finish, as it would have
        if store._journal_fd is not None:
            os.close(store._journal_fd)
        os.close(store._lock_fd)
        store._closed = True


def files(directory) -> dict[str, bytes]:
    """The store's data files and their bytes (the lock file is not data)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "exposures.json"


def journal_of(path):
    return path.with_name(path.name + ".journal")


# --- basics -----------------------------------------------------------------------------------

def test_missing_store_opens_empty_and_creates_its_directory(path):
    with LocalStore(path) as store:
        assert path.parent.is_dir()
        assert store.exposures() == [] and len(store) == 0 and store.meta() == {}
        assert store.get(("ipv4", "tcp", 80)) is None and ("ipv4", "tcp", 80) not in store


def test_empty_files_open_empty(path):
    path.parent.mkdir()
    path.touch()
    journal_of(path).touch()
    with LocalStore(path) as store:
        assert len(store) == 0


def test_round_trip_sorted_and_reopened(path):
    docs = [doc(9000, family="ipv6"), doc(80, "udp"), doc(80), doc(443, service_id="web")]
    with LocalStore(path) as store:
        store.commit(put=docs)
        expected = sorted(docs, key=key)
        assert store.exposures() == expected
        assert store.get(("ipv4", "tcp", 443)) == doc(443, service_id="web")
        assert ("ipv6", "tcp", 9000) in store and ["ipv4", "udp", 80] in store
        assert len(store) == 4
    with LocalStore(path) as store:
        assert store.exposures() == expected


def test_put_replaces_the_whole_document(path):
    with LocalStore(path) as store:
        store.commit(put=[doc(80, service_id="old")])
        store.commit(put=[doc(80, ip="10.30.0.9")])
        assert store.exposures() == [doc(80, ip="10.30.0.9")]  # service_id is gone too


def test_delete_then_put_in_one_commit_and_deleting_a_missing_key(path):
    with LocalStore(path) as store:
        store.commit(put=[doc(80), doc(81)])
        store.commit(put=[doc(80, service_port=8)], delete=[("ipv4", "tcp", 80),
                                                            ("ipv4", "tcp", 81),
                                                            ("ipv6", "udp", 1)])
        assert store.exposures() == [doc(80, service_port=8)]
    with LocalStore(path) as store:
        assert store.exposures() == [doc(80, service_port=8)]


def test_meta_merges_and_none_deletes(path):
    with LocalStore(path) as store:
        store.commit(meta={"gateway_id": "g1", "internal_ipv4": "10.30.255.1"})
        store.commit(meta={"internal_ipv4": None, "internal_ipv6": "fdff::1"})
        assert store.meta() == {"gateway_id": "g1", "internal_ipv6": "fdff::1"}
    with LocalStore(path) as store:
        assert store.meta() == {"gateway_id": "g1", "internal_ipv6": "fdff::1"}


def test_what_a_read_returns_cannot_change_the_store(path):
    with LocalStore(path) as store:
        store.commit(put=[doc(80)], meta={"m": [1]})
        with pytest.raises(dataclasses.FrozenInstanceError):
            store.get(("ipv4", "tcp", 80)).service_port = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            store.exposures()[0].service_port = 3
        store.meta()["m"].append(2)
        assert store.get(("ipv4", "tcp", 80)) == doc(80) and store.meta() == {"m": [1]}


@pytest.mark.parametrize("bad", [
    {"put": [doc(0)]}, {"put": [doc(70000)]}, {"put": [doc(True)]}, {"put": [doc("80")]},
    {"put": [doc(protocol="sctp")]}, {"delete": [("ip", "tcp", 80)]},
    {"put": [doc(80).to_dict()]}, {"put": ["not a doc"]},
    {"put": [doc(80), doc(80, service_port=9)]}, {"delete": [("ipv4", "tcp")]},
    {"put": [doc(80, service_id=object())]}, {"meta": {"weight": float("nan")}},
    {"put": [doc(80, service_port="80")]}, {"put": [Exposure(80, "tcp", "10.30.0.1", 80)]},
    {"meta": {1: "x"}},
])
def test_an_invalid_commit_changes_nothing(path, bad):
    with LocalStore(path) as store:
        store.commit(put=[doc(1)])
        before = files(path.parent)
        with pytest.raises(InvalidInput):
            store.commit(**bad)
        assert store.exposures() == [doc(1)] and files(path.parent) == before


def test_get_uses_the_index_never_a_scan(path, monkeypatch):
    with LocalStore(path) as store:
        store.commit(put=[doc(p) for p in range(1, 200)])

        def scan(*_):
            raise AssertionError("listed every exposure")

        with monkeypatch.context() as patched:
            patched.setattr(gw.store.state.State, "sorted", scan)
            assert store.get(("ipv4", "tcp", 150)) == doc(150)
            assert ("ipv4", "tcp", 150) in store and ("ipv4", "tcp", 999) not in store


def test_commit_cost_does_not_grow_with_the_store(tmp_path):
    """TinyDB's own write path rewrites every document per change (~6 ms at 30k); ours appends
    one record. A ratio within one run, commits interleaved so both stores see the same noise:
    no wall-clock limit (absolute figures are in tests/bench)."""
    with LocalStore(tmp_path / "small.json", fsync=False) as small, \
            LocalStore(tmp_path / "big.json", fsync=False) as big:
        small.commit(put=[doc(p) for p in range(1, 11)])
        big.commit(put=[doc(p, protocol=proto, family=fam)
                        for fam in ("ipv4", "ipv6") for proto in ("tcp", "udp")
                        for p in range(1, 7501)])
        assert len(big) == 30000
        times = {"small": [], "big": []}
        for i in range(200):
            for name, store in (("small", small), ("big", big)):
                start = time.perf_counter()
                store.commit(put=[doc(1 + i, service_port=1 + i)])
                times[name].append(time.perf_counter() - start)
        ratio = statistics.median(times["big"]) / statistics.median(times["small"])
        assert ratio < 10, f"a commit at 30k documents costs {ratio:.1f}x one at 10"


def test_snapshot_is_a_plain_tinydb_file(path):
    with LocalStore(path) as store:
        store.commit(put=[doc(80), doc(53, "udp")], meta={"gateway_id": "g"})
    db = TinyDB(path, access_mode="r")
    assert sorted(db.table("exposures").all(), key=key_of) == [doc(80).to_dict(),
                                                                doc(53, "udp").to_dict()]
    assert db.table("store").all() == [{"journal_seq": 1, "meta": {"gateway_id": "g"}}]
    db.close()


def old_layout(exposures, seq, meta) -> bytes:
    """A snapshot as the store wrote it before it wrote a chunk of documents a line: the whole
    file on one line."""
    docs = {str(i): e.to_dict() for i, e in enumerate(exposures, 1)}
    return (json.dumps({"exposures": docs, "store": {"1": {"journal_seq": seq, "meta": meta}}})
            + "\n").encode()


def test_a_store_written_by_the_old_layout_opens_and_is_rewritten_readable(path):
    exposures = [doc(p, proto, fam, service_id=f"s{p % 3}") for fam in ("ipv4", "ipv6")
                 for proto in ("tcp", "udp") for p in range(1, 1201)]
    path.parent.mkdir(parents=True)
    path.write_bytes(old_layout(exposures, 2, {"gateway_id": "g"}))
    # The journal of the old code on top: seq 3 deletes one, puts one.
    journal_of(path).write_bytes(encode_record(3, json.dumps(
        {"delete": [["ipv4", "tcp", 1]], "put": [doc(9999).to_dict()]})))
    expected = sorted([e for e in exposures if e.key != ("ipv4", "tcp", 1)] + [doc(9999)],
                      key=key)
    with LocalStore(path) as store:
        assert store.exposures() == expected and store.meta() == {"gateway_id": "g"}
        assert store.check() == []
    # Closing compacted it into the new layout, which TinyDB and the store both read.
    assert path.read_text().count("\n") > 3
    db = TinyDB(path, access_mode="r")
    assert sorted(db.table("exposures").all(), key=key_of) == [e.to_dict() for e in expected]
    db.close()
    with LocalStore(path, shared=True) as store:
        assert store.exposures() == expected and store.meta() == {"gateway_id": "g"}


def test_a_file_written_by_tinydb_itself_opens(path):
    path.parent.mkdir(parents=True)
    db = TinyDB(path)
    db.table("exposures").insert_multiple([doc(80).to_dict(), doc(53, "udp").to_dict()])
    db.table("store").insert({"journal_seq": 0, "meta": {"gateway_id": "g"}})
    db.close()
    with LocalStore(path) as store:
        assert store.exposures() == [doc(80), doc(53, "udp")]
        assert store.meta() == {"gateway_id": "g"}


def test_damage_inside_a_chunk_line_is_corruption(path):
    with LocalStore(path) as store:
        store.commit(put=[doc(p) for p in range(1, 1200)])
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"exposed_port": 600', b'"exposed_port": "600"', 1)
    path.write_bytes(b"\n".join(lines))
    assert_corrupt_and_untouched(path, str(path), "document 600")


def test_exposures_that_share_a_service_ip_or_id_share_one_object(path):
    with LocalStore(path) as store:
        store.commit(put=[doc(p, service_id="web") for p in range(1, 4)])
        a, b = store.get(("ipv4", "tcp", 1)), store.get(("ipv4", "tcp", 2))
        assert a.service_ip is b.service_ip and a.service_id is b.service_id
    with LocalStore(path) as store:  # and after a reopen, from the snapshot
        a, c = store.get(("ipv4", "tcp", 1)), store.get(("ipv4", "tcp", 3))
        assert a.service_ip is c.service_ip and a.service_id is c.service_id


def test_commit_with_nothing_writes_nothing(path):
    with LocalStore(path) as store:
        store.commit()
        store.commit(put=[], delete=[], meta={})
        assert not journal_of(path).exists()


# --- the journal, torn records and corruption -------------------------------------------------

def committed_then_crashed(path, n=3, store_class=LocalStore):
    store = store_class(path)
    for port in range(1, n + 1):
        store.commit(put=[doc(port)])
    crash(store)
    return [doc(p) for p in range(1, n + 1)]


def test_the_journal_is_one_checksummed_line_per_commit(path):
    committed_then_crashed(path, n=2)
    lines = journal_of(path).read_bytes().splitlines()
    assert len(lines) == 2
    crc, seq, payload = lines[1].split(b" ", 2)
    assert int(crc, 16) == zlib.crc32(seq + b" " + payload) and seq == b"2"
    assert json.loads(payload) == {"put": [doc(2).to_dict()]}


@pytest.mark.parametrize("tail", [
    b"5f3a",                                     # the start of a record
    b"0000000a 4 {\"put\":[]}\n",                # a whole line with a bad checksum
    encode_record(4, '{"put":[]}')[:-1],  # all but the newline
    b"\0" * 300,                                 # blocks that never got their data
])
def test_a_torn_last_record_is_dropped_and_cut_at_the_next_write(path, tail):
    expected = committed_then_crashed(path)
    journal = journal_of(path)
    good = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(tail)
    with LocalStore(path) as store:
        assert store.exposures() == expected
        assert journal.read_bytes() == good + tail  # opening writes nothing
        store.commit(put=[doc(99)])
        data = journal.read_bytes()
        assert data.startswith(good)
        appended = data[len(good):]  # the torn tail was cut before the new record went in
        assert appended.count(b"\n") == 1 and appended.endswith(b"\n")
        assert appended.split(b" ")[1] == b"4"
        assert store.check() == []
        crash(store)
    with LocalStore(path) as store:
        assert store.exposures() == sorted(expected + [doc(99)], key=key)


def flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def assert_corrupt_and_untouched(path, *names):
    before = files(path.parent)
    with pytest.raises(StoreCorrupt) as exc:
        LocalStore(path)
    for name in names:
        assert name in exc.value.message
    assert files(path.parent) == before
    return exc.value.message


def test_a_bad_record_in_the_middle_is_corruption(path):
    committed_then_crashed(path)
    journal = journal_of(path)
    flip(journal, 20)  # inside the first record's JSON
    message = assert_corrupt_and_untouched(path, str(journal), "record 1", "checksum")
    assert "not the last one" in message


def test_a_missing_record_is_corruption(path):
    committed_then_crashed(path)
    journal = journal_of(path)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[2])
    assert_corrupt_and_untouched(path, str(journal), "seq 3 follows seq 1")


def test_a_record_going_back_in_seq_is_corruption(path):
    store = LocalStore(path)
    for port in range(1, 6):
        store.commit(put=[doc(port)])
    store.compact()
    store.commit(put=[doc(6)])
    crash(store)
    with open(journal_of(path), "ab") as f:  # e.g. a journal of another generation
        f.write(encode_record(3, json.dumps({"put": [doc(7).to_dict()]})))
    assert_corrupt_and_untouched(path, str(journal_of(path)), "seq 3 follows seq 6")


def test_an_unreadable_record_with_a_good_checksum_is_corruption(path):
    committed_then_crashed(path, n=1)
    journal_of(path).write_bytes(encode_record(1, '{"put":[{"x":1}]}'))
    assert_corrupt_and_untouched(path, str(journal_of(path)), "intact checksum")


@pytest.mark.parametrize("content, problem", [
    (b'{"exposures": {"1": {"exposed_', "not a valid JSON document"),
    (b"[1, 2]", "not a TinyDB database"),
    (b'{"exposures": {"1": {"port": 1}}}', "document 1"),
    (json.dumps({"exposures": {"1": doc(80).to_dict(), "2": doc(80).to_dict()}}).encode(), "a second document"),
    (json.dumps({"store": {"1": {"journal_seq": "x", "meta": {}}}}).encode(), "journal_seq"),
])
def test_an_unreadable_snapshot_is_corruption(path, content, problem):
    with LocalStore(path) as store:
        store.commit(put=[doc(80)])
    path.write_bytes(content)
    assert_corrupt_and_untouched(path, str(path), problem)


def test_a_snapshot_older_than_the_journals_is_corruption(path):
    with SmallStore(path) as store:
        for port in range(1, 40):
            store.commit(put=[doc(port)])
        store.compact()
        old = path.read_bytes()
        for port in range(40, 80):
            store.commit(put=[doc(port)])
        store.compact()
        store.compact()
        store.commit(put=[doc(1000)])
        crash(store)
    path.write_bytes(old)  # e.g. restored from a backup of the wrong day
    assert_corrupt_and_untouched(path, "records are missing")


def test_the_bak_snapshot_with_the_journals_recovers_everything(path):
    with SmallStore(path) as store:
        for port in range(1, 60):
            store.commit(put=[doc(port)], meta={"n": port})
            if port % 20 == 0:
                store.compact()
        expected, meta = store.exposures(), store.meta()
        assert path.with_name("exposures.json.bak").exists()
        assert store.check() == []
    path.write_bytes(b"garbage")
    assert_corrupt_and_untouched(path, str(path))
    os.replace(path.with_name("exposures.json.bak"), path)  # the documented recovery
    with LocalStore(path) as store:
        assert store.exposures() == expected and store.meta() == meta


# --- compaction --------------------------------------------------------------------------------

def test_background_compaction_keeps_everything(path):
    with SmallStore(path) as store:
        for port in range(1, 300):
            store.commit(put=[doc(port)], delete=[("ipv4", "tcp", port - 5)] if port > 5 else [])
        expected = store.exposures()
        with store._compaction:  # wait for one that may be running
            pass
        assert path.exists() and store.check() == []
        segments = [p for p in path.parent.iterdir() if ".journal." in p.name]
        assert len(segments) <= 2  # the ones since the .bak; older ones are deleted
        crash(store)
    with LocalStore(path) as store:
        assert store.exposures() == expected


def test_compaction_at_open_when_the_journal_is_large(path):
    committed_then_crashed(path, n=30)
    assert not path.exists()
    with SmallStore(path) as store:
        assert path.exists() and len(store) == 30
        assert json.loads(path.read_text())["store"]["1"]["journal_seq"] == 30


def test_close_compacts(path):
    committed_then_crashed(path, n=3)
    LocalStore(path).close()
    assert json.loads(path.read_text())["store"]["1"]["journal_seq"] == 3
    assert journal_of(path).exists() is False


def test_compaction_while_commits_go_on(path):
    """A compaction in another thread never loses or reorders a concurrent commit."""
    with LocalStore(path) as store:
        stop = threading.Event()

        def compact_all_the_time():
            while not stop.is_set():
                store.compact()

        compactor = threading.Thread(target=compact_all_the_time)
        compactor.start()
        model = {}  # what the commits say the store holds, independent of the store
        try:
            for i in range(400):
                change = doc(1 + i % 50, service_port=1 + i)
                store.commit(put=[change])
                model[change.exposed_port] = change
        finally:
            stop.set()
            compactor.join()
        expected = sorted(model.values(), key=lambda e: e.exposed_port)
        assert sorted(store.exposures(), key=lambda e: e.exposed_port) == expected
        crash(store)
    with LocalStore(path) as store:
        assert sorted(store.exposures(), key=lambda e: e.exposed_port) == expected
        assert store.check() == []


# --- check ---------------------------------------------------------------------------------------

def test_check_finds_damage_after_open_and_changes_nothing(path):
    committed_then_crashed(path, n=3)
    with LocalStore(path, shared=True) as store:
        assert store.check() == []
        flip(journal_of(path), 20)
        before = files(path.parent)
        problems = store.check()
        assert len(problems) == 1 and str(journal_of(path)) in problems[0]
        assert files(path.parent) == before


def test_check_finds_an_unusable_bak(path):
    with SmallStore(path) as store:
        for port in range(1, 30):
            store.commit(put=[doc(port)])
            store.compact()
        bak = path.with_name("exposures.json.bak")
        bak.write_bytes(b"{")
        assert any(str(bak) in problem for problem in store.check())


# --- locks ---------------------------------------------------------------------------------------

HOLDER = """
import sys
from gw.store.local import LocalStore
store = LocalStore(sys.argv[1], shared=sys.argv[2] == "shared")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def other_process(path):
    """Holds the store in a child process, exclusively or shared, until the test ends."""
    children = []

    def hold(mode):
        child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout.readline() == "held\n"
        return child

    yield hold
    for child in children:
        child.communicate(timeout=30)


@pytest.mark.parametrize("held, wanted", [("exclusive", False), ("exclusive", True),
                                          ("shared", False)])
def test_another_process_holding_the_store_locks_it(path, other_process, held, wanted):
    other_process(held)
    with pytest.raises(StoreLocked) as exc:
        LocalStore(path, shared=wanted)
    assert str(path.with_name("exposures.json.lock")) in exc.value.message


def test_readers_share_and_the_lock_goes_with_the_process(path, other_process):
    child = other_process("shared")
    with LocalStore(path, shared=True) as reader:
        assert len(reader) == 0
    child.communicate(timeout=30)
    with LocalStore(path) as writer:
        writer.commit(put=[doc(80)])


def test_a_second_open_in_the_same_process_is_locked_out_too(path):
    with LocalStore(path):
        with pytest.raises(StoreLocked):
            LocalStore(path)
        with pytest.raises(StoreLocked):
            LocalStore(path, shared=True)
    with LocalStore(path, shared=True), LocalStore(path, shared=True):
        with pytest.raises(StoreLocked):
            LocalStore(path)


def test_a_shared_store_is_read_only(path):
    with LocalStore(path) as store:
        store.commit(put=[doc(80)])
    before = files(path.parent)
    with LocalStore(path, shared=True) as reader:
        assert reader.exposures() == [doc(80)]
        with pytest.raises(StoreUnavailable, match="read-only"):
            reader.commit(put=[doc(81)])
        with pytest.raises(StoreUnavailable):
            reader.compact()
        assert reader.exposures() == [doc(80)]
    assert files(path.parent) == before


def test_commit_after_close_raises(path):
    store = LocalStore(path)
    store.close()
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.commit(put=[doc(80)])


# --- failed writes -------------------------------------------------------------------------------

class FailingOs:
    """The os module as the store's modules see it, with one function failing once with `err`; a failing
    write writes half of its data first, as a write into a full disk does."""

    def __init__(self, real, name, err, partial):
        self.real, self.name, self.err, self.partial, self.left = real, name, err, partial, 1

    def __getattr__(self, attr):
        function = getattr(self.real, attr)
        return self.failing(function) if attr == self.name else function

    def failing(self, function):
        def call(fd, *args):
            if not self.left:
                return function(fd, *args)
            self.left = 0
            if self.partial:
                function(fd, args[0][:len(args[0]) // 2])
            raise OSError(self.err, os.strerror(self.err))
        return call


def fail(monkeypatch, name, err, *, partial=False):
    failing = FailingOs(gw.store.local.os, name, err, partial)  # on top of an earlier one
    for module in (gw.store.local, gw.store.files, gw.store.snapshot):
        monkeypatch.setattr(module, "os", failing)


@pytest.mark.parametrize("name, err, partial", [("write", errno.ENOSPC, True),
                                                ("fdatasync", errno.EIO, False),
                                                ("open", errno.EROFS, False)])
def test_a_failed_write_changes_nothing_and_the_next_commit_works(path, monkeypatch, name, err,
                                                                  partial):
    committed = committed_then_crashed(path, n=2)
    with LocalStore(path) as store:
        journal = journal_of(path)
        before = journal.read_bytes()
        with monkeypatch.context() as m:
            fail(m, name, err, partial=partial)
            with pytest.raises(StoreUnavailable) as exc:
                store.commit(put=[doc(50)], delete=[("ipv4", "tcp", 1)], meta={"x": 1})
        assert errno.errorcode[err] in exc.value.message and str(journal) in exc.value.message
        assert store.exposures() == committed and store.meta() == {}
        assert journal.read_bytes() == before  # the half-written record was cut
        store.commit(put=[doc(60)])
        crash(store)
    with LocalStore(path) as store:
        assert store.exposures() == committed + [doc(60)] and store.meta() == {}


def test_a_record_left_by_a_failed_cut_is_cut_before_the_next_append(path, monkeypatch):
    committed = committed_then_crashed(path, n=1)
    with LocalStore(path) as store:
        store.commit(put=[doc(2)])  # the journal is open now
        with monkeypatch.context() as m:
            fail(m, "write", errno.EIO, partial=True)
            fail(m, "ftruncate", errno.EIO)
            with pytest.raises(StoreUnavailable):
                store.commit(put=[doc(50)])
        assert journal_of(path).read_bytes().count(b"\n") == 2  # the half record is still there
        store.commit(put=[doc(3)])
        crash(store)
    with LocalStore(path) as store:
        assert store.exposures() == committed + [doc(2), doc(3)]


def test_a_whole_record_that_could_not_be_synced_nor_cut_poisons_the_store(path, monkeypatch):
    """Issue 12, 8(a): the record is written whole, its fdatasync fails and so does the cut.
    The next open would replay it while memory lacks it, so the store takes no more changes
    (each refusal names the cause) and tells its owner once, who restarts."""
    committed = committed_then_crashed(path, n=1)
    told = []
    with LocalStore(path) as store:
        store.on_poisoned = told.append
        store.commit(put=[doc(2)])  # the journal is open now
        with monkeypatch.context() as m:
            fail(m, "fdatasync", errno.EIO)
            fail(m, "ftruncate", errno.EROFS)
            with pytest.raises(StoreUnavailable):
                store.commit(put=[doc(50)])
        assert len(told) == 1 and "EROFS" in told[0] and store.poisoned == told[0]
        with pytest.raises(StoreUnavailable, match="could not take back a record"):
            store.commit(put=[doc(3)])
        assert store.exposures() == committed + [doc(2)]
        crash(store)
    with LocalStore(path) as store:  # what a restart loads: the 503'd record is back
        assert store.exposures() == committed + [doc(2), doc(50)] and store.poisoned is None


def test_a_failed_compaction_loses_nothing(path, monkeypatch):
    with LocalStore(path) as store:
        store.commit(put=[doc(1)])
        store.compact()
        store.commit(put=[doc(2)])
        with monkeypatch.context() as m:
            fail(m, "replace", errno.ENOSPC)
            with pytest.raises(StoreUnavailable, match="ENOSPC"):
                store.compact()
        store.commit(put=[doc(3)])
        assert not path.with_name("exposures.json.tmp").exists()
        crash(store)
    with LocalStore(path) as store:
        assert store.exposures() == [doc(1), doc(2), doc(3)] and store.check() == []


# --- the model: random commits, compactions, reopens and crashes --------------------------------

keys = st.tuples(st.sampled_from(["ipv4", "ipv6"]), st.sampled_from(["tcp", "udp"]),
                 st.integers(1, 6))
documents = st.builds(
    lambda k, port, sid: doc(k[2], k[1], k[0], service_port=port, service_id=sid or None),
    keys, st.integers(1, 65535), st.none() | st.text(max_size=5))
metas = st.none() | st.dictionaries(st.sampled_from(["a", "b", "gateway_id"]),
                                    st.none() | st.integers() | st.text(max_size=3), max_size=2)


class StoreModel(RuleBasedStateMachine):
    """The store against a dict: after any sequence of commits, compactions, reopens and crashes
    (with or without a torn record), it holds exactly what was committed."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "exposures.json")
        self.store = SmallStore(self.path)
        self.docs, self.meta = {}, {}

    @rule(put=st.lists(documents, max_size=3, unique_by=key), delete=st.lists(keys, max_size=2),
          meta=metas)
    def commit(self, put, delete, meta):
        self.store.commit(put=put, delete=delete, meta=meta)
        for k in delete:
            self.docs.pop(k, None)
        self.docs.update((key(d), d) for d in put)
        for name, value in (meta or {}).items():
            if value is None:
                self.meta.pop(name, None)
            else:
                self.meta[name] = value

    @rule()
    def compact(self):
        self.store.compact()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = SmallStore(self.path)

    @rule(torn=st.sampled_from([b"", b"1234", b"ffffffff 99 {}\n"]))
    def crash_and_reopen(self, torn):
        crash(self.store)
        journal = self.path + ".journal"
        # Only an append leaves a torn record, and an append first cuts the one before.
        if not os.path.exists(journal) or os.path.getsize(journal) == self.store._journal_len:
            with open(journal, "ab") as f:
                f.write(torn)
        self.store = SmallStore(self.path)

    @invariant()
    def same_as_the_model(self):
        assert self.store.exposures() == sorted(self.docs.values(), key=key)
        assert self.store.meta() == self.meta and len(self.store) == len(self.docs)

    def teardown(self):
        try:
            assert self.store.check() == []
            self.store.close()
        finally:
            self.dir.cleanup()


StoreModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
test_store_model = StoreModel.TestCase
