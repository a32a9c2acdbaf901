"""What the gateway and the daemon need of a store (docs/architecture.md).

The TinyDB store (gw/store/local.py) is the embedded implementation; a backend that shares one
table between gateways (etcd) implements the same protocol beside it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from gw.core.errors import StoreUnavailable
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


#: What a store learnt of a key: (what it held before, what it holds now), None for absent.
Learnt = tuple[Exposure | None, Exposure | None]


class Outdated(StoreUnavailable):
    """A shared store refused a commit because another gateway changed a key it touches first.
    The store has already taken what is there now (`learnt`, for the caller's kernel); the
    caller decides again on the fresh state."""

    code = "store_outdated"

    def __init__(self, learnt: list[Learnt]):
        super().__init__("another gateway changed these exposures first: "
                         + ", ".join(str((new or old).key) for old, new in learnt))
        self.learnt = learnt
