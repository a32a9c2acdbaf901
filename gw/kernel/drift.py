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


class DriftWatcher:
    """Runs `nft monitor` in one thread and the repairs in another, so that reading events
    never waits for a repair (a repair itself emits one event per element it loads). Reports that
    arrive while a repair is pending are coalesced into it."""

    COALESCE = 0.05  # seconds: one repair for a burst of foreign changes
    # A repair that fails (on_drift returns False or raises) is tried again, backing off.
    RETRY_FIRST, RETRY_MAX = 0.5, 30.0

    def __init__(self, on_drift: Callable[[str], None], probe: Callable[[], None],
                 argv: tuple[str, ...] = ("nft", "monitor")):
        self._on_drift = on_drift
        self._probe = probe
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
        return self

    def _listening(self, restarted: bool) -> None:
        # The monitor listens once it runs; give it a moment to subscribe.
        time.sleep(0.1)
        self.started.set()
        if restarted:  # only now: a repair before the new monitor listens would be blind
            self._report("the nftables monitor was restarted; events may have been lost")

    def _read(self, lines: Iterable[str]) -> None:
        for item in transactions(lines):
            if isinstance(item, str):
                self._report(f"the monitor reported an error ({item}); events may be lost")
            elif self._own_pid is None and any(PROBE_TABLE in c for c in item.changes):
                self._own_pid = item.pid  # our probe (start): the id our commits carry
                self._learned.set()
            elif not self._is_own(item.pid) and touches_our_table(item.changes):
                self._report(f"process {item.pid} changed our table: "
                             f"{describe(item.changes)}")

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
            reasons, self._reasons = self._reasons, []
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
