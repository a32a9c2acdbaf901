"""The exposure list at scale: filters and a cursor on a real daemon holding 50,000 exposures.

The store is filled before the daemon starts (the daemon loads it into the kernel at start, as
after a reboot); the pages are then read over HTTP while exposures come and go between them.
"""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from gw.core.exposure import Exposure
from gw.store.local import LocalStore
from tests.api.harness import GatewayTestbed, require_root

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# 25,000 IPv4/TCP + 12,500 IPv4/UDP + 12,500 IPv6/TCP, away from the reserved ports.
SHAPE = [("ipv4", "tcp", 25000), ("ipv4", "udp", 12500), ("ipv6", "tcp", 12500)]
FIRST_PORT = 30001


def seed_docs() -> list[dict]:
    docs = []
    for family, protocol, count in SHAPE:
        for i in range(count):
            port = FIRST_PORT + i
            ip = (f"10.30.{i // 250}.{i % 250 + 1}" if family == "ipv4"
                  else f"fdff:2000::{i + 1:x}")
            docs.append({"exposed_port": port, "protocol": protocol, "service_ip": ip,
                         "service_port": 80, "family": family, "service_id": f"svc-{port % 7}"})
    return docs


def key(doc) -> tuple:
    return (doc["family"], doc["protocol"], doc["exposed_port"])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    require_root()
    gateway = GatewayTestbed(tmp_path_factory.mktemp("paging"), drift_watch=False)
    try:
        docs = seed_docs()
        with LocalStore(gateway.store_dir / "exposures.json") as store:
            for i in range(0, len(docs), 5000):
                store.commit(put=map(Exposure.from_dict, docs[i:i + 5000]))
        gateway.start(wait=False)
        gateway.wait_serving(timeout=180)  # a generous bound that only catches a hang
        gateway.docs = docs
        yield gateway
    finally:
        gateway.close()


def get(gw, **params):
    r = gw.http(timeout=120).get("/api/service/exposure?" + urlencode(params))
    return r


def pages(gw, limit, between=None, **filters):
    """Follow next_cursor from the first page to the last; `between(n)` runs after page n."""
    seen, cursor, n = [], None, 0
    while True:
        params = {**filters, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = get(gw, **params)
        assert r.status == 200, r
        body = r.json
        assert len(body["exposures"]) <= limit
        seen += body["exposures"]
        cursor = body["next_cursor"]
        n += 1
        if cursor is None:
            return seen, n
        if between is not None:
            between(n)


def test_paging_through_50000_returns_each_exactly_once(big):
    api = big.http()
    stable = {key(d) for d in big.docs}
    added, deleted = [], []

    def churn(n):
        # Between pages: a new exposure (before and after the cursor) and one deleted.
        if n % 10 == 0 and n <= 40:
            port = 20000 + n
            body = {"exposed_port": port, "service_ip": "10.30.200.1", "service_port": 80}
            assert api.add(body).status == 201
            added.append(("ipv4", "tcp", port))
            victim = big.docs[-n]  # an IPv6 one, not read yet
            assert api.delete({"exposed_port": victim["exposed_port"], "protocol": "tcp",
                               "family": "ipv6"}).status == 200
            deleted.append(key(victim))

    seen, n = pages(big, 1000, between=churn)
    keys = [key(d) for d in seen]
    assert len(keys) == len(set(keys)), "an exposure came twice"
    assert keys == sorted(keys), "the pages are not in key order"
    throughout = stable - set(deleted)
    assert throughout <= set(keys), f"{len(throughout - set(keys))} exposures never came"
    assert not set(deleted) & set(keys), "a deleted exposure came after its deletion"
    assert n >= 50 and len(deleted) >= 4
    # Put the table back the way the other tests expect it.
    for family, protocol, port in added:
        assert api.delete({"exposed_port": port, "protocol": protocol,
                           "family": family}).status == 200
    for family, protocol, port in deleted:
        doc = next(d for d in big.docs if key(d) == (family, protocol, port))
        assert api.add(doc).status == 201


def test_without_limit_the_whole_list_and_no_cursor(big):
    r = get(big)
    assert r.status == 200 and "next_cursor" not in r.json
    assert [key(d) for d in r.json["exposures"]] == sorted(key(d) for d in big.docs)


@pytest.mark.parametrize("filters", [
    {"family": "ipv6"},
    {"protocol": "udp"},
    {"family": "ipv4", "protocol": "tcp", "port": "30100-30199"},
    {"service_id": "svc-3"},
    {"service_id": "svc-3", "protocol": "udp", "port": "41000-65535"},
    {"port": "30001"},
    {"family": "IPv6", "protocol": "UDP"},  # any letter case; nothing matches
])
def test_filters_match_what_the_store_holds(big, filters):
    lo, _, hi = filters.get("port", "1-65535").partition("-")
    lo, hi = int(lo), int(hi or lo)
    want = sorted(key(d) for d in big.docs
                  if d["family"] == filters.get("family", d["family"]).lower()
                  and d["protocol"] == filters.get("protocol", d["protocol"]).lower()
                  and d["service_id"] == filters.get("service_id", d["service_id"])
                  and lo <= d["exposed_port"] <= hi)
    whole = get(big, **filters)
    assert whole.status == 200
    assert [key(d) for d in whole.json["exposures"]] == want
    paged, _ = pages(big, 777, **filters)
    assert [key(d) for d in paged] == want


@pytest.mark.parametrize("params, field", [
    ({"family": "ipv5"}, "family"),
    ({"protocol": "sctp"}, "protocol"),
    ({"port": "0-10"}, "port"),
    ({"port": "9000-8000"}, "port"),
    ({"port": "http"}, "port"),
    ({"limit": "0"}, "limit"),
    ({"limit": "10001"}, "limit"),
    ({"cursor": "ipv4/tcp"}, "cursor"),
    ({"cursor": "ipv4/icmp/1"}, "cursor"),
    ({"service_id": ""}, "service_id"),
    ({"sort": "port"}, "sort"),
])
def test_bad_query_is_400_naming_the_parameter(big, params, field):
    r = get(big, **params)
    assert r.status == 400, r
    assert r.json["error"] == "invalid" and r.json["field"] == field, r.json


def test_status_counts_without_listing(big):
    r = big.http().get("/api/status")
    assert r.status == 200, r
    doc = r.json
    assert doc["exposures"]["total"] == len(big.docs)
    for family, protocol, count in SHAPE:
        assert doc["exposures"][f"{family}/{protocol}"] == count
    assert doc["exposures"]["ipv6/udp"] == 0
    assert doc["mode"] == "standalone" and doc["ready"] is True and doc["reasons"] == {}
    assert doc["restart_needed"] == []
