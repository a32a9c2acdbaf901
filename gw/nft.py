"""The libnftables session: one context for the whole process, used under a lock (a context is
not thread-safe), with nft's own error text carried in `KernelRefused`."""

from __future__ import annotations

import json
import threading
from .errors import KernelRefused


class NftSession:
    def __init__(self):
        import nftables  # Debian's python3-nftables; imported here so pure modules never need it

        self._nft = nftables.Nftables()
        self._nft.set_json_output(False)
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()

    def run(self, text: str) -> str:
        """Run nft commands as one transaction; returns nft's output."""
        with self._lock:
            rc, out, err = self._nft.cmd(text)
        if rc != 0:
            raise KernelRefused(f"nftables refused the change: {_first_error(err)}")
        return out

    def run_json(self, text: str) -> dict:
        """Run a listing command and return its JSON output."""
        with self._lock:
            self._nft.set_json_output(True)
            try:
                rc, out, err = self._nft.cmd(text)
            finally:
                self._nft.set_json_output(False)
        if rc != 0:
            raise KernelRefused(f"nftables refused: {_first_error(err)}")
        return json.loads(out) if out.strip() else {"nftables": []}


def _first_error(err: str) -> str:
    """nft prints the error, then the offending command and a caret line: keep it compact."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line]
    text = "; ".join(errors[:3]) if errors else " ".join(lines[:3])
    return text or "unknown error"
