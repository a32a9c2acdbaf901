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
from .state import EXPOSURES_TABLE, decoded

STORE_TABLE = "store"
# Documents per json.dumps call when writing a snapshot: the background writer gives the GIL
# back between chunks, so a commit waits for one chunk, not for the whole snapshot.
SNAPSHOT_CHUNK = 500


@dataclass
class Snapshot:
    docs: dict[Key, dict]
    exposures: dict[Key, Exposure]  # the docs decoded
    meta: dict
    seq: int
    size: int


def read_snapshot(path: Path) -> Snapshot:
    """Reads a snapshot with TinyDB's own JSON storage; a missing or empty file: an empty store."""
    try:
        storage = JSONStorage(str(path), access_mode="r", encoding="utf-8")
    except FileNotFoundError:
        return Snapshot({}, {}, {}, 0, 0)
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {why(e)}") from e
    try:
        tables = storage.read() or {}
        size = path.stat().st_size
    except ValueError as e:
        raise corrupt(path, f"not a valid JSON document ({e})") from None
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {why(e)}") from e
    finally:
        storage.close()
    if not isinstance(tables, dict):
        raise corrupt(path, "not a TinyDB database (the top level is not an object)")
    docs, exposures = _documents(path, tables.get(EXPOSURES_TABLE, {}))
    # A TinyDB file without our table (written by hand) is a snapshot of seq 0 without meta.
    table = tables.get(STORE_TABLE, {})
    store = table.get("1", {"journal_seq": 0, "meta": {}}) if isinstance(table, dict) else None
    if not (isinstance(store, dict) and type(store.get("journal_seq")) is int
            and store["journal_seq"] >= 0 and isinstance(store.get("meta"), dict)):
        raise corrupt(path, f"table {STORE_TABLE!r} does not hold a journal_seq and a meta")
    return Snapshot(docs, exposures, store["meta"], store["journal_seq"], size)


def _documents(path: Path, table) -> tuple[dict[Key, dict], dict[Key, Exposure]]:
    if not isinstance(table, dict):
        raise corrupt(path, f"table {EXPOSURES_TABLE!r} is not an object")
    docs: dict[Key, dict] = {}
    exposures: dict[Key, Exposure] = {}
    for doc_id, doc in table.items():
        try:
            exposure = decoded(doc)
        except InvalidInput as e:
            raise corrupt(path, f"document {doc_id}: {e.message}") from None
        if exposure.key in docs:
            raise corrupt(path, f"document {doc_id}: a second document for {exposure.key}")
        docs[exposure.key] = doc
        exposures[exposure.key] = exposure
    return docs, exposures


def write_snapshot(path: Path, docs: list[dict], store_doc: dict, *, fsync: bool) -> int:
    """Writes a TinyDB file by atomic replace; the previous one stays as .bak. Returns its size."""
    tmp = sibling(path, ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f'{{"{EXPOSURES_TABLE}": {{')
            for start in range(0, len(docs), SNAPSHOT_CHUNK):
                chunk = {str(doc_id): doc for doc_id, doc in
                         enumerate(docs[start:start + SNAPSHOT_CHUNK], start + 1)}
                f.write(("" if start == 0 else ", ") + json.dumps(chunk)[1:-1])
            f.write(f'}}, "{STORE_TABLE}": {json.dumps({"1": store_doc})}}}\n')
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
