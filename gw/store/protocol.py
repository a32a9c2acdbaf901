"""What the gateway and the daemon need of a store (docs/architecture.md).

The TinyDB store (gw/store/local.py) is the embedded implementation; a backend that shares one
table between gateways (etcd) implements the same protocol beside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from gw.core.exposure import Exposure, Key


class Store(Protocol):
    """The exposures by key and the gateway's metadata (its id and addresses), durable."""

    #: Told why, once, when the store stops taking changes for good (the daemon exits on it).
    on_poisoned: Callable[[str], None] | None

    def get(self, key: Key) -> Exposure | None:
        """The exposure stored under `key`, if any."""

    def exposures(self) -> list[Exposure]:
        """All exposures, sorted by key."""

    def counts(self) -> Counter:
        """Exposures by (family, protocol)."""

    def meta(self) -> dict:
        """A copy of the metadata."""

    def commit(self, put: Iterable[Exposure] = (), delete: Iterable[Key] = (),
               meta: Mapping | None = None) -> None:
        """One atomic change, durable when this returns, or not applied at all (it raises
        StoreUnavailable, or InvalidInput for a change it cannot hold). Deletes apply before
        puts; a meta value None removes that name."""

    def close(self) -> None:
        """Release the store; later changes raise StoreUnavailable."""
