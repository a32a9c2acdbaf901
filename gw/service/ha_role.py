"""The daemon's side of the role file that `oakestra-gw ha notify` writes (gw.service.ha_notify):
this gateway's role in its pair, read whenever /api/ready, /api/status or /metrics asks.

A stat() per read; the file is parsed again only when it was replaced. So a daemon started
after keepalived's last change knows the role at once, and one running sees a change on its
next answer, whatever order the daemon, keepalived and the notify started in.
"""

from __future__ import annotations

import os
import threading

from ..core.ha_events import read_record


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
