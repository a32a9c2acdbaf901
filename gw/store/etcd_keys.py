"""The etcd store's pure parts: where an exposure lives in etcd, how it is encoded, and the one
transaction a commit is (no I/O).

A key per exposure, ``<prefix>/exposures/<family>/<protocol>/<port>``, holding the exposure's
document (`Exposure.to_dict`) as JSON. A commit compares every key it touches with what this
gateway believes: absent (create_revision == 0) or last written at the revision it read. So two
gateways adding the same port at once are decided by etcd: one transaction succeeds, the other
fails and reads back what is there (its failure branch), and answers from that.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from gw.core.errors import InvalidInput
from gw.core.exposure import Exposure, Key

from . import etcd_client as ec
from .state import checked_key, decoded


def table_prefix(prefix: str) -> bytes:
    return f"{prefix.rstrip('/')}/exposures/".encode()


def key_bytes(prefix: str, key: Key) -> bytes:
    family, protocol, port = checked_key(key)
    return table_prefix(prefix) + f"{family}/{protocol}/{port}".encode()


def key_from(prefix: str, raw: bytes) -> Key | None:
    """The exposure key an etcd key names; None for a key that names none (not ours)."""
    head = table_prefix(prefix)
    if not raw.startswith(head):
        return None
    parts = raw[len(head):].decode("utf-8", "replace").split("/")
    if len(parts) != 3 or not parts[2].isdigit() or parts[2] != str(int(parts[2])):
        return None
    try:
        return checked_key((parts[0], parts[1], int(parts[2])))
    except InvalidInput:
        return None


def encode(e: Exposure) -> bytes:
    return json.dumps(e.to_dict(), separators=(",", ":"), sort_keys=True).encode()


def decode(raw: bytes) -> Exposure:
    """InvalidInput if the value holds no exposure."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InvalidInput(f"not JSON: {raw[:200]!r}") from None
    return decoded(doc)


def read_kv(prefix: str, kv: ec.KeyValue) -> tuple[Key, Exposure] | None:
    """The exposure a stored kv holds, under its key; None for a kv that is not one (another
    tool's key under our prefix, a value that does not decode, a key that names another port
    than its value: never loaded into the kernel)."""
    key = key_from(prefix, kv.key)
    if key is None:
        return None
    try:
        e = decode(kv.value)
    except InvalidInput:
        return None
    return (key, e) if e.key == key else None


def commit_txn(prefix: str, put: Iterable[Exposure], delete: Iterable[Key],
               revisions: Mapping[Key, int]) -> tuple[list, list, list]:
    """(compare, success, failure) of one commit: every key touched must be as this gateway
    believes (`revisions`: the mod revision it read, absent: not there); then deletes, then
    puts; else the failure branch reads each touched key back."""
    put = list(put)
    written = {e.key for e in put}
    # A put overwrites: etcd takes no delete and put of one key in a transaction.
    delete = [k for k in map(checked_key, delete) if k not in written]
    keys = list(dict.fromkeys(delete + [e.key for e in put]))
    compare = [ec.unchanged(key_bytes(prefix, k), revisions[k]) if revisions.get(k)
               else ec.absent(key_bytes(prefix, k)) for k in keys]
    success = ([ec.delete(key_bytes(prefix, k)) for k in delete]
               + [ec.put(key_bytes(prefix, e.key), encode(e)) for e in put])
    failure = [ec.get(key_bytes(prefix, k)) for k in keys]
    return compare, success, failure
