"""The gateway service: the store and the firewall kept equal under one lock.

A change is written to the store first (durable), then committed to the kernel. If the store
cannot write, the kernel is never touched; if the kernel refuses, the store change is reverted.
A crash between the two leaves the store ahead of the kernel, and the reconcile at start makes
the kernel follow the store: either way nothing is acknowledged that is not in both.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

from ..core.errors import Conflict, GatewayError, NotFound
from ..core.exposure import DeleteRequest, Exposure, Key
from ..kernel.firewall import Diff, Firewall
from ..store.protocol import Learnt, Outdated, Store
from . import trace
from .health import Health

log = logging.getLogger(__name__)

# A shared store refuses a commit when another gateway changed a key first (Outdated); the
# change is decided again on what is there now, a few times at most.
DECIDE_ATTEMPTS = 5


@dataclass(frozen=True)
class AddResult:
    exposure: Exposure
    outcome: str  # "created" | "unchanged" | "relabelled"


@dataclass(frozen=True)
class Reconfigured:
    diff: Diff       # how the kernel differed from the store before the load (if any)
    changed: bool    # the values or the addresses changed: the table was loaded with them


class Gateway:
    def __init__(self, store: Store, firewall: Firewall, flusher=None,
                 on_change: Callable[[str, bool], None] | None = None,
                 own_addresses: Iterable[str] = ()):
        self.store = store
        self.firewall = firewall
        self.flusher = flusher
        self._lock = threading.RLock()
        self._on_change = on_change or (lambda kind, ok: None)
        # Why the gateway is not ready, by cause; empty when it is.
        self.health = Health()
        # The gateway's own internal addresses: a stored exposure to one of them (the cluster
        # handed out a new address since it was added) is never loaded into the kernel.
        self._own: frozenset[str] = frozenset(map(str, own_addresses))

    @property
    def own_addresses(self) -> frozenset[str]:
        return self._own

    # -- configuration and end --------------------------------------------------------------

    def reconfigure(self, *, variables: dict[str, str] | None = None,
                    own_addresses: Iterable[str] | None = None) -> Reconfigured:
        """Apply new skeleton values (`ruleset.skeleton_vars`: a reload, new internal
        addresses) and/or new own internal addresses, then make the kernel follow the store,
        all under the lock (no change is in flight meanwhile). When the values or the
        addresses changed, the table is loaded again (new values, same elements, one
        transaction) even if it was in sync; otherwise it is loaded only if it differs (as
        `reconcile`). None leaves that part as it is. A failed load raises (GatewayError)
        with the new values kept: the next load (a repair, a reload) applies them."""
        with self._lock:
            own = None if own_addresses is None else frozenset(map(str, own_addresses))
            if ((variables is None or variables == self.firewall.variables)
                    and own in (None, self._own)):
                return Reconfigured(self.reconcile(), False)
            diff = self.diff()  # against what runs: drift, not the change asked for
            if variables is not None:
                self.firewall.set_variables(variables)
            if own is not None:
                self._own = own
            self.load()
            return Reconfigured(diff, True)

    def close(self) -> None:
        """Let queued flushes finish (briefly), then close the store once an in-flight change
        is done. The kernel table is left as it is: traffic keeps flowing."""
        if self.flusher is not None:
            self.flusher.wait(timeout=2)
            self.flusher.close()
        with self._lock:
            self.store.close()

    # -- reads ------------------------------------------------------------------------------

    def exposures(self) -> list[Exposure]:
        """What was acknowledged, by key: the store, less a refused change it could not take
        back yet."""
        with self._lock:
            return self._believed()

    def kernel_counters(self) -> dict[str, int]:
        """The table's named counters (egress), by name."""
        return self.firewall.counters()

    def probe(self) -> None:
        """A commit of our own that touches nothing: the drift watcher learns our id by it."""
        self.firewall.session.probe()

    def generations(self) -> tuple[int, frozenset[int]]:
        """The ruleset's generation and our own whole-table commits': the drift watcher
        judges lost events by them."""
        return self.firewall.session.generations()

    def counts(self) -> Counter:
        """Exposures by (family, protocol), for metrics."""
        return self.store.counts()

    # -- changes ----------------------------------------------------------------------------

    def add(self, exposures: list[Exposure]) -> list[AddResult]:
        """Add all or none. Identical ones are no-ops; a new label on an existing target only
        updates the store; another target on a taken key is a Conflict."""
        return self._decided(lambda: self._add(exposures))

    def _decided(self, change: Callable[[], object]):
        """`change` under the lock; should a shared store say another gateway came first, the
        kernel takes what is there now and `change` decides again on it."""
        with self._lock:
            for attempt in range(DECIDE_ATTEMPTS):
                try:
                    return change()
                except Outdated as exc:
                    self.follow(exc.learnt)
                    if attempt == DECIDE_ATTEMPTS - 1:
                        raise

    def _add(self, exposures: list[Exposure]) -> list[AddResult]:
        with self._lock:
            trace.mark("lock")
            self._settle()
            results, new, relabel, old = [], [], [], []
            for i, e in enumerate(exposures):
                existing = self.store.get(e.key)
                if existing is None:
                    new.append(e)
                    results.append(AddResult(e, "created"))
                    continue
                if existing.target != e.target:
                    where = f"exposures[{i}]." if len(exposures) > 1 else ""
                    raise Conflict(f"{e.exposed_port}/{e.protocol} ({e.family}) is already "
                                   f"exposed to {existing.target_text}; delete it first",
                                   field=where + "exposed_port")
                if existing.service_id != e.service_id and e.service_id is not None:
                    relabel.append(e)
                    old.append(existing)
                    results.append(AddResult(e, "relabelled"))
                else:
                    results.append(AddResult(existing, "unchanged"))
            if not new and not relabel:
                return results
            self.store.commit(put=new + relabel)
            trace.mark("store")
            if new:
                if self.flusher is not None:
                    # The flush of a delete of the same exposure moments ago, queued or
                    # running, must not cut the flows opened after this commit.
                    self.flusher.settle(new)
                    trace.mark("settle")
                try:
                    self._kernel(lambda: self.firewall.apply(add=new))
                except Exception:
                    self._revert(put=old, delete=[e.key for e in new])
                    raise
                trace.mark("kernel")
            return results

    def delete(self, request: DeleteRequest) -> list[Exposure]:
        return self._decided(lambda: self._delete(request))

    def _delete(self, request: DeleteRequest) -> list[Exposure]:
        with self._lock:
            trace.mark("lock")
            self._settle()
            found = [e for k in request.keys() if (e := self.store.get(k)) is not None]
            if not found:
                fam = f" ({request.family})" if request.family else ""
                raise NotFound(f"{request.exposed_port}/{request.protocol}{fam} is not exposed",
                               field="exposed_port")
            self._remove(found)
        return found

    def delete_service(self, service_id: str, exposed_port: int | None = None) -> list[Exposure]:
        """Delete every exposure labelled `service_id` (only those of `exposed_port` when
        given), all or none. Nothing labelled so: nothing happens (a repeated delete is a
        no-op). Scans the store: for the cluster's per-service delete, not a hot path."""
        return self._decided(lambda: self._delete_service(service_id, exposed_port))

    def _delete_service(self, service_id: str, exposed_port: int | None) -> list[Exposure]:
        with self._lock:
            self._settle()
            found = [e for e in self.store.exposures() if e.service_id == service_id
                     and exposed_port in (None, e.exposed_port)]
            if found:
                self._remove(found)
        return found

    def _remove(self, found: list[Exposure]) -> None:
        """Under the lock: store, kernel, then the flush of their flows."""
        self.store.commit(delete=[e.key for e in found])
        trace.mark("store")
        try:
            self._kernel(lambda: self.firewall.apply(remove=found))
        except Exception:
            self._revert(put=found, delete=[])
            raise
        trace.mark("kernel")
        if self.flusher is not None:
            # Queued under the lock: a re-add that follows finds it, to cancel or await.
            self.flusher.flush(found)
            trace.mark("flush queued")

    # -- a shared store: other gateways' changes -------------------------------------------

    def follow(self, learnt: list[Learnt] | Callable[[], list[Learnt]]) -> None:
        """The kernel takes what a shared store learnt of other gateways' changes (`learnt`,
        or a callable that has the store take them, called under the lock): one element
        transaction, then the flush of the flows of what went away. A refused transaction
        loads the whole table from the store."""
        with self._lock:
            learnt = learnt() if callable(learnt) else learnt
            gone = [old for old, new in learnt if old is not None
                    and (new is None or new.target != old.target)]
            came = [new for old, new in learnt if new is not None
                    and (old is None or new.target != old.target)]
            gone = [e for e in gone if str(e.service_ip) not in self._own]
            came = [e for e in came if str(e.service_ip) not in self._own]
            if not gone and not came:
                return
            if came and self.flusher is not None:
                self.flusher.settle(came)
            try:
                self._kernel(lambda: self.firewall.apply(add=came, remove=gone), kind="follow")
            except GatewayError as exc:
                log.warning("the kernel refused another gateway's change (%s); loading the "
                            "table", exc.message)
                self.load()
                return
            if gone and self.flusher is not None:
                self.flusher.flush(gone)

    def resync(self, read: Callable[[], object]) -> Diff:
        """`read` has a shared store read its whole table again (after a lost watch); then the
        kernel follows it, in one transaction if it differs (`reconcile`)."""
        with self._lock:
            read()
            return self.reconcile()

    # -- kernel sync ------------------------------------------------------------------------

    def load(self) -> None:
        """Make the kernel hold the skeleton and exactly the store's exposures (one
        transaction). Used at start and to repair drift: no read of the kernel needed."""
        with self._lock:
            wanted = self._wanted()
            self._kernel(lambda: self.firewall.load(wanted),
                         kind="reconcile")
            self.health.clear("drift")
            if self.flusher is not None:
                # Flows of elements that are gone (a flush lost to a crash or a stop, an
                # element someone else added) would live on: one sweep finds them all.
                self.flusher.sweep(self.firewall.internal_addresses(), self._explained)

    def _explained(self) -> set[tuple]:
        """What the current exposures account for: (family, protocol, exposed port, service
        IP, service port), the shape of `conntrack.Flow.through`."""
        with self._lock:
            return {(*e.key, *e.target) for e in self.store.exposures()}

    def diff(self) -> Diff:
        """Kernel versus store. Lists the maps, whose cost grows with them: never on a request
        path."""
        with self._lock:
            return self.firewall.diff(self._wanted())

    def reconcile(self) -> Diff:
        """Compare kernel (maps and chains) with the store; if they differ, load the table
        from the store in one transaction. Returns what differed."""
        with self._lock:
            diff = self.diff()
            if diff:
                log.warning("reconcile: kernel differed from the store (%s); repairing",
                            diff.summary())
                self.load()  # its sweep removes the flows of elements that are gone
            else:
                self.health.clear("drift", "firewall")
            return diff

    def _kernel(self, commit: Callable[[], None], kind: str = "change") -> None:
        try:
            commit()
        except GatewayError as exc:
            self.health.set("firewall", f"the last {kind} failed: {exc.message}")
            self._on_change(kind, False)
            raise
        self.health.clear("firewall")
        self._on_change(kind, True)

    # A store change the kernel refused and the store could not take back: (put, delete).
    _unreverted: tuple[list[Exposure], list[Key]] | None = None

    def _revert(self, put: Iterable[Exposure], delete: Iterable[Key]) -> None:
        """Undo a store change the kernel refused. Should this write fail too, the undo is
        kept: the kernel is never loaded with the refused change, and no change is taken
        until the store has taken the undo (see `_settle`)."""
        put, delete = list(put), list(delete)
        try:
            self.store.commit(put=put, delete=delete)
        except Outdated as exc:
            # Another gateway wrote these keys since: its change stands, and ours is gone.
            self.follow(exc.learnt)
        except GatewayError as exc:
            self._unreverted = (put, delete)
            self.health.set("store", f"could not revert a refused change: {exc.message}")
            log.critical("the kernel refused a change and the store could not take it back "
                         "(%s): no change is taken until it can", exc.message)

    def _believed(self) -> list[Exposure]:
        """The store, less a refused change it could not revert (the pending undo applied),
        sorted by key as the store is."""
        stored = self.store.exposures()
        if self._unreverted is None:
            return stored
        put, delete = self._unreverted
        gone = set(delete) | {e.key for e in put}
        return sorted([e for e in stored if e.key not in gone] + put, key=lambda e: e.key)

    def _wanted(self) -> list[Exposure]:
        """What the kernel must hold: what was acknowledged, less exposures that point at the
        gateway itself."""
        return [e for e in self._believed() if str(e.service_ip) not in self._own]

    def pointing_at_itself(self) -> list[Exposure]:
        """Stored exposures whose service IP is one of the gateway's own internal addresses."""
        return [e for e in self.store.exposures() if str(e.service_ip) in self._own]

    def _settle(self) -> None:
        """Before a change: write the undo a failed revert left pending. If the store still
        cannot take it, this change fails (503) before anything is touched."""
        if self._unreverted is None:
            return
        put, delete = self._unreverted
        self.store.commit(put=put, delete=delete)
        self._unreverted = None
        self.health.clear("store")
        log.warning("the store took back the change the kernel had refused")
