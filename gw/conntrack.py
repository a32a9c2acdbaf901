"""Conntrack entries of removed exposures. Deleting an exposure stops new flows at once (the map
element is gone) but established flows keep their NAT binding until their entries go; a
background worker removes them so the API can answer before the flush (DESIGN: within 1 s).

The `conntrack` tool filters in C against a kernel dump; at 100k entries that is far faster
than walking the table from Python."""

from __future__ import annotations

import logging
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable

from .exposure import Exposure

log = logging.getLogger(__name__)
PROC = Path("/proc/sys/net/netfilter")
DELETED_RE = re.compile(r"(\d+) flow entries have been deleted")
_idle = ["chrt", "--idle", "0"] if shutil.which("chrt") else []


def _run_idle(argv: list[str]) -> subprocess.CompletedProcess:
    """A filtered delete still walks the whole table (~0.4 s of CPU at 120k entries): run it at
    idle priority so it never competes with the API's requests for the cores. Where a system
    call filter forbids that (chrt fails before it runs conntrack), run it plainly."""
    global _idle
    proc = subprocess.run(_idle + argv, capture_output=True, text=True, timeout=30)
    if _idle and proc.returncode != 0 and proc.stderr.startswith("chrt:"):
        log.info("conntrack: cannot run at idle priority (%s)", proc.stderr.strip())
        _idle = []
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return proc


def delete_command(e: Exposure) -> list[str]:
    """Pure: the conntrack invocation that removes exactly the flows DNATed through `e`:
    original destination port = the exposed port, reply source = the old service IP:port,
    and DNATed. The host's own flows to the service are not DNATed, so they never match."""
    return ["conntrack", "-D", "-f", e.family, "-p", e.protocol,
            "--orig-port-dst", str(e.exposed_port),
            "--reply-src", str(e.service_ip), "--reply-port-src", str(e.service_port),
            "--dst-nat"]


def delete_entries(exposures: Iterable[Exposure]) -> int:
    """Remove the entries now; returns how many went."""
    total = 0
    for e in exposures:
        proc = _run_idle(delete_command(e))
        # conntrack exits 1 when nothing matched; that is not an error here.
        m = DELETED_RE.search(proc.stderr + proc.stdout)
        total += int(m[1]) if m else 0
    return total


def delete_snatted_to(addresses: Iterable) -> int:
    """Remove every flow the gateway NATed (teardown): all of them are DNATed and answer to
    one of its internal addresses, so one filtered dump per address covers them all."""
    total = 0
    for ip in addresses:
        family = "ipv6" if ":" in str(ip) else "ipv4"
        proc = _run_idle(["conntrack", "-D", "-f", family, "--dst-nat", "--reply-dst", str(ip)])
        m = DELETED_RE.search(proc.stderr + proc.stdout)
        total += int(m[1]) if m else 0
    return total


def table_stats() -> dict[str, int]:
    """Entries in use, the table's limit, from procfs (cheap: two small reads)."""
    stats = {}
    for name in ("nf_conntrack_count", "nf_conntrack_max"):
        try:
            stats[name] = int((PROC / name).read_text())
        except (OSError, ValueError):
            pass
    return stats


class Flusher:
    """A worker thread draining a queue of removed exposures."""

    def __init__(self, delete=delete_entries):
        self._delete = delete
        self._queue: queue.Queue[list[Exposure] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="conntrack-flush", daemon=True)
        self._thread.start()

    def flush(self, exposures: Iterable[Exposure]) -> None:
        self._queue.put(list(exposures))

    def cancel(self, exposures: Iterable[Exposure]) -> None:
        """Forget queued flushes of these exposures (same port and target): they were added
        again, and the flows now open through them are new ones."""
        gone = {(e.key, e.target) for e in exposures}
        with self._queue.mutex:
            for batch in self._queue.queue:
                if batch:
                    batch[:] = [e for e in batch if (e.key, e.target) not in gone]

    def wait(self, timeout: float = 10.0) -> bool:
        """Whether everything queued so far was done within `timeout` (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                n = self._delete(batch)
                log.info("conntrack: removed %d entries of %d deleted exposure(s)", n, len(batch))
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("conntrack: could not remove entries: %s", exc)
            finally:
                self._queue.task_done()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
