"""The snapshot: a TinyDB JSON file (plain ``TinyDB(path)`` reads it), written by atomic replace.

Table ``exposures`` holds the documents, table ``store`` one document ``{"journal_seq": N,
"meta": {...}}``: N is the last journal record the snapshot contains.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tinydb.storages import JSONStorage

from gw.core.errors import InvalidInput, StoreUnavailable
from gw.core.exposure import Exposure, Key

from .files import corrupt, fsync_dir, keep_backup, sibling, why
from .state import EXPOSURES_TABLE, Shared, decoded

STORE_TABLE = "store"
# Documents per json.dumps call when writing a snapshot: the background writer gives the GIL
# back between chunks, so a commit waits for one chunk, not for the whole snapshot.
SNAPSHOT_CHUNK = 500


@dataclass
class Snapshot:
    exposures: list[Exposure]  # its documents decoded
    meta: dict
    seq: int
    size: int
    shared: Shared  # the service IPs and ids decoded


def read_snapshot(path: Path) -> Snapshot:
    """Reads a snapshot; a missing or empty file: an empty store. One that this module wrote is
    read a line (a chunk of documents) at a time, so memory never holds all the documents at
    once; any other TinyDB file is read whole with TinyDB's own JSON storage."""
    streamed = None
    try:
        with open(path, encoding="utf-8") as f:
            size = os.fstat(f.fileno()).st_size
            with contextlib.suppress(UnicodeDecodeError):  # the whole read names the problem
                streamed = _read_lines(path, f)
    except FileNotFoundError:
        return Snapshot([], {}, 0, 0, Shared())
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {why(e)}") from e
    if streamed is not None:
        exposures, shared, tables = streamed
    else:
        tables, shared = _read_whole(path), Shared()
        if not isinstance(tables, dict):
            raise corrupt(path, "not a TinyDB database (the top level is not an object)")
        exposures = _documents(path, tables.get(EXPOSURES_TABLE, {}), shared, set())
    # A TinyDB file without our table (written by hand) is a snapshot of seq 0 without meta.
    table = tables.get(STORE_TABLE, {})
    store = table.get("1", {"journal_seq": 0, "meta": {}}) if isinstance(table, dict) else None
    if not (isinstance(store, dict) and type(store.get("journal_seq")) is int
            and store["journal_seq"] >= 0 and isinstance(store.get("meta"), dict)):
        raise corrupt(path, f"table {STORE_TABLE!r} does not hold a journal_seq and a meta")
    return Snapshot(exposures, store["meta"], store["journal_seq"], size, shared)


_HEAD = f'{{"{EXPOSURES_TABLE}": {{\n'
_TAIL = f'}}, "{STORE_TABLE}": '


def _read_lines(path: Path, f) -> tuple[list[Exposure], Shared, dict] | None:
    """The layout write_snapshot gives a file: the head line, one line per chunk of documents
    (ending in a comma but the last), and the store table on the last line. None for a file
    laid out otherwise (it is valid JSON or not: the whole read tells)."""
    if f.readline() != _HEAD:
        return None
    exposures: list[Exposure] = []
    shared, seen = Shared(), set()
    for line in f:
        if line.startswith(_TAIL):
            if f.read():
                return None
            try:
                tables = json.loads("{" + line[len("}, "):])
            except ValueError:
                return None
            return (exposures, shared, tables) if isinstance(tables, dict) else None
        try:
            chunk = json.loads("{" + line.rstrip().rstrip(",") + "}")
        except ValueError:
            return None
        exposures += _documents(path, chunk, shared, seen)
    return None


def _read_whole(path: Path):
    try:
        storage = JSONStorage(str(path), access_mode="r", encoding="utf-8")
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {why(e)}") from e
    try:
        return storage.read() or {}
    except ValueError as e:
        raise corrupt(path, f"not a valid JSON document ({e})") from None
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {why(e)}") from e
    finally:
        storage.close()


def _documents(path: Path, table, shared: Shared, seen: set[Key]) -> list[Exposure]:
    if not isinstance(table, dict):
        raise corrupt(path, f"table {EXPOSURES_TABLE!r} is not an object")
    exposures: list[Exposure] = []
    for doc_id, doc in table.items():
        try:
            exposure = decoded(doc, shared)
        except InvalidInput as e:
            raise corrupt(path, f"document {doc_id}: {e.message}") from None
        key = exposure.key
        if key in seen:
            raise corrupt(path, f"document {doc_id}: a second document for {key}")
        seen.add(key)
        exposures.append(exposure)
    return exposures


def write_snapshot(path: Path, exposures: list[Exposure], store_doc: dict, *,
                   fsync: bool) -> int:
    """Writes a TinyDB file of these exposures' documents by atomic replace; the previous one
    stays as .bak. Returns its size."""
    tmp = sibling(path, ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            # A chunk a line (see _read_lines): still one TinyDB JSON document.
            f.write(_HEAD)
            for start in range(0, len(exposures), SNAPSHOT_CHUNK):
                chunk = {str(doc_id): e.to_dict() for doc_id, e in
                         enumerate(exposures[start:start + SNAPSHOT_CHUNK], start + 1)}
                last = start + SNAPSHOT_CHUNK >= len(exposures)
                f.write(json.dumps(chunk)[1:-1] + ("\n" if last else ",\n"))
            f.write(f'{_TAIL}{json.dumps({"1": store_doc})}}}\n')
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        keep_backup(path)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return size
