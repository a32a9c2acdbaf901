"""The durable store of exposures (docs/reliability.md, "Crash safety").

TinyDB holds the documents in memory, with an index key -> doc_id so that lookups never scan.
Every commit appends one checksummed record to a journal and fsyncs it before it returns; a
compaction writes a TinyDB snapshot by atomic replace and starts a new journal. So a commit costs
the same whatever the number of exposures, and a change is on disk before it is acknowledged.

Files, for a store at ``exposures.json``:

``exposures.json``
    The snapshot, a TinyDB JSON file (plain ``TinyDB(path)`` reads it). Table ``exposures`` holds
    the documents, table ``store`` one document ``{"journal_seq": N, "meta": {...}}``: N is the
    last journal record the snapshot contains.
``exposures.json.journal``
    The records since the last compaction, one per line: ``<crc32 hex> <seq> <json>``, the
    checksum covering ``<seq> <json>``. Seqs count up by one from the first commit on.
``exposures.json.journal.<seq>``
    Earlier journals, named by their last seq. A compaction deletes those the *previous* snapshot
    holds, so the ``.bak`` snapshot plus the journals always hold everything too.
``exposures.json.bak``
    The previous snapshot (a hard link, taken at each compaction).
``exposures.json.lock``
    flock'd: exclusively by the daemon, shared by readers.
``exposures.json.tmp``
    A snapshot being written; a left-over one is harmless and overwritten.

Opening reads the snapshot and replays the journals. A torn last record of the current journal
(a crash mid-append) is dropped, and cut off at the next write. Any other damage raises
StoreCorrupt naming the file and the problem, and no file is changed.

Recovery, when StoreCorrupt names
- the snapshot: move it aside and copy ``exposures.json.bak`` in its place; the journals kept
  since that snapshot replay on top of it, so nothing is lost.
- a journal: move that journal and every later one aside; the store opens with the state before
  the damage, and the exposures changed since must be added again.
"""

from __future__ import annotations

from collections import Counter

import contextlib
import copy
import errno
import fcntl
import json
import logging
import operator
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from tinydb import TinyDB
from tinydb.storages import JSONStorage, MemoryStorage
from tinydb.table import Table

from gw.core.errors import InvalidInput, StoreCorrupt, StoreLocked, StoreUnavailable
from gw.core.exposure import FAMILIES, PROTOCOLS, Exposure, Key

log = logging.getLogger(__name__)

EXPOSURES_TABLE = "exposures"
STORE_TABLE = "store"
# Documents per json.dumps call when writing a snapshot: the background writer gives the GIL
# back between chunks, so a commit waits for one chunk, not for the whole snapshot.
SNAPSHOT_CHUNK = 500

_doc_key = operator.itemgetter("family", "protocol", "exposed_port")


# --- documents and changes -------------------------------------------------------------------

def _checked_key(key) -> Key:
    if (not isinstance(key, (tuple, list)) or len(key) != 3
            or key[0] not in FAMILIES or key[1] not in PROTOCOLS
            or type(key[2]) is not int or not 0 < key[2] < 65536):
        raise InvalidInput(f"not an exposure key (family, protocol, exposed_port): {key!r}")
    return (key[0], key[1], key[2])


def _key_of(doc) -> Key:
    try:
        key = _doc_key(doc)
    except (KeyError, TypeError):
        raise InvalidInput(f"an exposure needs family, protocol and exposed_port: {doc!r}") \
            from None
    return _checked_key(key)


def _decoded(doc) -> Exposure:
    """The Exposure a stored document holds; InvalidInput if it holds none."""
    key = _key_of(doc)
    try:
        exposure = Exposure.from_dict(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"not an exposure document ({type(e).__name__}: {e}): {doc!r}") \
            from None
    if exposure.key != key:
        raise InvalidInput(f"family {key[0]} does not match service_ip: {doc!r}")
    return exposure


def _change(put: Iterable[Exposure], delete: Iterable[Key], meta: Mapping | None) -> dict:
    """The validated change as it goes into a journal record; {} when there is nothing to do."""
    given = list(put)
    if not all(isinstance(e, Exposure) for e in given):
        raise InvalidInput("put takes Exposures")
    docs = [e.to_dict() for e in given]
    keys = [_key_of(doc) for doc in docs]
    if len(set(keys)) != len(keys):
        raise InvalidInput("the same exposure key twice in one commit")
    change: dict = {}
    deletes = [list(_checked_key(key)) for key in delete]
    if deletes:
        change["delete"] = deletes
    if docs:
        change["put"] = [dict(doc) for doc in docs]
    if meta:
        if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
            raise InvalidInput("meta must be a mapping with string keys")
        change["meta"] = dict(meta)
    return change


def _checked_change(change) -> dict:
    """A change read back from a journal record has the shape _change gives it."""
    if not isinstance(change, dict) or not set(change) <= {"put", "delete", "meta"}:
        raise ValueError("not a change record")
    for doc in change.get("put", ()):
        _decoded(doc)
    for key in change.get("delete", ()):
        _checked_key(key)
    if not isinstance(change.get("meta", {}), dict):
        raise ValueError("meta is not an object")
    return change


def _merge_meta(meta: dict, update: Mapping) -> None:
    for name, value in update.items():
        if value is None:
            meta.pop(name, None)
        else:
            meta[name] = value


def _apply_to(docs: dict[Key, dict], meta: dict, change: Mapping) -> None:
    """Replay of one change on plain dicts (Store._apply does the same on TinyDB)."""
    for key in change.get("delete", ()):
        docs.pop(tuple(key), None)
    for doc in change.get("put", ()):
        docs[_key_of(doc)] = doc
    _merge_meta(meta, change.get("meta", {}))


# --- journal records ---------------------------------------------------------------------------

class _BadFrame(ValueError):
    """A record that is incomplete or fails its checksum: a torn write if it is the last one."""


def _encode_record(seq: int, payload: str) -> bytes:
    body = f"{seq} {payload}".encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _decode_record(line: bytes) -> tuple[int, dict]:
    crc, _, body = line.partition(b" ")
    try:
        intact = len(crc) == 8 and int(crc, 16) == zlib.crc32(body)
    except ValueError:
        intact = False
    if not intact:
        raise _BadFrame("checksum mismatch")
    seq, _, payload = body.partition(b" ")
    return int(seq), _checked_change(json.loads(payload))


@dataclass
class _Record:
    seq: int
    change: dict
    size: int


@dataclass
class _JournalFile:
    records: list[_Record]
    good_len: int  # bytes of intact records; a torn tail lies beyond


def _read_journal(path: Path, *, torn_tail_ok: bool) -> _JournalFile:
    data = _read_bytes(path)
    records: list[_Record] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        try:
            if end < 0:
                raise _BadFrame("incomplete record")
            seq, change = _decode_record(data[pos:end])
        except _BadFrame as e:
            if torn_tail_ok and (end < 0 or end + 1 == len(data)):
                break
            raise _corrupt(path, f"record {len(records) + 1} at byte {pos}: {e}, "
                                 "and it is not the last one") from None
        except (ValueError, InvalidInput) as e:
            raise _corrupt(path, f"record {len(records) + 1} at byte {pos} has an intact "
                                 f"checksum but cannot be read: {e}") from None
        records.append(_Record(seq, change, end + 1 - pos))
        pos = end + 1
    return _JournalFile(records, pos)


# --- files -------------------------------------------------------------------------------------

def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _segments(path: Path) -> list[tuple[int, Path]]:
    """The earlier journals, oldest first."""
    prefix = path.name + ".journal."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreUnavailable(f"cannot list {path.parent}: {_why(e)}") from e
    return sorted((int(name[len(prefix):]), path.parent / name) for name in names
                  if name.startswith(prefix) and name[len(prefix):].isdigit())


def _why(e: OSError) -> str:
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    return f"{e.strerror} ({code})" if e.strerror and code else str(e)


def _corrupt(path: Path, problem: str) -> StoreCorrupt:
    return StoreCorrupt(f"{path}: {problem}. The store was not opened and no file was changed "
                        "(see 'Recovery' in the store documentation).")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {_why(e)}") from e


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(directory: Path) -> None:
    """Creates the store's directory, durably, if it is missing."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    _fsync_dir(directory.parent)


@dataclass
class _Snapshot:
    docs: dict[Key, dict]
    meta: dict
    seq: int
    size: int


def _read_snapshot(path: Path) -> _Snapshot:
    """Reads a snapshot with TinyDB's own JSON storage; a missing or empty file: an empty store."""
    try:
        storage = JSONStorage(str(path), access_mode="r", encoding="utf-8")
    except FileNotFoundError:
        return _Snapshot({}, {}, 0, 0)
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {_why(e)}") from e
    try:
        tables = storage.read() or {}
        size = path.stat().st_size
    except ValueError as e:
        raise _corrupt(path, f"not a valid JSON document ({e})") from None
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {_why(e)}") from e
    finally:
        storage.close()
    if not isinstance(tables, dict):
        raise _corrupt(path, "not a TinyDB database (the top level is not an object)")
    docs = _snapshot_docs(path, tables.get(EXPOSURES_TABLE, {}))
    # A TinyDB file without our table (written by hand) is a snapshot of seq 0 without meta.
    table = tables.get(STORE_TABLE, {})
    store = table.get("1", {"journal_seq": 0, "meta": {}}) if isinstance(table, dict) else None
    if not (isinstance(store, dict) and type(store.get("journal_seq")) is int
            and store["journal_seq"] >= 0 and isinstance(store.get("meta"), dict)):
        raise _corrupt(path, f"table {STORE_TABLE!r} does not hold a journal_seq and a meta")
    return _Snapshot(docs, store["meta"], store["journal_seq"], size)


def _snapshot_docs(path: Path, table) -> dict[Key, dict]:
    if not isinstance(table, dict):
        raise _corrupt(path, f"table {EXPOSURES_TABLE!r} is not an object")
    docs: dict[Key, dict] = {}
    for doc_id, doc in table.items():
        try:
            key = _decoded(doc).key
        except InvalidInput as e:
            raise _corrupt(path, f"document {doc_id}: {e.message}") from None
        if key in docs:
            raise _corrupt(path, f"document {doc_id}: a second document for {key}")
        docs[key] = doc
    return docs


def _write_snapshot(path: Path, docs: list[dict], store_doc: dict, *, fsync: bool) -> int:
    """Writes a TinyDB file by atomic replace; the previous one stays as .bak. Returns its size."""
    tmp = _sibling(path, ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f'{{"{EXPOSURES_TABLE}": {{')
            for start in range(0, len(docs), SNAPSHOT_CHUNK):
                chunk = {str(doc_id): doc for doc_id, doc in
                         enumerate(docs[start:start + SNAPSHOT_CHUNK], start + 1)}
                f.write(("" if start == 0 else ", ") + json.dumps(chunk)[1:-1])
            f.write(f'}}, "{STORE_TABLE}": {json.dumps({"1": store_doc})}}}\n')
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        _keep_backup(path)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return size


def _keep_backup(path: Path) -> None:
    """Makes the current snapshot the .bak one. A hard link: it costs nothing whatever its size,
    and the snapshot is never written in place, only replaced."""
    if not path.exists():
        return
    bak, tmp = _sibling(path, ".bak"), _sibling(path, ".bak.tmp")
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    os.replace(tmp, bak)


# --- loading -----------------------------------------------------------------------------------

@dataclass
class _Loaded:
    docs: dict[Key, dict]
    meta: dict
    seq: int            # the last change applied
    snap_seq: int       # the last change the snapshot holds
    snap_size: int
    journal_len: int    # intact bytes of the current journal
    replay_size: int    # journal bytes replayed on top of the snapshot


def _load(path: Path, snapshot: Path | None = None) -> _Loaded:
    """The state the files hold: the snapshot (or another one, e.g. the .bak) plus the journals.
    Raises StoreCorrupt (or StoreUnavailable if a file cannot be read), and never writes."""
    snap = _read_snapshot(snapshot or path)
    state = _Loaded(snap.docs, snap.meta, snap.seq, snap.seq, snap.size, 0, 0)
    current = _sibling(path, ".journal")
    for segment in [p for _, p in _segments(path)] + [current]:
        journal = _read_journal(segment, torn_tail_ok=segment == current)
        for record in journal.records:
            if record.seq <= snap.seq and state.seq == snap.seq:
                continue  # the snapshot holds it
            if record.seq != state.seq + 1:
                snap_path = snapshot or path
                if state.seq == snap.seq == snap.size == 0 and _sibling(path, ".bak").exists():
                    # A compacted store always has a snapshot: this one was lost or emptied,
                    # not the journal's head.
                    raise _corrupt(snap_path, f"is {'empty' if snap_path.exists() else 'missing'}"
                                              f", but the store was compacted before (a .bak "
                                              f"exists) and {segment.name} continues from seq "
                                              f"{record.seq}")
                raise _corrupt(segment, f"record seq {record.seq} follows seq {state.seq} (the "
                                        f"snapshot holds up to {snap.seq}): records are missing")
            _apply_to(state.docs, state.meta, record.change)
            state.seq = record.seq
            state.replay_size += record.size
    state.journal_len = journal.good_len  # of the current journal, read last
    return state


# --- TinyDB in memory ---------------------------------------------------------------------------

class _IntKeyed(MutableMapping):
    """A raw TinyDB table (str ids, as the storage holds them) seen with int ids, as the
    updaters of Table expect them."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict):
        self.raw = raw

    def __getitem__(self, doc_id: int):
        return self.raw[str(doc_id)]

    def __setitem__(self, doc_id: int, doc) -> None:
        self.raw[str(doc_id)] = doc

    def __delitem__(self, doc_id: int) -> None:
        del self.raw[str(doc_id)]

    def __iter__(self) -> Iterator[int]:
        return map(int, self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class _InPlaceTable(Table):
    """TinyDB's Table rebuilds the whole table dict on every write: O(n) per document.
    Ours lives in a MemoryStorage, so the change is applied to it in place: O(1) per document."""

    def _update_table(self, updater) -> None:
        tables = self._storage.read()
        updater(_IntKeyed(tables.setdefault(self.name, {})))
        self.clear_cache()


class _MemoryDB(TinyDB):
    table_class = _InPlaceTable


@dataclass
class _Job:
    """What a compaction writes: the documents and meta as of journal seq `seq`."""
    docs: list[dict]
    meta: dict
    seq: int
    bak_seq: int  # the seq of the snapshot that becomes .bak


# --- the store ---------------------------------------------------------------------------------

class Store:
    """The exposures and the gateway's metadata. Thread-safe.

    shared=False takes the store for writing (the daemon); shared=True opens it read-only next to
    other readers. fsync=False exists only to prove that the power-loss test catches a missing
    fsync.
    """

    #: A compaction starts when the current journal passes this size, or the last snapshot's size
    #: if that is larger: then a commit costs, amortised, O(its own size) in writes, and a replay
    #: at open reads at most about one snapshot's worth of journal.
    COMPACT_MIN_BYTES = 1 << 20

    def __init__(self, path: str | os.PathLike, *, shared: bool = False, fsync: bool = True):
        self.path = Path(path)
        self.shared = shared
        self._fsync = fsync
        self._journal_path = _sibling(self.path, ".journal")
        self._lock = threading.Lock()        # memory and the current journal
        self._compaction = threading.Lock()  # one compaction at a time, held until it is done
        self._journal_fd: int | None = None
        self._closed = False
        # Why the store takes no more changes (see _cut_failed_append); told to on_poisoned.
        self.poisoned: str | None = None
        self.on_poisoned: Callable[[str], None] | None = None
        self._lock_fd = self._take_lock()
        try:
            loaded = _load(self.path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._load_memory(loaded)
        if not shared and loaded.replay_size > self._compact_threshold():
            self._compact_or_warn()

    def _take_lock(self) -> int:
        lock_path = _sibling(self.path, ".lock")
        try:
            _make_dir(self.path.parent)
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreUnavailable(f"cannot open the store's lock file {lock_path}: "
                                   f"{_why(e)}") from e
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ("another process holds it for writing (the oakestra-gw daemon?)"
                      if self.shared else "another process holds it (another oakestra-gw "
                                          "daemon, or a CLI command reading the store?)")
            raise StoreLocked(f"the store {self.path} is in use: {lock_path} is locked; "
                              f"{holder}") from None
        return fd

    def _load_memory(self, loaded: _Loaded) -> None:
        self._db = _MemoryDB(storage=MemoryStorage)
        self._db.storage.write({})
        self._table = self._db.table(EXPOSURES_TABLE)
        doc_ids = self._table.insert_multiple(loaded.docs.values())
        self._index: dict[Key, int] = dict(zip(loaded.docs, doc_ids))
        # The documents decoded once, so that reads hand out (immutable) Exposures at no cost.
        self._exposures = {key: Exposure.from_dict(doc) for key, doc in loaded.docs.items()}
        self._meta = loaded.meta
        self._seq = loaded.seq
        self._snap_seq = loaded.snap_seq
        self._snap_size = loaded.snap_size
        self._journal_len = loaded.journal_len

    # --- reading

    def exposures(self) -> list[Exposure]:
        """All exposures, sorted by key."""
        with self._lock:
            items = list(self._exposures.items())
        items.sort(key=_first)
        return [e for _, e in items]

    def get(self, key: Key) -> Exposure | None:
        with self._lock:
            return self._exposures.get(_as_key(key))

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def counts(self) -> Counter:
        """Exposures by (family, protocol), without copying or sorting them (metrics)."""
        with self._lock:
            docs = self._raw_docs()
        return Counter((d["family"], d["protocol"]) for d in docs)

    def __contains__(self, key) -> bool:
        with self._lock:
            return _as_key(key) in self._index

    def meta(self) -> dict:
        with self._lock:
            return copy.deepcopy(self._meta)

    def _raw_docs(self) -> list[dict]:
        """Under self._lock: all documents as TinyDB holds them. They are never changed in place
        (a put inserts a new dict), so this list stays a consistent picture after the lock is
        released; building it copies only references, where copying the documents would hold
        the lock far longer."""
        return list(self._db.storage.read()[EXPOSURES_TABLE].values())

    # --- writing

    def commit(self, put: Iterable[dict] = (), delete: Iterable[Key] = (),
               meta: dict | None = None) -> None:
        """One atomic change: on disk (fsync'd) when this returns, or not applied at all (on disk
        nor in memory) and StoreUnavailable is raised. Deletes apply before puts."""
        change = _change(put, delete, meta)
        if not change:
            return
        try:
            payload = json.dumps(change, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"the change cannot be stored as JSON: {e}") from None
        # Memory takes the change as replay will see it, so the two never differ.
        change = json.loads(payload)
        with self._lock:
            self._check_writable()
            self._append(_encode_record(self._seq + 1, payload))
            self._seq += 1
            self._apply(change)
            self._maybe_compact()

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"the store {self.path} is closed")
        if self.shared:
            raise StoreUnavailable(f"the store {self.path} is open read-only (shared)")
        if self.poisoned:
            raise StoreUnavailable(self.poisoned)

    def _append(self, record: bytes) -> None:
        written = False
        try:
            fd = self._journal_fd if self._journal_fd is not None else self._open_journal()
            if os.fstat(fd).st_size != self._journal_len:
                # A torn record from a crash, or what a failed append left behind.
                self._truncate(fd, self._journal_len)
            _write_all(fd, record)
            written = True
            self._sync(fd)
        except OSError as e:
            self._cut_failed_append(whole=written)
            raise StoreUnavailable(f"cannot write the store's journal {self._journal_path}: "
                                   f"{_why(e)}; the change was not applied") from e
        self._journal_len += len(record)

    def _cut_failed_append(self, *, whole: bool) -> None:
        """Removes a failed record at once, so that it can neither be written back later and
        replayed after a crash. Should this fail too: a torn record is dropped at replay and
        cut before the next append; a whole one (its sync failed) would be replayed at the
        next open while memory lacks it, so the store is poisoned: it takes no more changes."""
        if self._journal_fd is None:
            return
        try:
            self._truncate(self._journal_fd, self._journal_len)
        except OSError as e:
            if not whole:
                return
            self.poisoned = (f"the store could not take back a record it could not make "
                             f"durable in {self._journal_path} ({_why(e)}); it may come back at "
                             "the next start, so no change is taken until the daemon restarts")
            log.critical("%s", self.poisoned)
            if self.on_poisoned is not None:
                self.on_poisoned(self.poisoned)

    def _truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def _open_journal(self) -> int:
        fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            self._sync_dir()  # the journal's name must be durable before a record in it is acked
        except OSError:
            os.close(fd)
            raise
        self._journal_fd = fd
        return fd

    def _sync(self, fd: int) -> None:
        if self._fsync:
            os.fdatasync(fd)

    def _sync_dir(self) -> None:
        if self._fsync:
            _fsync_dir(self.path.parent)

    def _apply(self, change: Mapping) -> None:
        for key in change.get("delete", ()):
            doc_id = self._index.pop(tuple(key), None)
            if doc_id is not None:
                self._table.remove(doc_ids=[doc_id])
                del self._exposures[tuple(key)]
        for doc in change.get("put", ()):
            exposure = Exposure.from_dict(doc)
            key = exposure.key
            if key in self._index:
                self._table.remove(doc_ids=[self._index[key]])
            self._index[key] = self._table.insert(doc)
            self._exposures[key] = exposure
        _merge_meta(self._meta, change.get("meta", {}))

    # --- compaction

    def _compact_threshold(self) -> int:
        return max(self.COMPACT_MIN_BYTES, self._snap_size)

    def _maybe_compact(self) -> None:
        """After a commit (under self._lock): when the journal is big, rotate it and write the
        snapshot in a background thread, so no commit waits for a whole-store write."""
        if self._journal_len < self._compact_threshold() or not self._compaction.acquire(False):
            return
        try:
            job = self._rotate()
            threading.Thread(target=self._compact_in_background, args=(job,),
                             name="store-compaction", daemon=True).start()
        except (OSError, RuntimeError) as e:
            self._compaction.release()
            log.warning("store compaction not started, the journal keeps growing: %s", e)

    def _compact_in_background(self, job: _Job) -> None:
        try:
            self._write_compaction(job)
        except OSError as e:
            log.warning("store compaction failed, the journal keeps growing: %s", _why(e))
        except StoreUnavailable as e:
            log.warning("store compaction failed, the journal keeps growing: %s", e.message)
        finally:
            self._compaction.release()

    def compact(self) -> None:
        """Writes a snapshot of everything committed and starts a new journal (waits for a
        compaction already running)."""
        self._check_writable()
        with self._compaction:
            try:
                with self._lock:
                    if self._seq == self._snap_seq:
                        return
                    job = self._rotate()
                self._write_compaction(job)
            except OSError as e:
                raise StoreUnavailable(f"cannot compact the store {self.path}: {_why(e)}") from e

    def _compact_or_warn(self) -> None:
        try:
            self.compact()
        except StoreUnavailable as e:
            log.warning("%s (the journal keeps everything; nothing is lost)", e.message)

    def _rotate(self) -> _Job:
        """Under self._lock: the journal so far becomes a segment named by its last seq, new
        commits go to a fresh one, and the compaction gets a copy of memory as of now."""
        if self._journal_len:
            fd = self._journal_fd if self._journal_fd is not None else self._open_journal()
            if os.fstat(fd).st_size != self._journal_len:
                os.ftruncate(fd, self._journal_len)  # only the current journal may end torn
                self._sync(fd)
            os.rename(self._journal_path, _sibling(self.path, f".journal.{self._seq:012d}"))
            os.close(fd)  # not one more record into the segment, whatever happens next
            self._journal_fd, self._journal_len = None, 0
            self._sync_dir()
        return _Job(self._raw_docs(), copy.deepcopy(self._meta), self._seq, self._snap_seq)

    def _write_compaction(self, job: _Job) -> None:
        size = _write_snapshot(self.path, job.docs, {"journal_seq": job.seq, "meta": job.meta},
                               fsync=self._fsync)
        with self._lock:
            self._snap_seq, self._snap_size = job.seq, size
        # Journals the .bak holds are no longer needed by any snapshot.
        for seq, segment in _segments(self.path):
            if seq <= job.bak_seq:
                segment.unlink(missing_ok=True)

    # --- health

    def check(self) -> list[str]:
        """Problems found in the files and in memory (empty: healthy). Never modifies anything."""
        with self._compaction, self._lock:
            try:
                loaded = _load(self.path)
            except (StoreCorrupt, StoreUnavailable) as e:
                return [e.message]
            problems = self._memory_problems(loaded)
        return problems + _backup_problems(self.path, loaded)

    def _memory_problems(self, loaded: _Loaded) -> list[str]:
        problems = []
        if len(self._table) != len(self._index):
            problems.append(f"the index holds {len(self._index)} keys, the table "
                            f"{len(self._table)} documents")
        for key, doc_id in self._index.items():
            doc = self._table.get(doc_id=doc_id)
            if doc is None or _doc_key(doc) != key:
                problems.append(f"the index maps {key} to document {doc_id}, which is {doc}")
        memory = {key: dict(self._table.get(doc_id=doc_id)) for key, doc_id in self._index.items()}
        if memory != loaded.docs or self._meta != loaded.meta:
            problems.append(f"the files at {self.path} hold another state than memory")
        return problems

    # --- closing

    def close(self) -> None:
        """Compacts (a writer), then releases the lock. Data is safe even if compaction fails."""
        if self._closed:
            return
        if not self.shared:
            self._compact_or_warn()
        with self._compaction, self._lock:
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
            os.close(self._lock_fd)
            self._closed = True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_first = operator.itemgetter(0)


def _as_key(key) -> Key | None:
    return tuple(key) if isinstance(key, (tuple, list)) else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _backup_problems(path: Path, loaded: _Loaded) -> list[str]:
    """The .bak with the journals kept since it must give the same state: the recovery path."""
    bak = _sibling(path, ".bak")
    if not bak.exists():
        return []
    try:
        fallback = _load(path, snapshot=bak)
    except (StoreCorrupt, StoreUnavailable) as e:
        return [f"the fallback {bak} is not usable: {e.message}"]
    if (fallback.docs, fallback.meta) != (loaded.docs, loaded.meta):
        return [f"the fallback {bak} with the journals gives another state than {path}"]
    return []
