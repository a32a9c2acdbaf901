"""Group commit (gw/service/group.py) through the Gateway, against the in-memory nftables and
the same tests against the kernel: requests queued together are one journal fdatasync and one
element transaction; each request still gets its own outcome (a refused element, a conflict, a
missing exposure fail only their own request), and afterwards kernel == store.

Grouping is made certain rather than likely: the test holds the gateway's lock, so the first
request's group (itself alone) waits for it and every later request queues behind it; once all
are queued the lock is released and they are committed as one group."""

from __future__ import annotations

import threading
import time

import pytest

from gw.core import ruleset
from gw.core.errors import Conflict, KernelRefused, NotFound, StoreUnavailable
from gw.core.exposure import DeleteRequest
from gw.daemon.faults import FaultyStore
from gw.kernel.firewall import Firewall
from gw.service import trace
from gw.service.gateway import Gateway
from gw.store.local import LocalStore
from tests.gateway_machine import SETTINGS, FakeKernel, RealKernel, ex, store_state


@pytest.fixture(params=[pytest.param("fake"),
                        pytest.param("real", marks=pytest.mark.kernel)])
def kernel(request):
    if request.param == "fake":
        return FakeKernel()
    request.getfixturevalue("clean_table")
    return RealKernel()


class Counting:
    """The kernel's session, counting element transactions; one that adds `refuse_port` is
    refused as nft refuses an element it cannot take (nothing of it is committed)."""

    def __init__(self, inner, refuse_port: int | None = None):
        self.inner, self.refuse_port, self.changes = inner, refuse_port, 0

    def apply(self, tx):
        if not any(isinstance(op, (ruleset.ReplaceTable, ruleset.DeleteTable)) for op in tx):
            self.changes += 1
            if any(isinstance(op, ruleset.AddElements)
                   and any(e.exposed_port == self.refuse_port for e in op.exposures)
                   for op in tx):
                raise KernelRefused("nftables refused the change: Error: Could not process "
                                    "rule: Value too large (test)")
        self.inner.apply(tx)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def open_gateway(path, kernel, refuse_port=None, group_max=64):
    session = Counting(kernel.session(), refuse_port)
    store = FaultyStore(LocalStore(path))
    gw = Gateway(store, Firewall(session, ruleset.skeleton_vars(SETTINGS)),
                 group_max=group_max)
    gw.load()
    return gw, session


@pytest.fixture
def opened(tmp_path, kernel):
    made = []

    def opener(**kw):
        gw, session = open_gateway(tmp_path / "exposures.json", kernel, **kw)
        made.append(gw)
        return gw, session

    yield opener
    for gw in made:
        gw.close()


def wait_until(condition, what: str) -> None:
    """A condition other threads make true; the bound only stops a hung test."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


def together(gw: Gateway, calls: list) -> list:
    """Run `calls` (functions of no argument) on threads of their own, all but the first
    queued behind it while the gateway's lock is held, so they are committed as one group.
    Returns each call's result or the exception it raised, in order."""
    out: list = [None] * len(calls)

    def run(i):
        trace.begin()
        try:
            out[i] = (calls[i](), trace.end("test", threshold=0))
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            out[i] = (exc, trace.end("test", threshold=0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with gw._lock:
        threads[0].start()
        wait_until(lambda: gw.committer.leading and not gw.committer.queued,
                   "the first request leads")
        for t in threads[1:]:
            t.start()
        wait_until(lambda: gw.committer.queued == len(calls) - 1, "every request queued")
    for t in threads:
        t.join()
    return [result for result, _ in out]


def test_requests_queued_together_share_one_sync_and_one_transaction(opened, kernel):
    gw, session = opened()
    syncs, changes = gw.store.syncs, session.changes
    wanted = [ex(1000 + i, "10.30.0.1" if i % 2 else "fdff::1") for i in range(16)]
    results = together(gw, [lambda e=e: gw.add([e]) for e in wanted])
    assert [[r.outcome for r in res] for res in results] == [["created"]] * 16
    # The first alone, then the fifteen queued behind it: two of each, not sixteen.
    assert gw.store.syncs - syncs == 2
    assert session.changes - changes == 2
    assert kernel.state() == store_state(gw.store) == {
        e.key: (str(e.service_ip), 80) for e in wanted}


def test_a_refused_element_fails_only_its_own_request(opened, kernel):
    gw, session = opened(refuse_port=1007)
    syncs = gw.store.syncs
    wanted = [ex(1000 + i, "10.30.0.2") for i in range(16)]
    results = together(gw, [lambda e=e: gw.add([e]) for e in wanted])
    refused = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert refused == [7] and isinstance(results[7], KernelRefused)
    assert "Value too large" in results[7].message
    good = {e.key: ("10.30.0.2", 80) for e in wanted if e.exposed_port != 1007}
    assert kernel.state() == store_state(gw.store) == good
    # The first alone, the group of fifteen, the undo of the refused one.
    assert gw.store.syncs - syncs == 3
    assert "firewall" in gw.health  # the refusal is reported as the last change's
    gw.store.close()
    assert store_state(LocalStore(gw.store.path, shared=True)) == good


def test_conflicts_and_missing_exposures_fail_only_their_own_request(opened, kernel):
    gw, _ = opened()
    gw.add([ex(80, "10.30.0.1"), ex(81, "10.30.0.1")])
    results = together(gw, [
        lambda: gw.add([ex(82, "10.30.0.1")]),
        lambda: gw.add([ex(80, "10.30.0.9")]),            # another target: 409
        lambda: gw.delete(DeleteRequest(99, "tcp", None)),  # nothing there: 404
        lambda: gw.delete(DeleteRequest(81, "tcp", None)),
        lambda: gw.add([ex(80, "10.30.0.1")]),            # the same: unchanged
        lambda: gw.add([ex(83, "fdff::2")]),
    ])
    assert [r.outcome for r in results[0]] == ["created"]
    assert isinstance(results[1], Conflict) and results[1].field == "exposed_port"
    assert isinstance(results[2], NotFound)
    assert [e.exposed_port for e in results[3]] == [81]
    assert [r.outcome for r in results[4]] == ["unchanged"]
    assert [r.outcome for r in results[5]] == ["created"]
    assert kernel.state() == store_state(gw.store) == {
        ("ipv4", "tcp", 80): ("10.30.0.1", 80), ("ipv4", "tcp", 82): ("10.30.0.1", 80),
        ("ipv6", "tcp", 83): ("fdff::2", 80)}


def test_requests_on_one_key_keep_their_order(opened, kernel):
    """The second decides on the first's result: they are never in one group."""
    gw, _ = opened()
    results = together(gw, [
        lambda: gw.add([ex(500, "10.30.0.9")]),  # leads alone
        lambda: gw.add([ex(80, "10.30.0.1")]),
        lambda: gw.delete(DeleteRequest(80, "tcp", "ipv4")),
        lambda: gw.add([ex(80, "10.30.0.2")]),
        lambda: gw.add([ex(80, "10.30.0.3")]),   # taken by the one before: 409
        lambda: gw.add([ex(501, "10.30.0.9")]),  # another key: in the first group
    ])
    assert [r.outcome for r in results[1]] == ["created"]
    assert [str(e.service_ip) for e in results[2]] == ["10.30.0.1"]
    assert [r.outcome for r in results[3]] == ["created"]
    assert isinstance(results[4], Conflict) and "10.30.0.2:80" in results[4].message
    assert kernel.state() == store_state(gw.store) == {
        ("ipv4", "tcp", 80): ("10.30.0.2", 80), ("ipv4", "tcp", 500): ("10.30.0.9", 80),
        ("ipv4", "tcp", 501): ("10.30.0.9", 80)}


def test_a_store_that_cannot_write_fails_the_group_and_touches_no_kernel(opened, kernel):
    gw, session = opened()
    gw.add([ex(80, "10.30.0.1")])
    before, changes = kernel.state(), session.changes
    gw.store.fail_next_commit()
    results = together(gw, [lambda: gw.add([ex(500, "10.30.0.9")])] + [
        lambda p=p: gw.add([ex(p, "10.30.0.1")]) for p in (81, 82, 83)])
    # The first (alone) takes the failure; the group after it is written.
    assert isinstance(results[0], StoreUnavailable)
    assert [[r.outcome for r in res] for res in results[1:]] == [["created"]] * 3
    assert session.changes - changes == 1
    assert kernel.state() == store_state(gw.store) == {
        **before, **{("ipv4", "tcp", p): ("10.30.0.1", 80) for p in (81, 82, 83)}}
    gw.store.fail_next_commit()
    results = together(gw, [lambda: gw.add([ex(500, "10.30.0.9")])] + [
        lambda p=p: gw.delete(DeleteRequest(p, "tcp", None)) for p in (81, 82)])
    assert isinstance(results[0], StoreUnavailable)
    assert [len(r) for r in results[1:]] == [1, 1]
    assert kernel.state() == store_state(gw.store) == {
        **before, ("ipv4", "tcp", 83): ("10.30.0.1", 80)}


def test_a_queued_request_traces_its_groups_phases(opened, kernel):
    gw, _ = opened()
    marks: dict = {}

    def traced(port):
        def call():
            gw.add([ex(port, "10.30.0.1")])
            marks[port] = [name for name, _ in trace._current.get()]
        return call

    together(gw, [traced(700), traced(701)])
    assert marks[701][1:] == ["queue", "decide", "store", "kernel", "wake"]


def test_group_max_one_commits_each_alone(opened, kernel):
    gw, session = opened(group_max=1)
    syncs, changes = gw.store.syncs, session.changes
    together(gw, [lambda p=p: gw.add([ex(p, "10.30.0.1")]) for p in range(2000, 2006)])
    assert gw.store.syncs - syncs == session.changes - changes == 6
    assert len(kernel.state()) == len(store_state(gw.store)) == 6
