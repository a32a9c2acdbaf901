"""The durable exposure store on local disk, with TinyDB (docs/reliability.md, "Crash safety").

Memory holds each exposure once, as the immutable Exposure that reads hand out (state.py); the
files are TinyDB's, read with TinyDB's JSON storage.
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

The parts: state.py (memory and the replay of a change), records.py (journal records),
snapshot.py (the TinyDB file), load.py (snapshot + journals at open and for check), files.py
(durable directories, the lock); this module adds the threads:
commits, compaction in the background, and failed writes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gw.core.errors import InvalidInput, StoreCorrupt, StoreUnavailable
from gw.core.exposure import Exposure, Key

from .files import FileCalls, fsync_dir, segments, sibling, take_lock, why, write_all
from .load import Loaded, backup_problems, load
from .records import encode_record
from .snapshot import write_snapshot
from .state import Change, change_of

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """What a compaction writes: the exposures and meta as of journal seq `seq`."""
    exposures: list[Exposure]
    meta: dict
    seq: int
    bak_seq: int  # the seq of the snapshot that becomes .bak


class LocalStore:
    """The exposures and the gateway's metadata. Thread-safe.

    shared=False takes the store for writing (the daemon); shared=True opens it read-only next to
    other readers. fsync=False exists only to prove that the power-loss test catches a missing
    fsync.
    """

    #: A compaction starts when the current journal passes this size, or the last snapshot's size
    #: if that is larger: then a commit costs, amortised, O(its own size) in writes, and a replay
    #: at open reads at most about one snapshot's worth of journal.
    COMPACT_MIN_BYTES = 1 << 20

    def __init__(self, path: str | os.PathLike, *, shared: bool = False, fsync: bool = True,
                 calls: FileCalls | None = None,
                 on_poisoned: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.shared = shared
        self._fsync = fsync
        self._calls = calls or FileCalls()
        self._journal_path = sibling(self.path, ".journal")
        self._lock = threading.Lock()        # memory and the current journal
        self._compaction = threading.Lock()  # one compaction at a time, held until it is done
        self._journal_fd: int | None = None
        self._closed = False
        # Journal fdatasyncs made since the store opened (metrics: how well commits group).
        self.syncs = 0
        # Why the store takes no more changes (see _cut_failed_append); told to on_poisoned.
        self.poisoned: str | None = None
        self.on_poisoned = on_poisoned
        self._lock_fd = take_lock(self.path, shared=shared)
        try:
            loaded = load(self.path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._state = loaded.state
        self._snap_seq = loaded.snap_seq
        self._snap_size = loaded.snap_size
        self._journal_len = loaded.journal_len
        if not shared and loaded.replay_size > self._compact_threshold():
            self._compact_or_warn()

    # --- reading

    def exposures(self) -> list[Exposure]:
        """All exposures, sorted by key."""
        with self._lock:
            return list(self._state.sorted())

    def get(self, key: Key) -> Exposure | None:
        key = _as_key(key)
        if key is None:
            return None
        with self._lock:
            return self._state.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._state)

    def counts(self) -> Counter:
        """Exposures by (family, protocol), without copying or sorting them (metrics)."""
        with self._lock:
            return self._state.counts()

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def meta(self) -> dict:
        with self._lock:
            return self._state.copy_meta()

    # --- writing

    def commit(self, put: Iterable[Exposure] = (), delete: Iterable[Key] = (),
               meta: dict | None = None) -> None:
        """One atomic change: on disk (fsync'd) when this returns, or not applied at all (on disk
        nor in memory) and StoreUnavailable is raised. Deletes apply before puts."""
        put = list(put)
        change = change_of(put, delete, meta)
        if not change:
            return
        try:
            payload = json.dumps(change, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"the change cannot be stored as JSON: {e}") from None
        # Memory takes the change as replay will see it (the Exposures of the exact types their
        # documents decode to, meta back from JSON), so the two never differ.
        decoded = json.loads(payload)
        with self._lock:
            self._check_writable()
            self._append(encode_record(self._state.seq + 1, payload))
            shared = self._state.shared
            self._state.apply(Change([tuple(key) for key in decoded.get("delete", ())],
                                     [shared.exposure(e) for e in put],
                                     decoded.get("meta", {})), self._state.seq + 1)
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
            write_all(fd, record)
            written = True
            self._sync(fd)
        except OSError as e:
            self._cut_failed_append(whole=written)
            raise StoreUnavailable(f"cannot write the store's journal {self._journal_path}: "
                                   f"{why(e)}; the change was not applied") from e
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
                             f"durable in {self._journal_path} ({why(e)}); it may come back at "
                             "the next start, so no change is taken until the daemon restarts")
            log.critical("%s", self.poisoned)
            if self.on_poisoned is not None:
                self.on_poisoned(self.poisoned)

    def _truncate(self, fd: int, length: int) -> None:
        self._calls.truncate(fd, length)

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
            self.syncs += 1
            self._calls.sync(fd)

    def _sync_dir(self) -> None:
        if self._fsync:
            fsync_dir(self.path.parent)

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
            log.warning("store compaction failed, the journal keeps growing: %s", why(e))
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
                    if self._state.seq == self._snap_seq:
                        return
                    job = self._rotate()
                self._write_compaction(job)
            except OSError as e:
                raise StoreUnavailable(f"cannot compact the store {self.path}: {why(e)}") from e

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
            os.rename(self._journal_path, sibling(self.path, f".journal.{self._state.seq:012d}"))
            os.close(fd)  # not one more record into the segment, whatever happens next
            self._journal_fd, self._journal_len = None, 0
            self._sync_dir()
        state = self._state
        return _Job(state.sorted(), state.copy_meta(), state.seq, self._snap_seq)

    def _write_compaction(self, job: _Job) -> None:
        size = write_snapshot(self.path, job.exposures, {"journal_seq": job.seq, "meta": job.meta},
                               fsync=self._fsync)
        with self._lock:
            self._snap_seq, self._snap_size = job.seq, size
        # Journals the .bak holds are no longer needed by any snapshot.
        for seq, segment in segments(self.path):
            if seq <= job.bak_seq:
                segment.unlink(missing_ok=True)

    # --- health

    def check(self) -> list[str]:
        """Problems found in the files and in memory (empty: healthy). Never modifies anything."""
        with self._compaction, self._lock:
            try:
                loaded = load(self.path)
            except (StoreCorrupt, StoreUnavailable) as e:
                return [e.message]
            problems = self._memory_problems(loaded)
        return problems + backup_problems(self.path, loaded)

    def _memory_problems(self, loaded: Loaded) -> list[str]:
        problems = self._state.problems()
        if not self._state.same_as(loaded.state):
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

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_key(key) -> Key | None:
    return tuple(key) if isinstance(key, (tuple, list)) else None
