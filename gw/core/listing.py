"""The exposure list's query: filters, a page size and a cursor. Pure: no I/O.

The list is ordered by key (family, protocol, exposed_port), so a cursor is simply the key of
the last exposure a page returned: the next page starts after it. It stays valid while
exposures come and go (none is returned twice, and one that exists throughout is returned
once), which an offset would not.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import InvalidInput
from .exposure import FAMILIES, PROTOCOLS, Exposure, Key, parse_family, parse_protocol

MAX_LIMIT = 10000
QUERY_FIELDS = {"family", "protocol", "service_id", "port", "limit", "cursor"}


@dataclass(frozen=True)
class ListQuery:
    family: str | None = None
    protocol: str | None = None
    service_id: str | None = None
    ports: tuple[int, int] = (1, 65535)
    limit: int | None = None  # None: everything that matches
    after: Key | None = None

    def matches(self, e: Exposure) -> bool:
        return ((self.family is None or e.family == self.family)
                and (self.protocol is None or e.protocol == self.protocol)
                and (self.service_id is None or e.service_id == self.service_id)
                and self.ports[0] <= e.exposed_port <= self.ports[1])


def cursor_of(key: Key) -> str:
    family, protocol, port = key
    return f"{family}/{protocol}/{port}"


def parse_cursor(text: str) -> Key:
    family, protocol, port = (text.split("/") + ["", "", ""])[:3]
    if family not in FAMILIES or protocol not in PROTOCOLS or not port.isdigit() \
            or not 0 <= int(port) <= 65535 or text.count("/") != 2:
        raise InvalidInput(f"cursor {text!r} is not one this gateway handed out "
                           "(family/protocol/port, from next_cursor)", field="cursor")
    return (family, protocol, int(port))


def parse_port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        lo = hi = -1
    if not (1 <= lo <= hi <= 65535):
        raise InvalidInput(f"port must be a port or a range LOW-HIGH within 1-65535, "
                           f"not {text!r}", field="port")
    return lo, hi


def parse_query(args: Mapping[str, str]) -> ListQuery:
    """The query string of GET /api/service/exposure, validated (400 naming the parameter)."""
    for name in args:
        if name not in QUERY_FIELDS:
            raise InvalidInput(f"unknown query parameter {name} (known: "
                               f"{', '.join(sorted(QUERY_FIELDS))})", field=name)
    limit = None
    if "limit" in args:
        text = args["limit"]
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise InvalidInput(f"limit must be from 1 to {MAX_LIMIT}, not {text!r}",
                               field="limit")
        limit = int(text)
    service_id = args.get("service_id")
    if service_id is not None and not service_id:
        raise InvalidInput("service_id must not be empty", field="service_id")
    return ListQuery(
        family=parse_family(args["family"]) if "family" in args else None,
        protocol=parse_protocol(args["protocol"]) if "protocol" in args else None,
        service_id=service_id,
        ports=parse_port_range(args["port"]) if "port" in args else (1, 65535),
        limit=limit,
        after=parse_cursor(args["cursor"]) if "cursor" in args else None)


def select(exposures: Sequence[Exposure],
           query: ListQuery) -> tuple[list[Exposure], str | None]:
    """The page of `exposures` (sorted by key) that `query` asks for, and the cursor of the
    next page (None on the last one). A page starts by bisection at its cursor, so paging
    through the whole table costs each exposure once, not once per page."""
    page: list[Exposure] = []
    start = 0 if query.after is None else bisect.bisect_right(exposures, query.after,
                                                                key=_key)
    for i in range(start, len(exposures)):
        e = exposures[i]
        if not query.matches(e):
            continue
        if query.limit is not None and len(page) == query.limit:
            return page, cursor_of(page[-1].key)
        page.append(e)
    return page, None


def _key(e: Exposure) -> Key:
    return e.key
