"""Logging of the daemon: the level and format from `[log]`, and the audit record.

`text` (the default) is `LEVEL logger: message`; under journald (JOURNAL_STREAM) a
`<priority>` prefix replaces the level, so `journalctl -p err` works, and journald adds the
timestamps. `json` is one JSON object per line (time, level, logger, message), and an audit
record carries its fields as keys of their own (`who`, `what`, `result`), so a log shipper can
query them without parsing the message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}
AUDIT_FIELDS = ("who", "what", "result")


class TextFormatter(logging.Formatter):
    def __init__(self, journal: bool):
        super().__init__("%(name)s: %(message)s")
        self.journal = journal

    def format(self, record):
        text = super().format(record).replace("\n", "\n    ")
        if self.journal:
            return f"<{PRIORITY.get(record.levelno, 6)}>{text}"
        return f"{record.levelname} {text}"


class JsonFormatter(logging.Formatter):
    def format(self, record):
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
               f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        for name in AUDIT_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Route every logger to stderr with `level` and `fmt`; called again on reload."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else TextFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
