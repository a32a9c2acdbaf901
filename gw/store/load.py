"""Opening a store's files: the snapshot plus the journals since, replayed into a State.
Reads only: it raises StoreCorrupt (or StoreUnavailable if a file cannot be read) and never
writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gw.core.errors import StoreCorrupt, StoreUnavailable

from .files import corrupt, segments, sibling
from .records import read_journal
from .snapshot import read_snapshot
from .state import State, checked_change


@dataclass
class Loaded:
    state: State        # state.seq: the last change applied
    snap_seq: int       # the last change the snapshot holds
    snap_size: int
    journal_len: int    # intact bytes of the current journal
    replay_size: int    # journal bytes replayed on top of the snapshot


def load(path: Path, snapshot: Path | None = None) -> Loaded:
    """The state the files of the store at `path` hold: its snapshot (or another one, e.g. the
    .bak) plus the journals."""
    snap = read_snapshot(snapshot or path)
    state = State(snap.exposures, snap.meta, snap.seq, snap.shared)
    del snap.exposures[:]  # the state holds them now
    loaded = Loaded(state, snap.seq, snap.size, 0, 0)
    current = sibling(path, ".journal")
    for segment in [p for _, p in segments(path)] + [current]:
        journal = read_journal(segment, lambda change: checked_change(change, state.shared),
                               torn_tail_ok=segment == current)
        for record in journal.records:
            if record.seq <= snap.seq and state.seq == snap.seq:
                continue  # the snapshot holds it
            if record.seq != state.seq + 1:
                snap_path = snapshot or path
                if state.seq == snap.seq == snap.size == 0 and sibling(path, ".bak").exists():
                    # A compacted store always has a snapshot: this one was lost or emptied,
                    # not the journal's head.
                    raise corrupt(snap_path, f"is {'empty' if snap_path.exists() else 'missing'}"
                                             f", but the store was compacted before (a .bak "
                                             f"exists) and {segment.name} continues from seq "
                                             f"{record.seq}")
                raise corrupt(segment, f"record seq {record.seq} follows seq {state.seq} (the "
                                       f"snapshot holds up to {snap.seq}): records are missing")
            state.apply(record.change, record.seq)
            loaded.replay_size += record.size
    loaded.journal_len = journal.good_len  # of the current journal, read last
    return loaded


def backup_problems(path: Path, loaded: Loaded) -> list[str]:
    """The .bak with the journals kept since it must give the same state: the recovery path."""
    bak = sibling(path, ".bak")
    if not bak.exists():
        return []
    try:
        fallback = load(path, snapshot=bak)
    except (StoreCorrupt, StoreUnavailable) as e:
        return [f"the fallback {bak} is not usable: {e.message}"]
    if not fallback.state.same_as(loaded.state):
        return [f"the fallback {bak} with the journals gives another state than {path}"]
    return []
