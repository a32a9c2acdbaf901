"""The daemon's side of the role file that `oakestra-gw ha notify` writes (gw.service.ha_notify):
this gateway's role in its pair, read whenever /api/ready, /api/status or /metrics asks.

A stat() per read; the file is parsed again only when it was replaced. So a daemon started
after keepalived's last change knows the role at once, and one running sees a change on its
next answer, whatever order the daemon, keepalived and the notify started in.

`RoleWatcher` notices a change without a request (in Oakestra mode the new master announces
itself to the cluster): a thread that reads the file every `interval` seconds (one stat()
when nothing changed) and calls back on each change. Polling, not inotify: the writer
replaces the file (a rename into the directory), the cost is one stat() per interval, and
it needs no library and no second protocol between writer and reader.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from ..core.ha_events import read_record

log = logging.getLogger(__name__)

# Seconds between two looks at the role file: small beside a failover (about 0.5 s).
WATCH_INTERVAL = 0.2


class RoleFile:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple | None = None
        self._record: dict = {"role": "unknown"}

    def read(self) -> dict:
        """{"role", "since"?, "failed"?, "problem"?}; "unknown" before keepalived said
        anything (no file), with a problem when the file cannot be read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {"role": "unknown"}
        except OSError as exc:
            return {"role": "unknown", "problem": f"cannot read {self.path}: {exc.strerror}"}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key != self._seen:
                try:
                    with open(self.path, encoding="utf-8") as f:
                        self._record = read_record(f.read())
                except (OSError, UnicodeDecodeError) as exc:
                    return {"role": "unknown", "problem": f"cannot read {self.path}: {exc}"}
                self._seen = key
            return dict(self._record)


def change_of(last: dict | None, record: dict) -> bool:
    """Pure: whether `record` is another role change than `last` (None: nothing seen yet).
    A change is the role and its time: master, backup and master again between two looks is
    a new promotion (the other node may have announced itself meanwhile)."""
    return last is None or (last["role"], last.get("since")) != (record["role"],
                                                                 record.get("since"))


class RoleWatcher:
    """Calls `on_change(old_role, record)` from a thread of its own for each role change it
    sees: first with the role at start (old_role None), then on every change of the file.
    A failing callback is logged; the watcher goes on."""

    def __init__(self, roles: RoleFile, on_change: Callable[[str | None, dict], None],
                 interval: float = WATCH_INTERVAL):
        self.roles = roles
        self.on_change = on_change
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RoleWatcher":
        self._thread = threading.Thread(target=self._run, name="ha-role-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last: dict | None = None
        while True:
            record = self.roles.read()
            if change_of(last, record):
                try:
                    self.on_change(last["role"] if last else None, record)
                except Exception:  # noqa: BLE001 - the next change must still be seen
                    log.exception("handling the role change to %s failed", record["role"])
                last = record
            if self._stop.wait(self.interval):
                return

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
