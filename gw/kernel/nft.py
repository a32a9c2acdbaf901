"""The seam to nftables: the `Nft` protocol the firewall speaks, the two refusals code
branches on, and the libnftables session that implements it (the in-memory one is
gw/kernel/fake.py; see docs/architecture.md). nft's own error text is carried in
`KernelRefused`.

Every command runs on one dedicated thread. A context is not thread-safe, and the kernel
stamps each committed generation with the id of the *thread* that committed it (the global
one, as seen from the host even when we run in a container). One thread means one id, which
the drift watcher learns from `probe()` and uses to skip our own commits.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from ..core import ruleset
from ..core.errors import KernelRefused

PROBE_TABLE = "oakestra_gw_probe"
# Whole-table commits remembered as ours: they are rare (start, repair, reload), and a loss of
# monitor events spans a few at most.
OWN_GENERATIONS = 64


class AlreadyExists(KernelRefused):
    """EEXIST: an element's key is in the map with another target."""


class NoSuchObject(KernelRefused):
    """ENOENT: the element, the map or our table is not there."""


# nft's words for the two refusals (strerror of EEXIST and ENOENT): read here only.
EXISTS_WORDS, MISSING_WORDS = "File exists", "No such file or directory"
_REFUSALS = ((AlreadyExists, EXISTS_WORDS), (NoSuchObject, MISSING_WORDS))


def refusal(message: str) -> KernelRefused:
    """The error for nft's message: one of the two named refusals, or a plain one."""
    for cls, words in _REFUSALS:
        if words in message:
            return cls(message)
    return KernelRefused(message)


class Nft(Protocol):
    """What the firewall needs of nftables. `list_*` are `nft -j` JSON of our table; the maps'
    elements and the chains' rules are read without nft (gw/kernel/nfnl.py), which would
    fetch every element first. A missing table or map raises `NoSuchObject`."""

    def apply(self, tx: ruleset.Transaction) -> None:
        """One transaction of `ruleset` ops, all or nothing."""

    def list_table(self, terse: bool = False) -> dict:
        """Our table; `terse` leaves out set and map elements."""

    def map_elements(self, family: str) -> list[bytes]:
        """One family's map elements, undecoded: what `elements.decode_nests` reads."""

    def chain_rules(self) -> dict[str, list]:
        """Our chains' rules, in a form equal for equal loads (empty: no chains, or no
        table)."""

    def list_counters(self) -> dict:
        """Our table's named counters."""

    def reference(self, tx: ruleset.Transaction) -> dict[str, list]:
        """`chain_rules` as `tx` would leave them on an empty ruleset, touching nothing: the
        reference an edited chain is told by."""

    def probe(self) -> None:
        """A commit that leaves the ruleset as it was (see `NftSession.probe`)."""

    def generations(self) -> tuple[int, frozenset[int]]:
        """The ruleset's current generation, and the recent generations that are our own
        whole-table commits (see `NftSession.generations`)."""

    def close(self) -> None: ...


class NftSession:
    """Element changes go through one long-lived libnftables context. A whole-table command (a
    load, any listing: nft 1.0.6 fetches every map element into its cache even for a terse
    listing or one counter) gets a context of its own, freed when it is done and its memory
    handed back to the system, so that the cache of every element (some hundred bytes each)
    does not stay in the daemon."""

    def __init__(self):
        import nftables  # Debian's python3-nftables; imported here so pure modules never need it

        self._new_context = nftables.Nftables
        self._nft = self._context()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft")
        self._netlink = None  # for the generation id; opened on the nft thread when needed
        self._own: deque[int] = deque(maxlen=OWN_GENERATIONS)

    def _context(self):
        nft = self._new_context()
        nft.set_json_output(False)
        nft.set_handle_output(False)
        return nft

    def _cmd(self, text: str, json_output: bool, terse: bool = False,
             whole: bool = True) -> tuple[int, str, str]:
        return self._thread.submit(self._call, text, json_output, terse, whole).result()

    def _call(self, text: str, json_output: bool, terse: bool = False,
              whole: bool = True) -> tuple[int, str, str]:
        """On the nft thread only."""
        if not whole:
            return self._nft.cmd(text)
        nft = self._context()
        nft.set_json_output(json_output)
        nft.set_terse_output(terse)
        try:
            return nft.cmd(text)
        finally:
            del nft  # nft_ctx_free: the cache goes
            _give_back_memory()

    def run(self, text: str, whole: bool = True) -> str:
        """Run nft commands as one transaction; returns nft's output. `whole`: in a context
        of its own (see the class)."""
        rc, out, err = self._cmd(text, False, whole=whole)
        if rc != 0:
            raise refusal(f"nftables refused the change: {_first_error(err)}")
        return out

    def run_json(self, text: str, terse: bool = False) -> dict:
        """Run a listing command and return its JSON output; `terse` leaves out set and map
        elements (a few kB instead of MBs with many elements)."""
        rc, out, err = self._cmd(text, True, terse)
        if rc != 0:
            raise refusal(f"nftables refused: {_first_error(err)}")
        return json.loads(out) if out.strip() else {"nftables": []}

    def apply(self, tx: ruleset.Transaction) -> None:
        whole = any(isinstance(op, (ruleset.ReplaceTable, ruleset.DeleteTable)) for op in tx)
        if not whole:
            self.run(ruleset.script(tx), whole=False)
            return
        # A whole-table commit prints an event per element: more than `nft monitor` can take
        # in one go, so the drift watcher may be told that events were lost. Which generation
        # this commit got lets it tell a loss of our own events from a loss of someone
        # else's; the generation is only known to be ours when nothing else committed between
        # the two reads.
        # The three steps are one job on the nft thread: as three, a `generations()` (the
        # drift watcher judging that very loss) could run between the commit and the second
        # read, see the new generation unclaimed and repair the whole table for nothing.
        text = ruleset.script(tx)

        def commit():
            before = self._generation()
            rc, _, err = self._call(text, False)
            if rc == 0 and self._generation() == before + 1:
                self._own.append(before + 1)
            return rc, err

        rc, err = self._thread.submit(commit).result()
        if rc != 0:
            raise refusal(f"nftables refused the change: {_first_error(err)}")

    def list_table(self, terse: bool = False) -> dict:
        return self.run_json(f"list table {ruleset.TABLE}", terse=terse)

    def map_elements(self, family: str) -> list[bytes]:
        """In the caller's thread, not the nft thread: it needs no libnftables context, and
        the firewall reads both maps at once. Whoever reads the whole table holds the
        gateway's lock, so no change of ours is queued meanwhile."""
        from . import nfnl  # noqa: PLC0415 - it raises this module's refusals

        return nfnl.set_elements(ruleset.MAPS[family])

    def chain_rules(self) -> dict[str, list]:
        from . import nfnl  # noqa: PLC0415

        return self._thread.submit(nfnl.chain_rules).result()

    def list_counters(self) -> dict:
        return self.run_json(f"list counters table {ruleset.TABLE}")

    def reference(self, tx: ruleset.Transaction) -> dict[str, list]:
        """Loads `tx` in a network namespace of its own, which goes with the process: the
        host's ruleset never holds it, even for a moment. Its chains are read there by
        gw/kernel/nfnl.py run as a program, as `chain_rules` reads ours."""
        package = str(Path(__file__).resolve().parents[2])
        proc = subprocess.run(
            ["unshare", "--net", "sh", "-c", 'nft -f - && exec "$0" -m gw.kernel.nfnl',
             sys.executable],
            input=ruleset.script(tx), capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": package}, cwd=package)
        if proc.returncode != 0:
            raise refusal(f"nftables refused the reference: {_first_error(proc.stderr)}")
        return json.loads(proc.stdout)

    def probe(self) -> None:
        """An empty transaction that names `PROBE_TABLE` (created and deleted at once, so the
        ruleset never shows it): the monitor then tells which id our commits carry."""
        self.run(f"add table inet {PROBE_TABLE}\ndelete table inet {PROBE_TABLE}", whole=False)

    def generations(self) -> tuple[int, frozenset[int]]:
        """The kernel's current ruleset generation and our recent whole-table commits' ones.
        A loss of monitor events is harmless when every generation it spans is one of them."""
        return self._thread.submit(lambda: (self._generation(), frozenset(self._own))).result()

    def _generation(self) -> int:
        """NFT_MSG_GETGEN over netlink: a few bytes, whatever the table holds (an nft listing
        would fetch every element)."""
        from pyroute2.netlink import NLM_F_REQUEST  # noqa: PLC0415 - only the daemon needs it
        from pyroute2.netlink.nfnetlink.nftsocket import (  # noqa: PLC0415
            NFT_MSG_GETGEN, NFTSocket, nft_gen_msg)

        if self._netlink is None:
            self._netlink = NFTSocket()
        (answer,) = self._netlink.request_get(nft_gen_msg(), NFT_MSG_GETGEN,
                                              msg_flags=NLM_F_REQUEST)
        return answer.get_attr("NFTA_GEN_ID")

    def close(self) -> None:
        if self._netlink is not None:
            self._thread.submit(self._netlink.close).result()
            self._netlink = None
        self._thread.shutdown(wait=True)


def _give_back_memory() -> None:
    """What a freed context used goes back to the system (glibc keeps freed heap otherwise)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _LIBC = ctypes.CDLL(None)
except OSError:  # not a dynamically linked glibc process: nothing to hand back this way
    _LIBC = None


def _first_error(err: str) -> str:
    """nft prints the error, then the offending command and a caret line: keep it compact."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line]
    text = "; ".join(errors[:3]) if errors else " ".join(lines[:3])
    return text or "unknown error"
