"""How many changes may wait at once. A change holds one of the API's worker threads until it
is answered, and a change can wait long: for etcd's endpoints in turn when it has lost its
quorum, for a slow disk. Were every worker held so, /api/health (the systemd watchdog's probe)
and /api/ready would get no answer at all.

While changes flow, any number of them may be in flight: bursts are normal and each is
answered in milliseconds. Only once the oldest change in flight has waited `busy_after` and
`waiting_max` are in flight is a further one answered 503 busy at once, without being tried, so
that the remaining worker serves everything else.
"""

from __future__ import annotations

import itertools
import threading
import time

from ..core.errors import Busy

BUSY_AFTER = 1.0  # far above a change's usual answer, far below the watchdog's probe timeout


class ChangeGate:
    def __init__(self, waiting_max: int, busy_after: float = BUSY_AFTER,
                 clock=time.monotonic):
        self.waiting_max, self.busy_after, self._clock = waiting_max, busy_after, clock
        self._lock = threading.Lock()
        self._since: dict[int, float] = {}  # the changes in flight, by ticket: when they came
        self._tickets = itertools.count()

    def enter(self) -> int:
        """A ticket for `leave`; Busy when changes are stuck and as many as may wait do."""
        now = self._clock()
        with self._lock:
            if len(self._since) >= self.waiting_max \
                    and now - min(self._since.values()) >= self.busy_after:
                raise Busy(f"busy: {len(self._since)} changes are waiting already, the oldest "
                           f"for {now - min(self._since.values()):.1f} s; nothing was changed, "
                           "retry")
            ticket = next(self._tickets)
            self._since[ticket] = now
            return ticket

    def leave(self, ticket: int) -> None:
        with self._lock:
            self._since.pop(ticket, None)
