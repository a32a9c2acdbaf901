"""The gateway service: the store and the firewall kept equal under one lock.

A change is written to the store first (durable), then committed to the kernel. If the store
cannot write, the kernel is never touched; if the kernel refuses, the store change is reverted.
A crash between the two leaves the store ahead of the kernel, and the reconcile at start makes
the kernel follow the store: either way nothing is acknowledged that is not in both.

Adds and deletes that arrive together are committed together (gw/service/group.py): one store
commit and one kernel transaction for the group, each request decided and answered on its
own, a kernel refusal narrowed to the requests it belongs to.
"""

from __future__ import annotations

import logging
import threading
from ipaddress import ip_address
from collections import Counter
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..core.errors import Conflict, GatewayError, InvalidInput, NotFound
from ..core.exposure import MAX_BATCH, DeleteRequest, Exposure, Key
from ..kernel.firewall import Diff, Firewall
from ..store.protocol import Learnt, Outdated, Store
from . import trace
from .group import Committer, Pending, refused
from .health import Health

log = logging.getLogger(__name__)

# A shared store refuses a commit when another gateway changed a key first (Outdated); the
# change is decided again on what is there now, a few times at most.
DECIDE_ATTEMPTS = 5


@dataclass(frozen=True)
class AddResult:
    exposure: Exposure
    outcome: str  # "created" | "unchanged" | "relabelled"


@dataclass
class Plan:
    """What one request's change does, decided and not yet made: the answer it gets, its store
    change, its kernel change, how the store takes it back should the kernel refuse it, and
    the exposures whose flows go once it is in the kernel."""
    answer: object
    put: list[Exposure] = field(default_factory=list)
    delete: list[Key] = field(default_factory=list)
    kernel_add: list[Exposure] = field(default_factory=list)
    kernel_remove: list[Exposure] = field(default_factory=list)
    undo_put: list[Exposure] = field(default_factory=list)
    undo_delete: list[Key] = field(default_factory=list)

    @property
    def flush(self) -> list[Exposure]:
        return self.kernel_remove


def _mark(pendings: Iterable[Pending], phase: str) -> None:
    """Each request's trace passes `phase` now."""
    now = time.perf_counter()
    for p in pendings:
        p.timeline.append((phase, now))


def _fail(pendings: Iterable[Pending], exc: BaseException) -> None:
    for p in pendings:
        p.fail(exc)


@dataclass(frozen=True)
class Reconfigured:
    diff: Diff       # how the kernel differed from the store before the load (if any)
    changed: bool    # the values or the addresses changed: the table was loaded with them


class Gateway:
    def __init__(self, store: Store, firewall: Firewall, flusher=None,
                 on_change: Callable[[str, bool], None] | None = None,
                 own_addresses: Iterable[str] = (), group_max: int = 64):
        self.store = store
        self.firewall = firewall
        self.flusher = flusher
        self._lock = threading.RLock()
        self._on_change = on_change or (lambda kind, ok: None)
        # Why the gateway is not ready, by cause; empty when it is.
        self.health = Health()
        # The gateway's own internal addresses: a stored exposure to one of them (the cluster
        # handed out a new address since it was added) is never loaded into the kernel.
        self._set_own(frozenset(map(str, own_addresses)))
        # Changes that arrive together are committed together: at most `group_max` requests
        # (1: each alone) and MAX_BATCH elements in one store commit and one kernel commit.
        self._committer = Committer(self._commit_group, group_max, MAX_BATCH)

    @property
    def committer(self) -> Committer:
        return self._committer

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
                self._set_own(own)
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
        exposures = list(exposures)
        return self._submit([e.key for e in exposures], lambda: self._plan_add(exposures),
                            len(exposures))

    def delete(self, request: DeleteRequest) -> list[Exposure]:
        return self._submit(request.keys(), lambda: self._plan_delete(request))

    def _submit(self, keys: list[Key], decide: Callable[[], Plan], size: int = 1):
        """A change through the group committer (see gw/service/group.py); its trace gets the
        phases of the group that committed it."""
        pending = Pending(keys, decide, size)
        try:
            return self._committer.submit(pending)
        finally:
            trace.extend(pending.timeline)
            trace.mark("wake")

    # Deciding: pure but for reading the store. A change of one request, not yet made.

    def _plan_add(self, exposures: list[Exposure]) -> Plan:
        results, new, relabel, old = [], [], [], []
        if len({e.key for e in exposures}) != len(exposures):
            raise InvalidInput("the same exposure key twice in one commit")
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
        return Plan(results, put=new + relabel, kernel_add=new, undo_put=old,
                    undo_delete=[e.key for e in new])

    def _plan_delete(self, request: DeleteRequest) -> Plan:
        found = [e for k in request.keys() if (e := self.store.get(k)) is not None]
        if not found:
            fam = f" ({request.family})" if request.family else ""
            raise NotFound(f"{request.exposed_port}/{request.protocol}{fam} is not exposed",
                           field="exposed_port")
        return Plan(found, delete=[e.key for e in found], kernel_remove=found, undo_put=found)

    # Committing a group: one store commit, one kernel commit (more only if it is refused).

    def _commit_group(self, group: list[Pending]) -> None:
        with self._lock:
            started = time.perf_counter()
            for p in group:
                p.timeline.append(("queue", started))
            plans = self._decide_and_store(group)
            if plans:
                self._commit_kernel(group, plans)
            for p, plan in plans.items():
                if not p.done:
                    p.answer(plan.answer)

    def _decide_and_store(self, group: list[Pending]) -> dict[Pending, Plan]:
        """Decide each request on the store as it is (the group's keys are disjoint), then
        write every change in one commit. Returns the plans that changed the store; the
        others are answered (an error, or a no-op)."""
        for attempt in range(DECIDE_ATTEMPTS):
            try:
                self._settle()
            except GatewayError as exc:
                _fail(group, exc)
                return {}
            plans: dict[Pending, Plan] = {}
            for p in group:
                try:
                    plan = p.decide()
                except GatewayError as exc:
                    p.fail(exc)
                    continue
                if plan.put or plan.delete:
                    plans[p] = plan
                else:
                    p.answer(plan.answer)
            _mark(group, "decide")
            if not plans:
                return {}
            try:
                self.store.commit(put=[e for plan in plans.values() for e in plan.put],
                                  delete=[k for plan in plans.values() for k in plan.delete])
            except Outdated as exc:
                # Another gateway changed a key first (a shared store): the kernel takes what
                # is there now, and the group is decided again on it.
                self.follow(exc.learnt)
                if attempt == DECIDE_ATTEMPTS - 1:
                    _fail(plans, exc)
                    return {}
                continue
            except GatewayError as exc:
                _fail(plans, exc)  # nothing was written: the whole group fails alike
                return {}
            _mark(plans, "store")
            return plans
        return {}

    def _commit_kernel(self, group: list[Pending], plans: dict[Pending, Plan]) -> None:
        """The group's element changes in one transaction; should the kernel refuse it, the
        refused requests are found by bisection, the others committed, and the store takes
        back the refused ones only (one more commit)."""
        kernel = [p for p, plan in plans.items() if plan.kernel_add or plan.kernel_remove]
        if not kernel:
            return
        new = [e for p in kernel for e in plans[p].kernel_add]
        if new and self.flusher is not None:
            # The flush of a delete of the same exposure moments ago, queued or running,
            # must not cut the flows opened after this commit.
            self.flusher.settle(new)
            _mark(kernel, "settle")

        def commit(part: list[Pending]) -> None:
            self._kernel(lambda: self.firewall.apply(
                add=[e for p in part for e in plans[p].kernel_add],
                remove=[e for p in part for e in plans[p].kernel_remove]))

        bad = {kernel[i]: exc for i, exc in refused(kernel, commit, (GatewayError,)).items()}
        _mark(kernel, "kernel")
        if bad:
            self._revert(put=[e for p in bad for e in plans[p].undo_put],
                         delete=[k for p in bad for k in plans[p].undo_delete])
            last = list(bad.values())[-1]
            # A part committed after the refusal cleared it: the refusal still stands.
            self.health.set("firewall", f"the last change failed: {last.message}")
            for p, exc in bad.items():
                p.fail(exc)
        gone = [e for p in kernel if p not in bad for e in plans[p].flush]
        if gone and self.flusher is not None:
            # Queued under the lock: a re-add that follows finds it, to cancel or await.
            self.flusher.flush(gone)
            _mark(kernel, "flush queued")

    def delete_service(self, service_id: str, exposed_port: int | None = None) -> list[Exposure]:
        """Delete every exposure labelled `service_id` (only those of `exposed_port` when
        given), all or none. Nothing labelled so: nothing happens (a repeated delete is a
        no-op). Scans the store: for the cluster's per-service delete, not a hot path. Its
        keys are known only once it is decided, so it is a group of its own, committed under
        the lock (which a group's leader holds too)."""
        pending = Pending((), lambda: self._plan_delete_service(service_id, exposed_port))
        self._commit_group([pending])
        return pending.result()

    def _plan_delete_service(self, service_id: str, exposed_port: int | None) -> Plan:
        found = [e for e in self.store.exposures() if e.service_id == service_id
                 and exposed_port in (None, e.exposed_port)]
        return Plan(found, delete=[e.key for e in found], kernel_remove=found, undo_put=found)

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
            gone = [e for e in gone if e.service_ip not in self._own_ips]
            came = [e for e in came if e.service_ip not in self._own_ips]
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
        kernel follows it, in one transaction if it differs (`reconcile`). The read is not
        under the lock: without quorum it waits for every endpoint in turn, and changes
        (answered 503 meanwhile) must not wait behind it. The store keeps what a commit
        learnt during the read (EtcdStore.read_all)."""
        read()
        with self._lock:
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
        return [e for e in self._believed() if e.service_ip not in self._own_ips]

    def pointing_at_itself(self) -> list[Exposure]:
        """Stored exposures whose service IP is one of the gateway's own internal addresses."""
        return [e for e in self.store.exposures() if e.service_ip in self._own_ips]

    def _set_own(self, own: frozenset[str]) -> None:
        self._own = own
        # The same as address objects: a test per exposure, which writing each exposure's
        # address as text (seconds at the whole port space) is not.
        self._own_ips = frozenset(ip_address(a) for a in own)

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
