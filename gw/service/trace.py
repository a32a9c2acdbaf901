"""Where a request's time goes: named phases, marked as the request passes them, kept only for
the slow ones.

The API begins a trace per request and ends it with the answer; the layers below mark the
phases they pass (`mark("store")` when the store's commit returned, ...). A request slower than
the threshold is logged as one line, each phase with the milliseconds since the phase before,
so the tail of a latency figure can be taken apart from the daemon's log instead of guessed.
Outside a request (a reconcile, a test calling the Gateway) marking costs one lookup.
"""

from __future__ import annotations

import contextvars
import logging
import time

log = logging.getLogger("gw.trace")

#: Requests at least this slow are logged with their phases.
SLOW_S = 0.005

_current: contextvars.ContextVar[list | None] = contextvars.ContextVar("trace", default=None)


def begin() -> None:
    """Start the calling thread's trace (its first mark is now)."""
    _current.set([("start", time.perf_counter())])


def mark(phase: str) -> None:
    """`phase` has ended now (no-op outside a trace)."""
    marks = _current.get()
    if marks is not None:
        marks.append((phase, time.perf_counter()))


def extend(marks: list[tuple[str, float]]) -> None:
    """Phases another thread marked for this request (the leader of its group commit), at
    the times it marked them (no-op outside a trace)."""
    own = _current.get()
    if own is not None:
        own.extend(marks)


def phases(marks: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Pure: each phase with the seconds since the mark before it."""
    return [(name, t - marks[i][1]) for i, (name, t) in enumerate(marks[1:])]


def render(what: str, marks: list[tuple[str, float]]) -> str:
    """Pure: one line, total first, then each phase in ms."""
    total = marks[-1][1] - marks[0][1]
    return f"{what} {total * 1000:.2f} ms: " + ", ".join(
        f"{name} {seconds * 1000:.2f}" for name, seconds in phases(marks))


def end(what: str, threshold: float = SLOW_S) -> float | None:
    """Close the trace; log it if it took `threshold` or more. Returns its seconds (None
    without a trace)."""
    marks = _current.get()
    if marks is None:
        return None
    _current.set(None)
    marks.append(("response", time.perf_counter()))
    total = marks[-1][1] - marks[0][1]
    if total >= threshold:
        log.info("slow request: %s", render(what, marks))
    return total
