"""Every route and every documented status code, against a real daemon (waitress, nftables in
its own namespace): idempotency, label updates, conflicts, batches all or nothing, auth."""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.api.harness import TOKEN, docs_set
from tests.helpers import ex

pytestmark = pytest.mark.kernel

ADD = "/api/service/exposure/add"
DELETE = "/api/service/exposure/delete"
LIST = "/api/service/exposure"
WEB = {"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80}


def stored(port, ip="10.30.0.1", service_port=80, protocol="tcp", **extra):
    family = "ipv6" if ":" in ip else "ipv4"
    return {"exposed_port": port, "protocol": protocol, "service_ip": ip,
            "service_port": service_port, "family": family, **extra}


# -- add ---------------------------------------------------------------------------------------

def test_add_creates_then_is_idempotent(gw, api):
    r = api.add(WEB)
    assert r.status == 201, r
    assert r.headers["content-type"] == "application/json"
    assert r.json == {"exposures": [stored(8080)], "outcomes": ["created"], "created": 1}
    assert gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80)}
    files = gw.store_files()

    again = api.add(WEB)
    assert again.status == 200, again
    assert again.json == {"exposures": [stored(8080)], "outcomes": ["unchanged"], "created": 0}
    assert gw.store_files() == files  # an identical add writes nothing
    assert api.list() == [stored(8080)]
    assert gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80)}


def test_add_ipv6_udp_and_internal_port_alias(gw, api):
    r = api.add({"exposed_port": 5353, "service_ip": "[fdff:2000::5]", "internal_port": 53,
                 "protocol": "UDP"})
    assert r.status == 201, r
    assert r.json["exposures"] == [stored(5353, "fdff:2000::5", 53, "udp")]
    assert gw.kernel_docs() == {("ipv6", "udp", 5353, "fdff:2000::5", 53)}
    # The same value under both names is fine.
    r = api.add({**ex(5354), "internal_port": 80})
    assert r.status == 201, r


def test_label_update_answers_200_and_keeps_the_kernel(gw, api):
    assert api.add(ex(8080, service_id="web-1")).status == 201
    before = gw.kernel_docs()
    r = api.add(ex(8080, service_id="web-2"))
    assert r.status == 200, r
    assert r.json["outcomes"] == ["relabelled"]
    assert r.json["exposures"] == [stored(8080, service_id="web-2")]
    assert api.list() == [stored(8080, service_id="web-2")]
    assert gw.kernel_docs() == before
    # Without a label, the stored label stays.
    r = api.add(ex(8080))
    assert r.status == 200 and r.json["outcomes"] == ["unchanged"]
    assert r.json["exposures"] == [stored(8080, service_id="web-2")]


def test_conflict_409_changes_nothing(gw, api):
    assert api.add(WEB).status == 201
    before = gw.state()
    r = api.add({**WEB, "service_ip": "10.30.0.2"})
    assert r.status == 409, r
    assert r.json["error"] == "conflict" and r.json["field"] == "exposed_port"
    assert "10.30.0.1:80" in r.json["message"]
    r = api.add({**WEB, "service_port": 81})
    assert r.status == 409 and r.json["field"] == "exposed_port"
    assert gw.state() == before


def test_same_port_once_per_family(gw, api):
    assert api.add(ex(8080)).status == 201
    assert api.add(ex(8080, "fdff::10")).status == 201
    assert docs_set(api.list()) == {("ipv4", "tcp", 8080, "10.30.0.1", 80),
                                    ("ipv6", "tcp", 8080, "fdff::10", 80)}
    assert gw.kernel_docs() == docs_set(api.list())


def test_batch_created_and_mixed_outcomes(gw, api):
    assert api.add(ex(8080)).status == 201
    r = api.add({"exposures": [ex(8080), ex(8081), ex(53, service_port=53, protocol="udp")]})
    assert r.status == 201, r
    assert r.json["outcomes"] == ["unchanged", "created", "created"]
    assert r.json["created"] == 2
    assert gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80),
                                ("ipv4", "tcp", 8081, "10.30.0.1", 80),
                                ("ipv4", "udp", 53, "10.30.0.1", 53)}
    r = api.add({"exposures": [ex(8080), ex(8081)]})
    assert r.status == 200 and r.json["created"] == 0


@pytest.mark.parametrize("bad, status, field", [
    (ex(8080, "10.30.0.9"), 409, "exposures[2].exposed_port"),          # conflict
    (ex(9100, "192.0.2.1"), 400, "exposures[2].service_ip"),            # invalid
    (ex(9001), 400, "exposures[2].exposed_port"),                       # repeats item 1
])
def test_batch_is_all_or_nothing(gw, api, bad, status, field):
    assert api.add(ex(8080)).status == 201
    before = gw.state()
    r = api.add({"exposures": [ex(9000), ex(9001), bad, ex(9002)]})
    assert r.status == status, r
    assert r.json["field"] == field
    assert gw.state() == before


def test_kernel_refusal_is_503_and_stores_nothing(gw, api):
    """The kernel refuses (our table was deleted behind the daemon's back): 503, the store
    holds what it held, /api/ready says why; a SIGHUP repairs the table."""
    assert api.add(ex(8080)).status == 201
    gw.nft("delete", "table", "inet", "oakestra_gw")
    r = api.add({"exposures": [ex(8081), ex(8082)]})
    assert r.status == 503, r
    assert r.json["error"] == "kernel_refused"
    assert api.list() == [stored(8080)]

    ready = api.get("/api/ready", token=None)
    assert ready.status == 503
    assert ready.json["ready"] is False and "firewall" in ready.json["reasons"]

    gw.send(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while api.get("/api/ready").status != 200:
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.05)
    assert gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80)}


# -- delete ------------------------------------------------------------------------------------

def test_delete_one_family_or_both(gw, api):
    for body in (ex(8080), ex(8080, "fdff::10"), ex(8080, protocol="udp")):
        assert api.add(body).status == 201
    r = api.delete({"exposed_port": 8080, "family": "ipv6"})
    assert r.status == 200, r
    assert r.json == {"deleted": [stored(8080, "fdff::10")]}
    assert gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80),
                                ("ipv4", "udp", 8080, "10.30.0.1", 80)}
    assert api.add(ex(8080, "fdff::10")).status == 201
    r = api.delete({"exposed_port": 8080, "protocol": "tcp"})
    assert r.status == 200
    assert docs_set(r.json["deleted"]) == {("ipv4", "tcp", 8080, "10.30.0.1", 80),
                                           ("ipv6", "tcp", 8080, "fdff::10", 80)}
    assert gw.kernel_docs() == {("ipv4", "udp", 8080, "10.30.0.1", 80)}
    r = api.delete({"exposed_port": 8080, "protocol": "udp", "family": None})
    assert r.status == 200 and len(r.json["deleted"]) == 1
    assert gw.kernel_docs() == set() and api.list() == []


def test_delete_missing_is_404(gw, api):
    assert api.add(ex(8080)).status == 201
    before = gw.state()
    for body in ({"exposed_port": 8081}, {"exposed_port": 8080, "protocol": "udp"},
                 {"exposed_port": 8080, "family": "ipv6"}):
        r = api.delete(body)
        assert r.status == 404, r
        assert r.json["error"] == "not_found" and r.json["field"] == "exposed_port"
    assert gw.state() == before


# -- reads -------------------------------------------------------------------------------------

def test_list_is_ordered(gw, api):
    for body in (ex(9000), ex(80, "fdff::1"), ex(53, service_port=53, protocol="udp"), ex(443)):
        assert api.add(body).status == 201
    keys = [(d["family"], d["protocol"], d["exposed_port"]) for d in api.list()]
    assert keys == [("ipv4", "tcp", 443), ("ipv4", "tcp", 9000), ("ipv4", "udp", 53),
                    ("ipv6", "tcp", 80)]


def test_health_and_ready(gw, api):
    r = api.get("/api/health", token=None)
    assert r.status == 200 and r.json == {"status": "ok"}
    r = api.get("/api/ready", token=None)
    assert r.status == 200 and r.json == {"ready": True,
                                          "egress": {"enabled": False, "interfaces": []}}


def test_ready_503_names_the_missing_tunnel_route(gw, api):
    assert api.add(ex(8777, "10.30.7.7", 7777)).status == 201
    gw.ns.run("ip", "route", "del", "10.30.0.0/16", "dev", "goProxyTun")
    try:
        r = api.get("/api/ready", token=None)
        assert r.status == 503, r
        assert any("10.30.0.0/16" in cause for cause in r.json["reasons"]), r.json
        text = r.body.decode()  # never the maps
        assert "exposures" not in r.json and "10.30.7.7" not in text and "8777" not in text
    finally:
        gw.ns.run("ip", "route", "add", "10.30.0.0/16", "dev", "goProxyTun")
    assert api.get("/api/ready").status == 200


def test_metrics(gw, api):
    assert api.add(ex(8080)).status == 201
    assert api.add(ex(53, "fdff::1", 53, "udp")).status == 201
    assert api.add(ex(8080, "10.30.0.2")).status == 409
    r = api.get("/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    for line in ('oakestra_gw_exposures{family="ipv4",protocol="tcp"} 1.0',
                 'oakestra_gw_exposures{family="ipv6",protocol="udp"} 1.0',
                 'oakestra_gw_exposures{family="ipv6",protocol="tcp"} 0.0'):
        assert line in text
    assert re.search(r'oakestra_gw_api_requests_total\{method="POST",route="/api/service/exposure/add",'
                     r'status="409"\} [1-9]', text)
    assert 'oakestra_gw_api_request_duration_seconds_count{method="POST",route=' in text
    assert re.search(r'oakestra_gw_firewall_transaction_duration_seconds_count\{kind="change"\} [1-9]',
                     text)
    assert 'oakestra_gw_firewall_transaction_failures_total{kind="change"}' in text
    assert re.search(r'oakestra_gw_reconcile_runs_total\{result="ok"\} [1-9]', text)
    assert "oakestra_gw_drift_repairs_total" in text
    assert re.search(r"oakestra_gw_conntrack_entries \d", text)
    assert re.search(r"oakestra_gw_conntrack_max \d", text)
    assert 'oakestra_gw_conntrack_drops_total{kind="drop"}' in text


def test_openapi_document_is_served(gw, api):
    r = api.get("/api/openapi.json")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    doc = r.json
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {ADD, DELETE, LIST, "/api/health", "/api/ready", "/api/status",
                                 "/metrics", "/api/openapi.json"}
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert set(doc["paths"][ADD]["post"]["responses"]) == {"200", "201", "400", "401", "409",
                                                           "413", "415", "503"}


def test_unknown_route_and_method_are_json(gw, api):
    r = api.get("/api/nothing")
    assert r.status == 404 and r.json["error"] == "not_found"
    r = api.get("/api/nothing", token=None)  # route and method are checked before the token
    assert r.status == 404
    assert api.request("PUT", ADD, token=None).status == 405
    r = api.get(ADD)
    assert r.status == 405 and r.json["error"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]
    r = api.request("DELETE", LIST)
    assert r.status == 405 and r.headers["content-type"] == "application/json"


# -- auth --------------------------------------------------------------------------------------

@pytest.mark.parametrize("route, method", [(ADD, "POST"), (DELETE, "POST"), (LIST, "GET"),
                                           ("/metrics", "GET"), ("/api/openapi.json", "GET")])
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789",
                                    f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x",
                                    f"bearer {TOKEN[:-1]}"])
def test_401_without_a_valid_token(gw, api, route, method, header):
    assert api.add(WEB).status == 201
    before = gw.state()
    headers = {"Authorization": header} if header else {}
    body = WEB if route == ADD else ({"exposed_port": 8080} if route == DELETE else None)
    r = api.request(method, route, body, headers=headers, token=None)
    assert r.status == 401, r
    assert r.json["error"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    if header:
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert gw.state() == before


def test_token_scheme_is_case_insensitive(gw, api):
    r = api.get(LIST, headers={"Authorization": f"bearer {TOKEN}"}, token=None)
    assert r.status == 200


def test_audit_log_has_one_line_per_change(gw, api):
    # Only the lines this test makes: earlier tests of the module wrote 401 lines too.
    mark = len(gw.log())
    assert api.add(ex(8765, service_id="audited")).status == 201
    assert api.add(ex(8765, "10.30.0.7")).status == 409
    assert api.delete({"exposed_port": 8765}).status == 200
    assert api.add(WEB, token="not-the-token-at-all").status == 401
    written = gw.log()[mark:]
    lines = [line for line in written.splitlines() if "gw.audit" in line and "8765" in line]
    assert len(lines) == 3, lines
    assert 'who=127.0.0.1 what="add 8765/tcp -> 10.30.0.1:80" result="201 1 created"' in lines[0]
    assert 'result="409 conflict field=exposed_port"' in lines[1]
    assert 'what="delete 8765/tcp ipv4+ipv6" result="200 deleted 8765/tcp' in lines[2]
    assert re.search(r'gw.audit: who=127.0.0.1 what="add \(invalid request\)" result="401 '
                     r'unauthorized"', written)
