"""A subprocess kept running: started again when it exits, with a backoff so that a command
that keeps dying costs a retry every few seconds, not a busy loop.

Used for the long-running readers of kernel events (`nft monitor` for drift, `conntrack -E`
for per-exposure connection counts). The command's output (stdout and stderr, as lines) is
handed to `consume`, once per run; when it returns, the process is reaped and restarted.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)


class Supervisor:
    """`first`: the pause before the first restart; doubled per restart up to `most`, and
    back to `first` after a run that lasted `steady` seconds (that one did not keep dying).
    `on_spawn(restarted)` runs after each start, before `consume` (e.g. wait until the child
    listens, then tell that events may have been lost while it was away)."""

    def __init__(self, argv: Iterable[str], consume: Callable[[Iterable[str]], None], *,
                 label: str, first: float, most: float, steady: float,
                 on_spawn: Callable[[bool], None] = lambda restarted: None):
        self.argv = tuple(argv)
        self._consume = consume
        self._label = label
        self._first, self._most, self._steady = first, most, steady
        self._on_spawn = on_spawn
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name=label, daemon=True)
        self._asked = False  # restart() ended the child: start the next one at once

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def _run(self) -> None:
        delay, restarted = self._first, False
        while not self._stop.is_set():
            try:
                self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, bufsize=1)
            except OSError as exc:
                log.error("%s: cannot run %s: %s", self._label, " ".join(self.argv), exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self._most)
                continue
            began = time.monotonic()
            self._on_spawn(restarted)
            self._consume(self._proc.stdout)
            code = self._proc.wait()
            if self._stop.is_set():
                break
            restarted = True
            if self._asked:
                self._asked = False
                log.info("%s: restarted %s as asked", self._label, " ".join(self.argv))
                continue
            if time.monotonic() - began > self._steady:
                delay = self._first
            log.warning("%s: %s exited (code %s); restarting in %.1f s", self._label,
                        " ".join(self.argv), code, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, self._most)

    def restart(self) -> None:
        """End the child; the next one starts at once (on_spawn is told it is a restart)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._asked = True
            proc.terminate()

    def stop(self, timeout: float = 2) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout + 1)
