"""The Flask app in process (no root): the real Gateway and Store with a fake firewall. Every
answer is checked against the OpenAPI document's schema for its route and status."""

from __future__ import annotations

import json
import logging

import jsonschema
import pytest

from gw.daemon import api as api_module
from gw.daemon.api import create_app, reconfigure
from gw.core.config import parse_config
from gw.core.errors import KernelRefused, StoreUnavailable
from gw.service.gateway import Gateway
from gw.daemon.openapi import document
from gw.store.local import LocalStore

TOKEN = "unit-test-token-0123456789"
SETTINGS = parse_config({"api": {"host": "127.0.0.1"},
                         "network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1",
                                     "reserved_ports": ["22/tcp", "50103/udp", "9999/tcp"]}})
WEB = {"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80}


class FakeFirewall:
    def __init__(self):
        self.elements = {}
        self.refuse = False
        self.calls = 0

    def apply(self, add=(), remove=()):
        self.calls += 1
        if self.refuse:
            raise KernelRefused("nftables refused the change: Error: injected")
        for e in remove:
            self.elements.pop(e.key, None)
        for e in add:
            self.elements[e.key] = e.target

    def load(self, exposures):
        self.elements = {e.key: e.target for e in exposures}


@pytest.fixture
def env(tmp_path):
    store = LocalStore(tmp_path / "exposures.json")
    firewall = FakeFirewall()
    gateway = Gateway(store, firewall)
    problems = {}
    app = create_app(gateway, SETTINGS, token=TOKEN, ready_checks=lambda: dict(problems),
                     listening=lambda: {(7000, "tcp")})
    client = app.test_client()
    yield client, gateway, firewall, store, problems, app
    store.close()


DOC = document(auth=True)


def documented_routes(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item
            if method in ("get", "put", "post", "delete", "patch")}


def served_routes(app) -> set[tuple[str, str]]:
    """What Flask routes, as (method, path); HEAD and OPTIONS are Flask's own."""
    return {(method, rule.rule) for rule in app.url_map.iter_rules()
            if rule.endpoint != "static" for method in rule.methods - {"HEAD", "OPTIONS"}}


ROUTES = documented_routes(DOC)


def conforms(method: str, path: str, response) -> None:
    """The answer's status, content type and body are what the document says."""
    operation = DOC["paths"][path][method.lower()]
    status = str(response.status_code)
    assert status in operation["responses"], (method, path, status)
    content = operation["responses"][status]["content"]
    media = response.mimetype
    assert media in content, (status, media)
    if media == "application/json":
        schema = {**content[media]["schema"], "components": DOC["components"]}
        jsonschema.validate(response.get_json(), schema)


def call(client, method, path, body=None, *, token=TOKEN, raw=None, content_type=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        r = client.open(path, method=method, data=raw, headers=headers,
                        content_type=content_type or "application/json")
    elif body is not None:
        r = client.open(path, method=method, json=body, headers=headers)
    else:
        r = client.open(path, method=method, headers=headers)
    if (method, path) in ROUTES:
        conforms(method, path, r)
    return r


ADD, DELETE, LIST = "/api/service/exposure/add", "/api/service/exposure/delete", \
    "/api/service/exposure"


def test_add_list_delete_conform(env):
    client, gateway, firewall, store, *_ = env
    assert call(client, "POST", ADD, WEB).status_code == 201
    assert call(client, "POST", ADD, WEB).status_code == 200
    assert call(client, "POST", ADD, {**WEB, "service_id": "x"}).status_code == 200
    assert call(client, "POST", ADD, {**WEB, "service_port": 81}).status_code == 409
    assert call(client, "POST", ADD, {**WEB, "exposed_port": 0}).status_code == 400
    assert call(client, "POST", ADD, raw=b"{").status_code == 400
    assert call(client, "POST", ADD, raw=b"{}", content_type="text/plain").status_code == 415
    assert call(client, "POST", ADD, raw=b" " * (65 * 1024)).status_code == 413
    assert call(client, "POST", ADD, WEB, token=None).status_code == 401
    assert call(client, "GET", LIST).get_json()["exposures"][0]["service_id"] == "x"
    assert call(client, "POST", DELETE, {"exposed_port": 8080}).status_code == 200
    assert call(client, "POST", DELETE, {"exposed_port": 8080}).status_code == 404
    assert call(client, "GET", "/api/health", token=None).status_code == 200
    assert call(client, "GET", "/api/ready", token=None).status_code == 200
    assert call(client, "GET", "/metrics").status_code == 200
    assert call(client, "GET", "/api/openapi.json").status_code == 200
    assert firewall.elements == {}


def test_kernel_refusal_is_503_and_reverts_the_store(env):
    client, gateway, firewall, store, *_ = env
    assert call(client, "POST", ADD, WEB).status_code == 201
    firewall.refuse = True
    r = call(client, "POST", ADD, {"exposures": [{**WEB, "exposed_port": 8081},
                                                 {**WEB, "exposed_port": 8082}]})
    assert r.status_code == 503 and r.get_json()["error"] == "kernel_refused"
    assert [e.exposed_port for e in store.exposures()] == [8080]
    r = call(client, "POST", DELETE, {"exposed_port": 8080})
    assert r.status_code == 503
    assert [e.exposed_port for e in store.exposures()] == [8080]
    r = call(client, "GET", "/api/ready", token=None)
    assert r.status_code == 503 and "firewall" in r.get_json()["reasons"]


def test_store_failure_is_503_and_never_reaches_the_kernel(env, monkeypatch):
    client, gateway, firewall, store, *_ = env

    def broken(*a, **kw):
        raise StoreUnavailable("cannot write the journal: No space left on device")

    monkeypatch.setattr(store, "commit", broken)
    r = call(client, "POST", ADD, WEB)
    assert r.status_code == 503
    assert r.get_json() == {"error": "store_unavailable",
                            "message": "cannot write the journal: No space left on device"}
    assert firewall.calls == 0 and firewall.elements == {}


def test_unexpected_error_is_a_json_500(env, monkeypatch, caplog):
    client, gateway, *_ = env
    monkeypatch.setattr(gateway, "exposures", lambda: 1 / 0)
    with caplog.at_level(logging.ERROR):
        r = client.get(LIST, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 500
    assert r.get_json() == {"error": "internal_error",
                            "message": "an internal error occurred; see the log"}
    assert "ZeroDivisionError" in caplog.text


def test_ready_reasons_and_a_failing_check(env):
    client, gateway, firewall, store, problems, app = env
    problems["forwarding_ipv4"] = "ipv4 forwarding is off (detail)"
    r = call(client, "GET", "/api/ready")
    assert r.status_code == 503
    assert r.get_json()["reasons"] == {"forwarding_ipv4": "ipv4 forwarding is off (detail)"}
    # Without the token: the cause, in a fixed sentence, not the details.
    r = call(client, "GET", "/api/ready", token=None)
    assert r.status_code == 503
    assert r.get_json()["reasons"] == {"forwarding_ipv4": "IPv4 forwarding is off"}
    app2 = create_app(gateway, SETTINGS, ready_checks=lambda: 1 / 0)
    r = app2.test_client().get("/api/ready")
    assert r.status_code == 503 and "readiness_check" in r.get_json()["reasons"]


def test_reserved_and_listening_ports(env):
    client, *_ = env
    for port, proto in ((22, "tcp"), (50103, "udp"), (9999, "tcp"), (11022, "tcp"),
                        (7000, "tcp")):
        r = call(client, "POST", ADD, {**WEB, "exposed_port": port, "protocol": proto})
        assert r.status_code == 400 and r.get_json()["field"] == "exposed_port", (port, r.json)
    assert call(client, "POST", ADD, {**WEB, "exposed_port": 7000, "protocol": "udp"}
                ).status_code == 201


def test_reconfigure_changes_policy_and_token(env):
    client, gateway, firewall, store, problems, app = env
    new = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                    "internal_ipv6": "fdff::ffff:1",
                                    "service_ranges": ["10.40.0.0/16"]}})
    reconfigure(app, new, token="a-new-token-0123456789")
    r = call(client, "POST", ADD, WEB, token="a-new-token-0123456789")
    assert r.status_code == 400 and "10.40.0.0/16" in r.get_json()["message"]
    assert call(client, "GET", LIST).status_code == 401
    reconfigure(app, token=None)
    assert client.get(LIST).status_code == 200
    doc = client.get("/api/openapi.json").get_json()
    assert "security" not in doc


def test_audit_line_per_change(env, caplog):
    client, *_ = env
    with caplog.at_level(logging.INFO, logger="gw.audit"):
        call(client, "POST", ADD, {"exposures": [{**WEB, "exposed_port": p}
                                                 for p in range(8000, 8005)]})
        call(client, "GET", LIST)
        call(client, "POST", ADD, raw=b"nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "gw.audit"]
    assert lines == [
        'who=127.0.0.1 what="add 8000/tcp -> 10.30.0.1:80, 8001/tcp -> 10.30.0.1:80, '
        '8002/tcp -> 10.30.0.1:80 (+2 more)" result="201 5 created"',
        'who=127.0.0.1 what="add (invalid request)" result="400 invalid_json"']


def test_repeated_json_key_names_the_field(env):
    client, *_ = env
    r = call(client, "POST", ADD, raw=b'{"exposed_port": 8080, "exposed_port": 22, '
                                     b'"service_ip": "10.30.0.1", "service_port": 80}')
    assert r.status_code == 400 and r.get_json()["field"] == "exposed_port"


def test_every_served_route_is_documented_and_every_documented_one_served(env):
    app = env[-1]
    assert served_routes(app) == ROUTES
    assert ("POST", "/api/service/exposure/add") in ROUTES and len(ROUTES) >= 7


def test_the_document_loads_in_schemathesis():
    schemathesis = pytest.importorskip("schemathesis")
    for auth in (True, False):
        schema = schemathesis.openapi.from_dict(json.loads(json.dumps(document(auth=auth))))
        operations = [op.ok() for op in schema.get_all_operations()]
        assert {(o.method.upper(), o.path) for o in operations} == ROUTES


def test_max_body_is_64k():
    assert api_module.MAX_BODY == 64 * 1024


def test_gateway_id_in_an_add_must_be_ours(tmp_path):
    store = LocalStore(tmp_path / "exposures.json")
    try:
        app = create_app(Gateway(store, FakeFirewall()), SETTINGS, token=TOKEN,
                         gateway_id=lambda: "gw-1", listening=lambda: set())
        client = app.test_client()
        r = call(client, "POST", ADD, {**WEB, "gateway_id": "gw-2"})
        assert r.status_code == 400 and r.get_json()["field"] == "gateway_id"
        assert store.exposures() == []
        r = call(client, "POST", ADD, {"exposures": [{**WEB, "gateway_id": "gw-1"}]})
        assert r.status_code == 201
        # Standalone without an id: nothing to check it against, so it is refused.
        bare = create_app(Gateway(store, FakeFirewall()), SETTINGS, token=TOKEN,
                          listening=lambda: set()).test_client()
        r = call(bare, "POST", ADD, {**WEB, "exposed_port": 8081, "gateway_id": "gw-1"})
        assert r.status_code == 400 and "has no id" in r.get_json()["message"]
    finally:
        store.close()
