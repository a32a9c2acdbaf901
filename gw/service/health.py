"""Why the gateway is not ready: its causes, owned by one thread-safe object.

The gateway sets and clears its own causes (a refused kernel change, a store that could not
take back a refused change); the daemon adds those only it sees (a poisoned store, a drift
repair that failed). The API's /api/ready, the metrics and the watchdog read a snapshot.
The causes /api/ready can name are listed in docs/api.md (`oakestra_gw_problems`).
"""

from __future__ import annotations

import threading


class Health:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._causes: dict[str, str] = {}

    def set(self, cause: str, reason: str) -> None:
        """`cause` is not ready, because of `reason` (replaces an earlier reason)."""
        with self._lock:
            self._causes[cause] = reason

    def clear(self, *causes: str) -> None:
        """These causes are resolved (those not present are ignored)."""
        with self._lock:
            for cause in causes:
                self._causes.pop(cause, None)

    def snapshot(self) -> dict[str, str]:
        """A copy of the causes present now, by cause; empty when ready."""
        with self._lock:
            return dict(self._causes)

    def __contains__(self, cause: str) -> bool:
        with self._lock:
            return cause in self._causes
