"""Noticing when something else changes our table, without ever listing it in a loop.

`nft monitor` prints each ruleset change as it is committed, and closes every transaction
with a line naming the process that made it:

    add element inet oakestra_gw expose_v4 { tcp . 80 : 10.30.0.1 . 80 }
    # new generation 4 by process 8899 (nft)

Our own commits come from this process (libnftables runs in it; the id the monitor prints is
that of the committing thread, one of ours), so a transaction by any other process that names
our table (or flushes the whole ruleset) is drift. The watcher then calls
`on_drift`, which restores table and maps from the store in one transaction. If the monitor
dies or reports lost events (ENOBUFS), we cannot know what happened: that counts as drift too.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .nft import PROBE_TABLE
from .supervisor import Supervisor
from ..core.ruleset import TABLE_NAME

log = logging.getLogger(__name__)
GENERATION_RE = re.compile(r"^# new generation (\d+) by process (\d+)")
# What nft monitor prints when its socket overflowed (ENOBUFS): events were dropped.
LOST_EVENTS = "lost some netlink events"


@dataclass
class Transaction:
    generation: int
    pid: int
    changes: list[str] = field(default_factory=list)


def transactions(lines: Iterable[str]) -> Iterator[Transaction | str]:
    """Pure: group monitor lines into transactions, keeping only the changes that name our
    table (or flush the ruleset): a load prints one line per element, so each line must cost
    next to nothing. Yields the monitor's own error lines as strings, such as nft's
    '# ERROR: We lost some netlink events!' (ENOBUFS)."""
    changes: list[str] = []
    for line in lines:
        if line.startswith("#"):
            m = GENERATION_RE.match(line)
            if m:
                yield Transaction(int(m[1]), int(m[2]), changes)
                changes = []
            elif "error" in line.lower():
                yield line.strip()
        elif TABLE_NAME in line or line.startswith("flush ruleset"):
            changes.append(line.rstrip("\n"))
        elif "Error" in line:  # libnftables' own 'netlink: Error: ...'
            yield line.strip()


def touches_our_table(changes: Iterable[str]) -> bool:
    return any(re.search(rf"\binet {TABLE_NAME}\b", c) or c.startswith("flush ruleset")
               for c in changes)


def describe(changes: list[str]) -> str:
    ours = [c for c in changes if TABLE_NAME in c or c.startswith("flush ruleset")]
    head = "; ".join(c[:100] for c in ours[:3])
    return head + (f" (+{len(ours) - 3} more)" if len(ours) > 3 else "")


def unaccounted(since: int, current: int, own: Iterable[int], seen: Iterable[int]) -> list[int]:
    """Pure: after the monitor lost events, the generations from after `since` (the last one
    it showed whole) up to `current` that nothing vouches for: neither our own commits nor
    transactions the monitor showed whole. Any of them may have changed our table."""
    known = set(own) | set(seen)
    return [g for g in range(since + 1, current + 1) if g not in known]


class DriftWatcher:
    """Runs `nft monitor` in one thread and the repairs in another, so that reading events
    never waits for a repair (a repair itself emits one event per element it loads). Reports that
    arrive while a repair is pending are coalesced into it."""

    COALESCE = 0.05  # seconds: one repair for a burst of foreign changes
    # After lost events: how long to let the monitor catch up with the kernel's generation
    # before judging (what it shows whole in that time needs no repair).
    CATCH_UP = 1.0
    RELISTEN = 10.0  # seconds: for the new monitor after a loss (else: repair)
    # A repair that fails (on_drift returns False or raises) is tried again, backing off.
    RETRY_FIRST, RETRY_MAX = 0.5, 30.0

    def __init__(self, on_drift: Callable[[str], None], probe: Callable[[], None],
                 argv: tuple[str, ...] = ("nft", "monitor"),
                 generations: Callable[[], tuple[int, frozenset[int]]] | None = None):
        self._on_drift = on_drift
        self._probe = probe
        # generations(): the kernel's current generation and our own whole-table commits'
        # (Nft.generations). Without it, every loss of events is treated as drift.
        self._generations = generations
        self._gen_lock = threading.Lock()
        self._last_gen: int | None = None  # of the last transaction the monitor showed
        self._lost_since: int | None = None  # the last generation shown before a loss
        self._losses = 0
        self._dirty = False  # events were lost since the last generation line
        self._seen: set[int] = set()  # generations shown whole since the loss
        # An nft monitor that reported lost events shows no more events (nft 1.0.6): it is
        # replaced by a new one, and the loss judged once that one listens.
        self._renewing = False
        self._relistening = threading.Event()
        self._own_pid: int | None = None
        self._learned = threading.Event()
        self._stop = threading.Event()
        self._pending = threading.Event()
        self._reasons: list[str] = []
        # A monitor that keeps dying must not turn into a reconcile loop: it backs off.
        self._monitor = Supervisor(argv, self._read, label="drift watch", first=0.5,
                                   most=30.0, steady=10.0, on_spawn=self._listening)
        self._repairer = threading.Thread(target=self._repair, name="drift-repair", daemon=True)
        self.started = threading.Event()

    def start(self) -> "DriftWatcher":
        self._monitor.start()
        self._repairer.start()
        self.started.wait(5)
        self._probe()
        if not self._learned.wait(5):
            self._own_pid = os.getpid()
            log.warning("drift watch: did not see our probe commit; assuming pid %d",
                        self._own_pid)
            self._seed_generation()
        return self

    def _seed_generation(self) -> None:
        """The monitor has shown no generation yet (with a big table in place it shows none
        for seconds): the kernel's current one stands in for the last it showed, so that a loss
        of our load's events can still be judged (every later generation must be ours or
        shown) instead of costing a full repair."""
        if self._generations is None:
            return
        try:
            current, _ = self._generations()
        except Exception:  # noqa: BLE001 - then a loss is taken as drift, as before
            return
        with self._gen_lock:
            if self._last_gen is None:
                self._last_gen = current

    def _listening(self, restarted: bool) -> None:
        # The monitor listens once it runs; give it a moment to subscribe.
        time.sleep(0.1)
        self.started.set()
        with self._gen_lock:
            renewed, self._renewing = self._renewing, False
            self._dirty = False
        if renewed:  # after lost events: now the loss can be judged (`_judge_loss`)
            self._relistening.set()
            self._pending.set()
        elif restarted:  # only now: a repair before the new monitor listens would be blind
            self._report("the nftables monitor was restarted; events may have been lost")

    def _read(self, lines: Iterable[str]) -> None:
        for item in transactions(lines):
            if isinstance(item, str):
                if not self._lost(item):
                    self._report(f"the monitor reported an error ({item}); events may be lost")
                continue
            self._shown(item.generation)
            if self._own_pid is None and any(PROBE_TABLE in c for c in item.changes):
                self._own_pid = item.pid  # our probe (start): the id our commits carry
                self._learned.set()
            elif not self._is_own(item.pid) and touches_our_table(item.changes):
                self._report(f"process {item.pid} changed our table: "
                             f"{describe(item.changes)}")

    def _shown(self, generation: int) -> None:
        with self._gen_lock:
            if self._lost_since is not None and not self._dirty:
                self._seen.add(generation)
            self._dirty = False
            self._last_gen = generation

    def _lost(self, line: str) -> bool:
        """The monitor lost events: judged by generation (`_judge_loss`) rather than taken as
        drift at once, since our own loads overflow it. False: it cannot be judged so."""
        if self._generations is None or LOST_EVENTS not in line:
            return False
        with self._gen_lock:
            if self._last_gen is None:
                return False
            if self._lost_since is None:
                self._lost_since = self._last_gen
            self._dirty = True
            self._losses += 1
            self._renewing = True
            self._relistening.clear()
        log.info("drift watch: the monitor lost events (%s); starting a new one and checking "
                 "whose commits they were", line.strip())
        self._monitor.restart()
        return True

    def _judge_loss(self) -> str | None:
        """After lost events: a reason to repair, or None when every generation the loss may
        span is our own commit or was shown whole after all."""
        with self._gen_lock:
            since, losses = self._lost_since, self._losses
        if since is None:
            return None
        if not self._relistening.wait(self.RELISTEN):
            with self._gen_lock:
                self._lost_since, self._seen = None, set()
            return "the monitor lost events and its successor did not start listening"
        try:
            current, own = self._generations()
        except Exception as exc:  # noqa: BLE001 - then it is unknown: repair
            with self._gen_lock:
                self._lost_since, self._seen = None, set()
            return f"the monitor lost events and the ruleset generation is unreadable ({exc})"
        deadline = time.monotonic() + self.CATCH_UP
        while (self._last_gen or 0) < current and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._gen_lock:
            if self._losses != losses:  # lost more meanwhile: judge again, from the same start
                self._pending.set()
                return None
            seen, self._lost_since, self._seen = self._seen, None, set()
        missing = unaccounted(since, current, own, seen)
        if missing:
            shown = ", ".join(str(g) for g in missing[:5]) + (" ..." if len(missing) > 5 else "")
            return (f"the monitor lost events, and generation(s) {shown} were not committed "
                    "by this gateway")
        log.info("drift watch: the lost events were our own commits' (generations %d to %d); "
                 "nothing to repair", since + 1, current)
        return None

    def _is_own(self, pid: int) -> bool:
        """The kernel names the committing *thread* (task_pid_nr), so a commit from one of our
        API worker threads carries that thread's id, not the process id: ours too."""
        return pid == self._own_pid or (self._own_pid is not None and
                                        os.path.exists(f"/proc/{self._own_pid}/task/{pid}"))

    def _report(self, reason: str) -> None:
        log.warning("drift: %s", reason)
        self._reasons.append(reason)
        self._pending.set()

    def _repair(self) -> None:
        retry_in: float | None = None  # after a failed repair: when to try again
        backoff = self.RETRY_FIRST
        while not self._stop.is_set():
            if not self._pending.wait(0.5 if retry_in is None else retry_in):
                if retry_in is None:
                    continue
                self._reasons.append("retrying the repair that failed")
            time.sleep(self.COALESCE)
            self._pending.clear()
            loss = self._judge_loss()
            if loss is not None:
                log.warning("drift: %s", loss)
                self._reasons.append(loss)
            reasons, self._reasons = self._reasons, []
            if not reasons:
                continue  # only events of our own commits were lost
            try:
                repaired = self._on_drift("; ".join(reasons[:3]) +
                                          (" ..." if len(reasons) > 3 else "")) is not False
            except Exception:  # the watcher must outlive a failed repair
                log.exception("drift: repair failed")
                repaired = False
            if repaired:
                retry_in, backoff = None, self.RETRY_FIRST
            else:
                log.warning("drift: trying the repair again in %.1f s", backoff)
                retry_in, backoff = backoff, min(backoff * 2, self.RETRY_MAX)

    def stop(self) -> None:
        self._stop.set()
        self._monitor.stop()
        if self._repairer.is_alive():
            self._repairer.join(timeout=3)
