"""The libnftables session: one context for the whole process, with nft's own error text
carried in `KernelRefused`.

Every command runs on one dedicated thread. A context is not thread-safe, and the kernel
stamps each committed generation with the id of the *thread* that committed it (the global
one, as seen from the host even when we run in a container). One thread means one id, which
the drift watcher learns from `probe()` and uses to skip our own commits.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from ..core.errors import KernelRefused

PROBE_TABLE = "oakestra_gw_probe"


class NftSession:
    def __init__(self):
        import nftables  # Debian's python3-nftables; imported here so pure modules never need it

        self._nft = nftables.Nftables()
        self._nft.set_json_output(False)
        self._nft.set_handle_output(False)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft")

    def _cmd(self, text: str, json_output: bool, terse: bool = False) -> tuple[int, str, str]:
        def call():
            self._nft.set_json_output(json_output)
            self._nft.set_terse_output(terse)
            try:
                return self._nft.cmd(text)
            finally:
                self._nft.set_json_output(False)
                self._nft.set_terse_output(False)

        return self._thread.submit(call).result()

    def run(self, text: str) -> str:
        """Run nft commands as one transaction; returns nft's output."""
        rc, out, err = self._cmd(text, False)
        if rc != 0:
            raise KernelRefused(f"nftables refused the change: {_first_error(err)}")
        return out

    def run_json(self, text: str, terse: bool = False) -> dict:
        """Run a listing command and return its JSON output; `terse` leaves out set and map
        elements (a third of the time, a few kB instead of MBs at 50k elements)."""
        rc, out, err = self._cmd(text, True, terse)
        if rc != 0:
            raise KernelRefused(f"nftables refused: {_first_error(err)}")
        return json.loads(out) if out.strip() else {"nftables": []}

    def probe(self) -> None:
        """An empty transaction that names `PROBE_TABLE` (created and deleted at once, so the
        ruleset never shows it): the monitor then tells which id our commits carry."""
        self.run(f"add table inet {PROBE_TABLE}\ndelete table inet {PROBE_TABLE}")

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _first_error(err: str) -> str:
    """nft prints the error, then the offending command and a caret line: keep it compact."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line]
    text = "; ".join(errors[:3]) if errors else " ".join(lines[:3])
    return text or "unknown error"
