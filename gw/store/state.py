"""The store's state: exposures by key and the metadata, and the replay of a change on them.

Pure (no I/O). A change is what one journal record holds: ``{"delete": [key, ...], "put":
[document, ...], "meta": {name: value or None}}``, deletes applied before puts. The documents are
the JSON encoding of Exposures (`Exposure.to_dict`), as the journal and the snapshot hold them.
"""

from __future__ import annotations

import copy
import ipaddress
import operator
from collections.abc import Iterable, Mapping

from gw.core.errors import InvalidInput
from gw.core.exposure import FAMILIES, PROTOCOLS, Exposure, Key

from .inplace import memory_table, raw_documents

EXPOSURES_TABLE = "exposures"

_doc_key = operator.itemgetter("family", "protocol", "exposed_port")


# --- documents and changes -------------------------------------------------------------------

def checked_key(key) -> Key:
    if (not isinstance(key, (tuple, list)) or len(key) != 3
            or key[0] not in FAMILIES or key[1] not in PROTOCOLS
            or type(key[2]) is not int or not 0 < key[2] < 65536):
        raise InvalidInput(f"not an exposure key (family, protocol, exposed_port): {key!r}")
    return (key[0], key[1], key[2])


def key_of(doc) -> Key:
    try:
        key = _doc_key(doc)
    except (KeyError, TypeError):
        raise InvalidInput(f"an exposure needs family, protocol and exposed_port: {doc!r}") \
            from None
    return checked_key(key)


def decoded(doc) -> Exposure:
    """The Exposure a stored document holds; InvalidInput if it holds none."""
    key = key_of(doc)
    try:
        exposure = Exposure.from_dict(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"not an exposure document ({type(e).__name__}: {e}): {doc!r}") \
            from None
    if exposure.key != key:
        raise InvalidInput(f"family {key[0]} does not match service_ip: {doc!r}")
    return exposure


def _checked_exposure(e) -> Exposure:
    """An Exposure of exactly the types its document decodes to, so that the one a commit
    holds in memory is the one a replay of its record gives."""
    if not (isinstance(e, Exposure)
            and isinstance(e.service_ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))
            and type(e.service_port) is int and 0 < e.service_port < 65536
            and (e.service_id is None or type(e.service_id) is str)):
        raise InvalidInput(f"put takes Exposures with an IP address, a port and a str or no "
                           f"service_id, not {e!r}")
    return e


def change_of(put: Iterable[Exposure], delete: Iterable[Key], meta: Mapping | None) -> dict:
    """The validated change as it goes into a journal record; {} when there is nothing to do.
    `put` must be a list: State.apply takes it along with the change."""
    docs = [_checked_exposure(e).to_dict() for e in put]
    keys = [key_of(doc) for doc in docs]
    if len(set(keys)) != len(keys):
        raise InvalidInput("the same exposure key twice in one commit")
    change: dict = {}
    deletes = [list(checked_key(key)) for key in delete]
    if deletes:
        change["delete"] = deletes
    if docs:
        change["put"] = docs
    if meta:
        if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
            raise InvalidInput("meta must be a mapping with string keys")
        change["meta"] = dict(meta)
    return change


def checked_change(change) -> dict:
    """A change read back from a journal record has the shape change_of gives it."""
    if not isinstance(change, dict) or not set(change) <= {"put", "delete", "meta"}:
        raise ValueError("not a change record")
    for doc in change.get("put", ()):
        decoded(doc)
    for key in change.get("delete", ()):
        checked_key(key)
    if not isinstance(change.get("meta", {}), dict):
        raise ValueError("meta is not an object")
    return change


# --- the state ---------------------------------------------------------------------------------

class State:
    """Exposures and meta as of journal record `seq`. TinyDB holds the documents (the encoding,
    which a snapshot writes out), an index maps key -> doc id so that lookups never scan, and
    each document is decoded once into the (immutable) Exposure that reads hand out.
    Not thread-safe: the store guards it."""

    def __init__(self, docs: Mapping[Key, dict], meta: dict, seq: int,
                 exposures: dict[Key, Exposure] | None = None):
        """`exposures`: the documents already decoded, if the caller has them."""
        self.table = memory_table(EXPOSURES_TABLE)
        doc_ids = self.table.insert_multiple(docs.values())
        self.index: dict[Key, int] = dict(zip(docs, doc_ids))
        self.exposures = exposures if exposures is not None else {
            key: Exposure.from_dict(doc) for key, doc in docs.items()}
        self.meta = meta
        self.seq = seq

    def apply(self, change: Mapping, seq: int,
              exposures: Iterable[Exposure] | None = None) -> None:
        """Replay of change number `seq`: at open from the journal, and of each commit.
        `exposures`: the documents of its put already decoded (a commit has them)."""
        self.seq = seq
        for key in change.get("delete", ()):
            key = tuple(key)
            doc_id = self.index.pop(key, None)
            if doc_id is not None:
                self.table.remove(doc_ids=[doc_id])
                del self.exposures[key]
        docs = change.get("put", ())
        for doc, exposure in zip(docs, exposures if exposures is not None
                                 else map(Exposure.from_dict, docs)):
            key = exposure.key
            if key in self.index:
                self.table.remove(doc_ids=[self.index[key]])
            self.index[key] = self.table.insert(doc)
            self.exposures[key] = exposure
        for name, value in change.get("meta", {}).items():
            if value is None:
                self.meta.pop(name, None)
            else:
                self.meta[name] = value

    def documents(self) -> list[dict]:
        """All documents as TinyDB holds them. They are never changed in place (a put inserts a
        new dict), so this list stays a consistent picture after the store's lock is released,
        at a fraction of the cost of copying them."""
        return raw_documents(self.table)

    def copy_meta(self) -> dict:
        return copy.deepcopy(self.meta)

    def by_key(self) -> dict[Key, dict]:
        return {key: dict(self.table.get(doc_id=doc_id)) for key, doc_id in self.index.items()}

    def problems(self) -> list[str]:
        """Where the table, the index and the decoded exposures disagree (empty: nowhere)."""
        problems = []
        if not len(self.table) == len(self.index) == len(self.exposures):
            problems.append(f"the index holds {len(self.index)} keys, the table "
                            f"{len(self.table)} documents, {len(self.exposures)} exposures")
        for key, doc_id in self.index.items():
            doc = self.table.get(doc_id=doc_id)
            if doc is None or _doc_key(doc) != key:
                problems.append(f"the index maps {key} to document {doc_id}, which is {doc}")
            elif self.exposures.get(key) != Exposure.from_dict(doc):
                problems.append(f"document {doc_id} holds another exposure than {key} does")
        return problems

    def same_as(self, other: State) -> bool:
        return (self.by_key(), self.meta) == (other.by_key(), other.meta)
