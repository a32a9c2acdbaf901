"""The store's state: exposures by key and the metadata, and the replay of a change on them.

Pure (no I/O). A change is what one journal record holds: ``{"delete": [key, ...], "put":
[document, ...], "meta": {name: value or None}}``, deletes applied before puts. The documents are
the JSON encoding of Exposures (`Exposure.to_dict`), as the journal and the snapshot hold them;
in memory a change is a `Change` of Exposures, each document decoded once.
"""

from __future__ import annotations

import copy
import ipaddress
import operator
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gw.core.errors import InvalidInput
from gw.core.exposure import FAMILIES, PROTOCOLS, Exposure, Key, parse_ip_text

EXPOSURES_TABLE = "exposures"

_doc_key = operator.itemgetter("family", "protocol", "exposed_port")


# --- documents and changes -------------------------------------------------------------------

# One object per port number and per protocol word, shared by every exposure that names it:
# what JSON decodes is a new object each time otherwise.
_PORTS = tuple(range(65536))
_PROTOCOLS = {p: p for p in PROTOCOLS}


def checked_key(key) -> Key:
    if (not isinstance(key, (tuple, list)) or len(key) != 3
            or key[0] not in FAMILIES or key[1] not in PROTOCOLS
            or type(key[2]) is not int or not 0 < key[2] < 65536):
        raise InvalidInput(f"not an exposure key (family, protocol, exposed_port): {key!r}")
    return (key[0], _PROTOCOLS[key[1]], _PORTS[key[2]])


def key_of(doc) -> Key:
    try:
        key = _doc_key(doc)
    except (KeyError, TypeError):
        raise InvalidInput(f"an exposure needs family, protocol and exposed_port: {doc!r}") \
            from None
    return checked_key(key)


class Shared:
    """The service IPs (by their text) and service ids decoded so far: equal ones are one
    object in memory, however many exposures name them."""

    __slots__ = ("ips", "ids")

    def __init__(self):
        self.ips: dict[str, object] = {}
        self.ids: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.ips) + len(self.ids)

    def clear(self) -> None:
        self.ips.clear()
        self.ids.clear()

    def exposure(self, e: Exposure) -> Exposure:
        """`e` made of shared objects (an Exposure a commit got from a request)."""
        ip = self.ips.setdefault(str(e.service_ip), e.service_ip)
        sid = e.service_id if e.service_id is None else self.ids.setdefault(e.service_id,
                                                                            e.service_id)
        return Exposure(_PORTS[e.exposed_port], _PROTOCOLS[e.protocol], ip,
                        _PORTS[e.service_port], sid)


def decoded(doc, shared: Shared | None = None) -> Exposure:
    """The Exposure a stored document holds; InvalidInput if it holds none. `shared`: the
    objects to reuse (and add to)."""
    family, protocol, port = key_of(doc)
    shared = Shared() if shared is None else shared
    try:
        text, service_port = doc["service_ip"], doc["service_port"]
        ip = shared.ips.get(text)
        if ip is None:
            ip = shared.ips[text] = parse_ip_text(text)
        service_id = doc.get("service_id")
        if service_id is not None:
            if type(service_id) is not str:
                raise TypeError(f"service_id is a {type(service_id).__name__}")
            service_id = shared.ids.setdefault(service_id, service_id)
        service_port = int(service_port)
        if not 0 < service_port < 65536:
            raise ValueError(f"service_port {service_port} is not a port")
        exposure = Exposure(port, protocol, ip, _PORTS[service_port], service_id)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InvalidInput(f"not an exposure document ({type(e).__name__}: {e}): {doc!r}") \
            from None
    if exposure.family != family:
        raise InvalidInput(f"family {family} does not match service_ip: {doc!r}")
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


@dataclass
class Change:
    """One change as memory applies it: deletes before puts."""
    delete: list[Key] = field(default_factory=list)
    put: list[Exposure] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def change_of(put: Iterable[Exposure], delete: Iterable[Key], meta: Mapping | None) -> dict:
    """The validated change as it goes into a journal record; {} when there is nothing to do."""
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


def checked_change(change, shared: Shared | None = None) -> Change:
    """A change read back from a journal record (the shape change_of gives it), decoded."""
    if not isinstance(change, dict) or not set(change) <= {"put", "delete", "meta"}:
        raise ValueError("not a change record")
    if not isinstance(change.get("meta", {}), dict):
        raise ValueError("meta is not an object")
    return Change([checked_key(key) for key in change.get("delete", ())],
                  [decoded(doc, shared) for doc in change.get("put", ())],
                  change.get("meta", {}))


# --- the state ---------------------------------------------------------------------------------

_GROUPS = tuple((family, protocol) for family in FAMILIES for protocol in PROTOCOLS)


class State:
    """Exposures and meta as of journal record `seq`, in one representation: the immutable
    Exposures that reads hand out, by (family, protocol) in a dict by port, so lookups never
    scan. A snapshot writes their documents (`Exposure.to_dict`). Service IPs and ids that
    several exposures share are one object (`shared`). Not thread-safe: the store guards it."""

    def __init__(self, exposures: Iterable[Exposure] = (), meta: dict | None = None,
                 seq: int = 0, shared: Shared | None = None):
        self._groups: dict[tuple[str, str], dict[int, Exposure]] = {g: {} for g in _GROUPS}
        self.shared = Shared() if shared is None else shared
        self._sorted: list[Exposure] | None = None
        for e in exposures:
            self._put(e)
        self.meta = {} if meta is None else meta
        self.seq = seq

    def _put(self, e: Exposure) -> None:
        family, protocol, port = e.key
        self._groups[(family, protocol)][port] = e

    def get(self, key: tuple) -> Exposure | None:
        group = self._groups.get(key[:2]) if len(key) == 3 else None
        return None if group is None else group.get(key[2])

    def __len__(self) -> int:
        return sum(map(len, self._groups.values()))

    def counts(self) -> Counter:
        return Counter({g: len(d) for g, d in self._groups.items() if d})

    def sorted(self) -> list[Exposure]:
        """All exposures sorted by key. The list is kept until the next change and never
        changed in place, so a caller may hold it after the store's lock is released."""
        if self._sorted is None:
            groups = self._groups
            self._sorted = [groups[g][port] for g in _GROUPS for port in sorted(groups[g])]
        return self._sorted

    def apply(self, change: Change, seq: int) -> None:
        """Replay of change number `seq`: at open from the journal, and of each commit."""
        self.seq = seq
        self._sorted = None
        for family, protocol, port in change.delete:
            self._groups[(family, protocol)].pop(port, None)
        for e in change.put:
            self._put(e)
        for name, value in change.meta.items():
            if value is None:
                self.meta.pop(name, None)
            else:
                self.meta[name] = value
        if len(self.shared) > 2 * len(self) + 4096:
            # Addresses and labels that came and went: the next decodes share afresh.
            self.shared.clear()

    def copy_meta(self) -> dict:
        return copy.deepcopy(self.meta)

    def by_key(self) -> dict[Key, dict]:
        return {e.key: e.to_dict() for e in self.sorted()}

    def problems(self) -> list[str]:
        """Exposures held under another key than their own (empty: none)."""
        return [f"{e} is held under {family} {protocol} {port}"
                for (family, protocol), group in self._groups.items()
                for port, e in group.items() if e.key != (family, protocol, port)]

    def same_as(self, other: State) -> bool:
        return (self.by_key(), self.meta) == (other.by_key(), other.meta)
