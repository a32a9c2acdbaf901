"""The list's pages: starting at a cursor by bisection gives what a scan from the start gives."""

import ipaddress

from hypothesis import given, strategies as st

from gw.core import listing
from gw.core.exposure import Exposure
from gw.core.listing import ListQuery

keys = st.tuples(st.sampled_from(["ipv4", "ipv6"]), st.sampled_from(["tcp", "udp"]),
                 st.integers(1, 40))


def exposure(key) -> Exposure:
    family, protocol, port = key
    ip = ipaddress.ip_address("10.30.0.1" if family == "ipv4" else "fdff::1")
    return Exposure(port, protocol, ip, 80, "a" if port % 2 else "b")


def scanned(exposures, query):
    """What a page is by definition: the matching exposures after the cursor, in key order."""
    after = [e for e in exposures
             if (query.after is None or e.key > query.after) and query.matches(e)]
    return after if query.limit is None else after[:query.limit]


@given(st.sets(keys), st.one_of(st.none(), keys), st.one_of(st.none(), st.integers(1, 5)),
       st.sampled_from([None, "tcp", "udp"]), st.sampled_from([None, "a"]))
def test_a_page_is_what_a_scan_from_the_start_gives(stored, after, limit, protocol, service_id):
    exposures = sorted((exposure(k) for k in stored), key=lambda e: e.key)
    query = ListQuery(protocol=protocol, service_id=service_id, limit=limit, after=after)
    page, cursor = listing.select(exposures, query)
    assert page == scanned(exposures, query)
    rest = scanned(exposures, ListQuery(protocol=protocol, service_id=service_id, after=after))
    assert (cursor is None) == (len(rest) == len(page))
    if cursor is not None:
        assert cursor == listing.cursor_of(page[-1].key)


def test_paging_along_the_cursors_returns_each_once():
    exposures = sorted((exposure((f, p, port)) for f in ("ipv4", "ipv6") for p in ("tcp", "udp")
                        for port in range(1, 41)), key=lambda e: e.key)
    seen, cursor = [], None
    while True:
        page, cursor = listing.select(exposures, ListQuery(
            limit=7, after=None if cursor is None else listing.parse_cursor(cursor)))
        seen += page
        if cursor is None:
            break
    assert seen == exposures
