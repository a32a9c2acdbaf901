"""A call to the cluster retried with capped exponential backoff, one log line per failed try."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .client import ClusterError, ClusterUnreachable, Retryable

log = logging.getLogger(__name__)

FIRST_DELAY = 0.5


class Stopped(Exception):
    """stop() was called while waiting for the next try."""


def retry(what: str, attempt: Callable[[], Any], *, give_up_after: float | None,
          backoff_max: float, stop: threading.Event, retry_all: bool = False,
          clock=time.monotonic) -> Any:
    """Call `attempt` until it returns. A `Retryable` failure (and with `retry_all` any
    `ClusterError`) waits 0.5 s, 1 s, 2 s, ... up to `backoff_max`, one warning per try. With
    `give_up_after` (seconds) raise `ClusterUnreachable` once that has passed."""
    start = clock()
    delay, tries = FIRST_DELAY, 0
    while True:
        tries += 1
        try:
            return attempt()
        except Retryable as exc:
            problem = str(exc)
        except ClusterError as exc:
            if not retry_all:
                raise
            problem = exc.message
        elapsed = clock() - start
        if give_up_after is not None:
            left = give_up_after - elapsed
            if left <= 0:
                raise ClusterUnreachable(
                    f"gave up joining the Oakestra cluster after {tries} tr"
                    f"{'y' if tries == 1 else 'ies'} in {elapsed:.1f} s "
                    f"(oakestra.give_up_after = {give_up_after:g}): {problem}")
            wait = min(delay, left)
        else:
            wait = delay
        log.warning("%s: try %d failed: %s; next try in %.1f s", what, tries, problem, wait)
        if stop.wait(wait):
            raise Stopped()
        delay = min(delay * 2, backoff_max)
