"""Journal records: one line per commit, ``<crc32 hex> <seq> <json>``, the checksum covering
``<seq> <json>``; and the reading of a journal file, which tells a torn last record (a crash
mid-append, dropped) from damage (StoreCorrupt)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gw.core.errors import InvalidInput

from .files import corrupt, read_bytes


class BadFrame(ValueError):
    """A record that is incomplete or fails its checksum: a torn write if it is the last one."""


def encode_record(seq: int, payload: str) -> bytes:
    body = f"{seq} {payload}".encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_record(line: bytes) -> tuple[int, object]:
    """The seq and the decoded JSON of one record (without its newline)."""
    crc, _, body = line.partition(b" ")
    try:
        intact = len(crc) == 8 and int(crc, 16) == zlib.crc32(body)
    except ValueError:
        intact = False
    if not intact:
        raise BadFrame("checksum mismatch")
    seq, _, payload = body.partition(b" ")
    return int(seq), json.loads(payload)


@dataclass
class Record:
    seq: int
    change: object  # what the reader's check made of it
    size: int


@dataclass
class JournalFile:
    records: list[Record]
    good_len: int  # bytes of intact records; a torn tail lies beyond


def read_journal(path: Path, check: Callable[[object], object], *,
                 torn_tail_ok: bool) -> JournalFile:
    """The records of one journal, each change passed through `check` (which raises ValueError
    or InvalidInput for one it cannot take)."""
    data = read_bytes(path)
    records: list[Record] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        try:
            if end < 0:
                raise BadFrame("incomplete record")
            seq, payload = decode_record(data[pos:end])
            change = check(payload)
        except BadFrame as e:
            if torn_tail_ok and (end < 0 or end + 1 == len(data)):
                break
            raise corrupt(path, f"record {len(records) + 1} at byte {pos}: {e}, "
                                "and it is not the last one") from None
        except (ValueError, InvalidInput) as e:
            raise corrupt(path, f"record {len(records) + 1} at byte {pos} has an intact "
                                f"checksum but cannot be read: {e}") from None
        records.append(Record(seq, change, end + 1 - pos))
        pos = end + 1
    return JournalFile(records, pos)
