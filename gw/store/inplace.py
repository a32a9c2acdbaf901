"""TinyDB patched to change a table in place: the one place that reaches into TinyDB's internals.

TinyDB's Table rebuilds the whole table dict on every write, so a write costs O(documents). The
store keeps its documents in a MemoryStorage, where the change can be applied to the stored dict
directly: O(1) per document. Pinned to TinyDB's `Table._update_table` and `_storage` (TinyDB 4).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

from tinydb import TinyDB
from tinydb.storages import MemoryStorage
from tinydb.table import Table


class _IntKeyed(MutableMapping):
    """A raw TinyDB table (str ids, as the storage holds them) seen with int ids, as the
    updaters of Table expect them."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict):
        self.raw = raw

    def __getitem__(self, doc_id: int):
        return self.raw[str(doc_id)]

    def __setitem__(self, doc_id: int, doc) -> None:
        self.raw[str(doc_id)] = doc

    def __delitem__(self, doc_id: int) -> None:
        del self.raw[str(doc_id)]

    def __iter__(self) -> Iterator[int]:
        return map(int, self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class InPlaceTable(Table):
    """A Table whose writes change the storage's dict in place."""

    def _update_table(self, updater) -> None:
        tables = self._storage.read()
        updater(_IntKeyed(tables.setdefault(self.name, {})))
        self.clear_cache()


class _MemoryDB(TinyDB):
    table_class = InPlaceTable


def memory_table(name: str) -> InPlaceTable:
    """A fresh, empty table in memory."""
    db = _MemoryDB(storage=MemoryStorage)
    db.storage.write({})
    return db.table(name)


def raw_documents(table: Table) -> list[dict]:
    """All documents of `table` as its storage holds them, without copying them."""
    return list(table.storage.read().get(table.name, {}).values())
