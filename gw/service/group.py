"""Group commit: changes that arrive together share one store commit and one kernel commit.

A request hands its change to the `Committer` and waits. The first request that finds no group
being committed becomes the leader: it takes what is queued (a group) and has `run` commit it,
then hands the lead to the oldest request still queued, and returns its own answer. While one
group is committed, the next one queues: under load the groups grow by themselves, and a lone
request is its own group at once (nothing waits for company).

A group holds at most one request per key, so its requests are independent of each other:
committing any subset of them is what some serial order of them would have done, which is
what lets a kernel refusal be narrowed to the requests it belongs to (`refused`). A request
that touches a key already in the group waits for the next group, after the one before it:
each key sees its requests in arrival order.

The parts here know nothing of stores or kernels: the Gateway decides and commits
(gw/service/gateway.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


class Pending:
    """One request in the queue: the keys it touches, how many elements it changes, what
    decides it (called by the leader, under the Gateway's lock), and its outcome."""

    __slots__ = ("keys", "size", "decide", "timeline", "_event", "_done", "_answer", "_error")

    def __init__(self, keys: Iterable[Hashable], decide: Callable[[], object], size: int = 1):
        self.keys = frozenset(keys)
        self.size = max(1, size)
        self.decide = decide
        # (phase, perf_counter) of the group that committed it, for the request's trace.
        self.timeline: list[tuple[str, float]] = []
        self._event = threading.Event()
        self._done = False
        self._answer: object = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done

    def answer(self, value: object) -> None:
        self._answer, self._done = value, True

    def fail(self, error: BaseException) -> None:
        self._error, self._done = error, True

    def result(self):
        if self._error is not None:
            raise self._error
        return self._answer


def take(queue: list[Pending], max_requests: int, max_size: int) -> list[Pending]:
    """Pure (but for removing them from `queue`): the next group, oldest first: at most
    `max_requests` requests and, but for a first one that is larger alone, `max_size` elements;
    a request whose keys overlap one taken stays queued, and so does every later request that
    shares a key with one that stays (a key's requests keep their order)."""
    group: list[Pending] = []
    taken: set = set()
    blocked: set = set()
    size = 0
    for p in list(queue):
        if len(group) >= max_requests:
            break
        if p.keys & taken or p.keys & blocked or (group and size + p.size > max_size):
            blocked |= p.keys
            continue
        group.append(p)
        taken |= p.keys
        size += p.size
        queue.remove(p)
    return group


def refused(items: Sequence[T], commit: Callable[[Sequence[T]], None],
            errors: tuple[type[BaseException], ...]) -> dict[int, BaseException]:
    """Commit `items` together; should that raise one of `errors`, find by bisection which
    items alone are refused, committing the others (in parts). Returns the refused ones'
    indexes with their own errors. Sound only for independent items (see the module)."""
    out: dict[int, BaseException] = {}

    def attempt(lo: int, hi: int) -> None:
        try:
            commit(items[lo:hi])
        except errors as exc:
            if hi - lo == 1:
                out[lo] = exc
                return
            mid = (lo + hi) // 2
            attempt(lo, mid)
            attempt(mid, hi)

    if items:
        attempt(0, len(items))
    return out


class Committer:
    """The queue and the lead. `run(group)` commits a group: it must give each request of it
    its outcome (`answer` or `fail`) and may raise only for a fault of its own, which then
    fails every request of the group left without one."""

    def __init__(self, run: Callable[[list[Pending]], None], max_requests: int = 64,
                 max_size: int = 1000):
        self._run = run
        self.max_requests = max(1, max_requests)
        self.max_size = max_size
        self._mutex = threading.Lock()
        self._queue: list[Pending] = []
        self._leading = False
        # Groups committed and the requests in them, for metrics (see `observe`).
        self.observe: Callable[[int], None] = lambda size: None

    @property
    def leading(self) -> bool:
        """A group is being committed (or the lead is being handed over)."""
        return self._leading

    @property
    def queued(self) -> int:
        """Requests waiting for a group."""
        with self._mutex:
            return len(self._queue)

    def submit(self, pending: Pending):
        """Queue `pending`, wait for its group to be committed (leading it, or another), and
        return its answer or raise its error."""
        with self._mutex:
            self._queue.append(pending)
            lead = not self._leading
            self._leading = True
        if not lead:
            pending._event.wait()  # set when it is done, or when it is handed the lead
            lead = not pending.done
        if lead:
            while not pending.done:
                with self._mutex:
                    group = take(self._queue, self.max_requests, self.max_size)
                self._commit(group)
            self._hand_over()
        return pending.result()

    def _commit(self, group: list[Pending]) -> None:
        try:
            self._run(group)
        except BaseException as exc:  # noqa: BLE001 - every request waits for an outcome
            for p in group:
                if not p.done:
                    p.fail(exc)
        finally:
            self.observe(len(group))
            for p in group:
                p._event.set()

    def _hand_over(self) -> None:
        """The lead goes to the oldest request queued, or lapses."""
        with self._mutex:
            if not self._queue:
                self._leading = False
                return
            nxt = self._queue[0]
        nxt._event.set()  # not done: it wakes as the leader
