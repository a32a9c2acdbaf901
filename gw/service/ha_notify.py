"""`oakestra-gw ha notify`: the reader of keepalived's notify fifo. keepalived starts it
(vrrp_notify_fifo_script, the fifo's path as the last argument) and sends it SIGTERM when it
stops or reloads. Each line is handled in order: a role change of the sync group runs
conntrackd's steps, sets or lifts the promotion hold (gw.core.ha_hold) and writes the role
file (see gw.core.ha_events.steps for the order).

How the daemon learns the role: from the role file in ha.state_dir, replaced atomically, which
the daemon reads whenever it reports (gw.service.ha_role). One writer, one reader and no
protocol between them: a demotion never waits for the API, a daemon that restarts reads the
last role at once (keepalived does not repeat it), and a restarted notify leaves the file as
it was until keepalived says something new.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from ..core import ha as ha_core, ha_hold
from ..core.ha import HaSettings
from ..core.ha_events import BadLine, parse_line, role_of, role_record, steps

log = logging.getLogger("gw.ha.notify")

# conntrackd's client commands and nft answer at once, apart from a commit of a large
# external cache.
COMMAND_TIMEOUT = 60.0
# After SIGTERM keepalived still writes its STOP lines; read them for this long at most.
STOP_GRACE = 1.0
POLL_SECONDS = 0.2
MISSING = "is not installed"


def write_role(path: str, text: str) -> None:
    """Replace the role file in one step: the daemon never reads half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


class Notifier:
    """Turns fifo lines into conntrackd runs and role-file writes. `run` and `clock` are
    subprocess.run and time.time unless a test gives others."""

    def __init__(self, settings: HaSettings, *, run: Callable = subprocess.run,
                 clock: Callable[[], float] = time.time):
        self.ha = settings
        self.run = run
        self.clock = clock
        self.role: str | None = None

    def line(self, text: str) -> None:
        """Handle one line; a bad one is logged and skipped."""
        try:
            event = parse_line(text)
        except BadLine as exc:
            log.warning("ignored: %s", exc)
            return
        role = role_of(event)
        if role is None:
            log.debug("%s %s is %s", event.kind, event.name, event.state)
            return
        raw = f'{event.kind} "{event.name}" {event.state}'
        log.info("%s: this gateway becomes %s", raw, role)
        self.apply(role, raw)

    def apply(self, role: str, raw: str) -> None:
        since = self.clock()
        plan = steps(role, self.ha.conntrack_external_cache)
        failed: list[str] = []
        for step in plan:
            if step.role is not None:
                self._tell(step.role, since, raw, "; ".join(failed))
            elif step.hold is not None:
                problem = self._hold(step.hold)
                if problem:
                    failed.append(problem)
            elif not any(f.startswith(f"conntrackd {MISSING}") for f in failed):
                # One error for a missing conntrackd, not one per step.
                problem = self._conntrackd(step.args, step.why)
                if problem:
                    failed.append(problem)
        if failed and plan[-1].role is None:
            # Demotion: the role went out first; what failed after is added to it.
            self._tell(role, since, raw, "; ".join(failed))

    def _hold(self, on: bool) -> str:
        """Set or lift the promotion hold (gw.core.ha_hold); "" or what went wrong."""
        script = ha_hold.hold_script(self.ha.floating) if on else ha_hold.lift_script()
        why = "hold traffic to the floating addresses" if on else "lift the promotion hold"
        return self._command(["nft", "-f", "-"], "nft -f", why, script)

    def _tell(self, role: str, since: float, raw: str, problem: str) -> None:
        try:
            write_role(self.ha.role_file, role_record(role, since, raw, problem))
        except OSError as exc:
            log.error("cannot write the role file %s: %s: the daemon does not know it is %s",
                      self.ha.role_file, exc.strerror or exc, role)
            return
        self.role = role
        log.info("role %s written to %s", role, self.ha.role_file)

    def _conntrackd(self, args: tuple[str, ...], why: str) -> str:
        """Run one conntrackd client command; "" or what went wrong."""
        return self._command(ha_core.conntrackd_command(self.ha, *args),
                             " ".join(["conntrackd", *args]), why)

    def _command(self, argv: list[str], shown: str, why: str, stdin: str | None = None) -> str:
        """Run one command of a step; "" or what went wrong (logged here, with `why`)."""
        try:
            done = self.run(argv, input=stdin, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT)
        except FileNotFoundError:
            problem = f"{argv[0]} {MISSING} (not in PATH)"
        except subprocess.TimeoutExpired:
            problem = f"{shown} did not answer within {COMMAND_TIMEOUT:g} s"
        else:
            if done.returncode == 0:
                log.info("%s: %s", shown, why)
                return ""
            said = (done.stderr or done.stdout or "").strip().splitlines() or ["no output"]
            # nft puts its error first, conntrackd last.
            problem = (f"{shown} failed ({done.returncode}): "
                       f"{next((line for line in said if 'Error' in line), said[-1])}")
        log.error("%s (to %s)", problem, why)
        return problem


class FifoReader:
    """Reads the fifo line by line until keepalived is gone: after SIGTERM (keepalived stops
    or reloads) it reads what is still written until `finished()` (the STOP has been
    handled), the fifo is closed, or STOP_GRACE seconds have passed."""

    def __init__(self, path: str, handle: Callable[[str], None],
                 finished: Callable[[], bool] = lambda: False):
        self.path = path
        self.handle = handle
        self.finished = finished
        self.stop_at: float | None = None
        self.parent = os.getppid()

    def on_term(self, signum=None, frame=None) -> None:
        if self.stop_at is None:
            self.stop_at = time.monotonic() + STOP_GRACE

    def _open(self) -> tuple[int, int]:
        # Non-blocking: the open returns at once, and poll() waits for a writer's data.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return fd, os.fstat(fd).st_ino

    def _same_fifo(self, inode: int) -> bool:
        try:
            return os.stat(self.path).st_ino == inode
        except FileNotFoundError:
            return False

    def run(self) -> None:
        fd, inode = self._open()
        buffer = b""
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while True:
                if self.stop_at is not None and time.monotonic() > self.stop_at:
                    return
                if os.getppid() != self.parent:
                    log.warning("keepalived (our parent) is gone: stopping")
                    return
                if not poller.poll(POLL_SECONDS * 1000):
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if data:
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    for raw in lines:
                        self.handle(raw.decode("utf-8", "replace"))
                    if self.stop_at is not None and self.finished():
                        return
                    continue
                # Every writer closed it: keepalived stopping, reloading, or its parent
                # process handing the fifo to its VRRP child.
                if self.stop_at is not None or not self._same_fifo(inode):
                    return
                poller.unregister(fd)
                os.close(fd)
                fd, inode = self._open()
                poller.register(fd, select.POLLIN)
        finally:
            os.close(fd)


def serve(settings: HaSettings, fifo: str | None = None) -> None:
    """Follow `fifo` (default ha.notify_fifo) until keepalived is done with it."""
    path = fifo or settings.notify_fifo
    if not Path(path).exists():
        os.mkfifo(path, 0o600)  # run by hand before keepalived: it uses the one it finds
    notifier = Notifier(settings)
    reader = FifoReader(path, notifier.line, finished=lambda: notifier.role == "stopped")
    signal.signal(signal.SIGTERM, reader.on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("reading keepalived's notify fifo %s (pid %d); role file %s", path, os.getpid(),
             settings.role_file)
    reader.run()
    log.info("notify fifo closed; the last role stays in %s", settings.role_file)
