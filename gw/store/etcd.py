"""The exposure table on etcd, shared by every gateway that names the same endpoints and prefix
(docs/high-availability.md). Implements the Store protocol.

Memory holds the table as this gateway last learnt it: each exposure with the revision it was
written at, and for keys it learnt are gone (its own deletes, a refused commit's read) the
revision they were seen absent at, until the watch has passed it. Every piece of news carries
a revision, and news older than what is held for that key is dropped: so the watch, this
gateway's own commits and the reads of refused commits can arrive in any order.

A commit is one etcd transaction comparing every key it touches with memory (see
`etcd_keys.commit_txn`); acknowledged only once etcd answers that it committed (a quorum has
it). A refused transaction raises `Outdated` with what is there now. etcd unreachable or
without quorum: StoreUnavailable naming the cause, nothing changed.

Metadata (the gateway id, its addresses) is this gateway's own: it lives in a LocalStore at
[store] path, which also keeps the local copy of the last table and its revision, so that the
gateway can start and forward while etcd is unreachable.

A store at that path that has never followed etcd (no revision in its meta) and holds
exposures is a single gateway's own table, that gateway now joining a pair: before anything
else it is added to the shared table (`_import_own`), or, should a port there have another
target, nothing is imported and the gateway serves its own table, refusing changes, until an
operator settles the conflict. Only then does the store become a copy of etcd's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from gw.core.errors import GatewayError, StoreUnavailable
from gw.core.exposure import FAMILIES, PROTOCOLS, Exposure, Key

from . import etcd_client as ec
from .etcd_keys import commit_txn, key_from, read_kv, table_prefix
from .local import LocalStore
from .protocol import Learnt, Outdated
from .state import change_of

log = logging.getLogger(__name__)

#: The local copy's own meta entry: the etcd revision its exposures are as of.
REVISION_META = "etcd_revision"

#: Exposures per transaction when a gateway's own table is imported: etcd's default
#: --max-txn-ops, so that any cluster takes it (the import runs once; its speed hardly matters).
IMPORT_CHUNK = 128

#: Conflicting ports named in the message when an import is refused.
NAMED_CONFLICTS = 5


class EtcdStore:
    def __init__(self, client: ec.EtcdClient, prefix: str, local: LocalStore):
        self.client = client
        self.prefix = prefix
        self.local = local
        self.on_poisoned: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._held: dict[Key, tuple[Exposure | None, int]] = {}  # key -> (exposure, revision)
        self._sorted: list[Exposure] | None = None
        self.revision = 0           # everything up to here has been learnt
        self.unreachable: str | None = None  # why the last read or write of etcd failed
        # When a commit last found etcd unreachable: for a while after, commits are refused at
        # once (see _commit_table).
        self._lost_at: float | None = None
        self.retry_after = client.timeout
        self._copy_ok = True
        self._closed = False
        # A single gateway's own table, not yet in etcd (see the module's doc).
        self._own: list[Exposure] = []

    # --- opening

    def open(self) -> EtcdStore:
        """The table from etcd; should etcd not answer, from the local copy (`unreachable`
        says why, and the follower reads etcd again as soon as it can)."""
        if REVISION_META not in self.local.meta():
            self._own = self.local.exposures()
        try:
            self.read_all()
        except StoreUnavailable as e:
            self.unreachable = e.message
            copy = self.local.exposures()
            with self._lock:
                self._held = {x.key: (x, 0) for x in copy}
                self._sorted = None
                self.revision = int(self.local.meta().get(REVISION_META, 0))
            log.warning("the shared table was not read (%s): serving the local copy of it "
                        "(%d exposures, revision %d) until it does", e.message, len(copy),
                        self.revision)
        return self

    def read_all(self) -> list[Learnt]:
        """Reads the whole table at one revision and holds it instead of what was held, but
        for what was learnt at a later revision meanwhile (a commit racing the read): returns
        what changed. StoreUnavailable when etcd does not answer. Safe beside commits, so the
        caller need not hold commits back while etcd is slow to answer."""
        if self._own:
            self._import_own()
        revision, fresh = self._range_table()
        with self._lock:
            old = {k: e for k, (e, _) in self._held.items() if e is not None}
            later = {k: held for k, held in self._held.items() if held[1] > revision}
            merged = {**fresh, **later}
            self._held, self._sorted, self.revision = merged, None, revision
        new = {k: e for k, (e, _) in merged.items() if e is not None}
        learnt = [(old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
                  if old.get(k) != new.get(k)]
        self.reachable()
        self._copy_all(revision)
        return learnt

    def _range_table(self) -> tuple[int, dict[Key, tuple[Exposure, int]]]:
        """The whole table at one revision: key -> (exposure, mod revision)."""
        head = table_prefix(self.prefix)
        try:
            revision, kvs = self.client.range(head, ec.prefix_end(head))
        except ec.EtcdError as e:
            raise StoreUnavailable(f"etcd: {e.message}") from None
        fresh = {}
        for kv in kvs:
            found = read_kv(self.prefix, kv)
            if found is None:
                log.warning("etcd key %r under our prefix holds no exposure; ignored", kv.key)
                continue
            fresh[found[0]] = (found[1], kv.mod_revision)
        return revision, fresh

    def _import_own(self) -> None:
        """Adds this gateway's own table to the shared one: each exposure etcd does not hold
        (a transaction that creates only absent keys, so nothing another gateway wrote is
        overwritten). Refused whole, StoreUnavailable naming the ports, when etcd holds one of
        them with another target. An import cut short is finished by the next try: what it
        wrote is there with the same target."""
        _, there = self._range_table()
        conflicts = [(e, there[e.key][0]) for e in self._own
                     if e.key in there and there[e.key][0].target != e.target]
        if conflicts:
            named = ", ".join(f"{'/'.join(map(str, e.key))} (here {_target(e)}, in etcd "
                              f"{_target(other)})" for e, other in conflicts[:NAMED_CONFLICTS])
            more = len(conflicts) - NAMED_CONFLICTS
            raise StoreUnavailable(
                f"this gateway's own table ({len(self._own)} exposures in {self.local.path}) "
                f"conflicts with the shared table on etcd at {named}"
                f"{f' and {more} more' if more > 0 else ''}: nothing was imported; delete "
                f"each such exposure on one side (the import is tried again until it succeeds)")
        missing = [e for e in self._own if e.key not in there]
        for start in range(0, len(missing), IMPORT_CHUNK):
            compare, success, failure = commit_txn(
                self.prefix, missing[start:start + IMPORT_CHUNK], (), {})
            try:
                result = self.client.txn(compare, success, failure)
            except ec.EtcdError as e:
                raise StoreUnavailable(f"etcd: {e.message} (importing this gateway's own "
                                       "table; tried again)") from None
            if not result.succeeded:
                raise StoreUnavailable("another gateway wrote some of this gateway's ports "
                                       "while its own table was imported; tried again")
        log.info("imported this gateway's own table into the shared table on etcd: %d "
                 "exposures added, %d already there", len(missing), len(self._own) - len(missing))
        self._own = []

    # --- reading

    def get(self, key: Key) -> Exposure | None:
        with self._lock:
            held = self._held.get(tuple(key)) if isinstance(key, (tuple, list)) else None
        return None if held is None else held[0]

    def exposures(self) -> list[Exposure]:
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted((e for e, _ in self._held.values() if e is not None),
                                      key=lambda e: e.key)
            return list(self._sorted)

    def counts(self) -> Counter:
        counts = Counter({(f, p): 0 for f in FAMILIES for p in PROTOCOLS})
        with self._lock:
            for e, _ in self._held.values():
                if e is not None:
                    counts[e.key[:2]] += 1
        return +counts

    def meta(self) -> dict:
        meta = self.local.meta()
        meta.pop(REVISION_META, None)
        return meta

    # --- writing

    def commit(self, put: Iterable[Exposure] = (), delete: Iterable[Key] = (),
               meta: Mapping | None = None) -> None:
        put, delete = list(put), list(delete)
        if self._closed:
            raise StoreUnavailable(f"the etcd store {self.prefix} is closed")
        if self._own and (put or delete):
            raise StoreUnavailable(f"changes wait until this gateway's own table is in the "
                                   f"shared table, nothing was changed: {self.unreachable}")
        # The same checks as the local store's, before anything reaches etcd: a value another
        # gateway could not decode would never be loaded into its kernel.
        change_of(put, delete, None)
        if put or delete:
            self._commit_table(put, delete)
        if meta:
            self.local.commit(meta=meta)

    def _commit_table(self, put: list[Exposure], delete: list[Key]) -> None:
        lost = self.unreachable
        if lost and self._lost_at is not None \
                and time.monotonic() - self._lost_at < self.retry_after:
            # Without quorum a commit waits store.timeout for every endpoint before it fails,
            # and commits go one after the other: those queued behind it would each wait as
            # long, and hold an API worker all that while. So right after such a failure the
            # next ones fail at once; one tries again `retry_after` later.
            raise StoreUnavailable(f"etcd did not answer the last commit ({lost}); this one "
                                   "was not tried, nothing was changed; retry")
        with self._lock:
            revisions = {k: rev for k, (e, rev) in self._held.items() if e is not None}
        compare, success, failure = commit_txn(self.prefix, put, delete, revisions)
        try:
            result = self.client.txn(compare, success, failure)
        except ec.EtcdError as e:
            self.unreachable = e.message
            if lost_quorum(e):
                self._lost_at = time.monotonic()
            raise StoreUnavailable(f"etcd did not take the change: {e.message}; nothing was "
                                   "changed") from None
        self.reachable()
        if not result.succeeded:
            touched = list(dict.fromkeys([*map(tuple, delete), *(e.key for e in put)]))
            now = {}
            for kvs in result.ranges:
                for kv in kvs:
                    found = read_kv(self.prefix, kv)
                    if found is not None:
                        now[found[0]] = (found[1], kv.mod_revision)
            news = [(k, *now.get(k, (None, result.revision))) for k in touched]
            raise Outdated(self.take(news) or [(self.get(k), self.get(k)) for k in touched])
        written = {e.key for e in put}
        news = [(tuple(k), None, result.revision) for k in delete if tuple(k) not in written]
        news += [(e.key, e, result.revision) for e in put]
        self.take(news)

    def reachable(self) -> None:
        """etcd answered someone of ours (the follower's watch, which asks for a leader):
        commits are tried again at once."""
        self.unreachable, self._lost_at = None, None

    # --- news (the watch, commits, reads of refused commits)

    def take(self, news: Iterable[tuple[Key, Exposure | None, int]]) -> list[Learnt]:
        """Holds each (key, exposure or None, revision) newer than what is held for its key;
        returns what changed, and writes it to the local copy."""
        news, learnt = list(news), []
        with self._lock:
            for key, e, revision in news:
                old, held_at = self._held.get(key, (None, 0))
                if revision <= held_at:
                    continue
                self._held[key] = (e, revision)
                if old != e:
                    learnt.append((old, e))
            if learnt:
                self._sorted = None
            top = max((rev for _, _, rev in news), default=0)
        self._copy(learnt, top)
        return learnt

    def events(self, revision: int, events: list[ec.Event]) -> list[Learnt]:
        """A watch message: its events, and progress up to `revision`."""
        news = []
        for event in events:
            key = key_from(self.prefix, event.kv.key)
            if key is None:
                continue
            if event.deleted:
                news.append((key, None, event.kv.mod_revision))
                continue
            found = read_kv(self.prefix, event.kv)
            if found is None:
                log.warning("etcd key %r holds no exposure; ignored", event.kv.key)
                continue
            news.append((key, found[1], event.kv.mod_revision))
        learnt = self.take(news)
        top = max([revision] + [e.kv.mod_revision for e in events])
        with self._lock:
            self.revision = max(self.revision, top)
            # Absent keys need their revision only while older news may still come.
            for key in [k for k, (e, rev) in self._held.items()
                        if e is None and rev <= self.revision]:
                del self._held[key]
        return learnt

    # --- the local copy (best effort: etcd holds the truth)

    def _copy(self, learnt: list[Learnt], revision: int) -> None:
        if not learnt:
            return
        gone = [old.key for old, new in learnt if new is None]
        try:
            self.local.commit(put=[new for _, new in learnt if new is not None], delete=gone,
                              meta={REVISION_META: max(revision, self.revision)})
        except GatewayError as e:
            self._copy_ok = False
            log.warning("the local copy of the table was not updated (%s); it is written "
                        "whole at the next read of etcd", e.message)

    def _copy_all(self, revision: int) -> None:
        wanted = {e.key: e for e in self.exposures()}
        have = {e.key: e for e in self.local.exposures()}
        try:
            self.local.commit(put=[e for k, e in wanted.items() if have.get(k) != e],
                              delete=[k for k in have if k not in wanted],
                              meta={REVISION_META: revision})
            self._copy_ok = True
        except GatewayError as e:
            self._copy_ok = False
            log.warning("the local copy of the table was not written: %s", e.message)

    def close(self) -> None:
        self._closed = True
        self.local.close()


# gRPC's UNAVAILABLE and DEADLINE_EXCEEDED: etcd's words for "no leader", "request timed out".
_NO_QUORUM_CODES = {14, 4}


def _target(e: Exposure) -> str:
    ip = f"[{e.service_ip}]" if e.service_ip.version == 6 else str(e.service_ip)
    return f"{ip}:{e.service_port}"


def lost_quorum(e: ec.EtcdError) -> bool:
    """etcd cannot commit anything now (as opposed to refusing this one change)."""
    return isinstance(e, ec.EtcdUnreachable) or e.code in _NO_QUORUM_CODES
