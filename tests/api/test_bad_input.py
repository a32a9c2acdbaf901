"""The bad-input catalogue, through HTTP against a real daemon. Each case asserts the status,
the error code, the field to blame, and that neither the store (as the API lists it and as
its files hold it) nor the kernel's maps changed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.api.harness import API_PORT, GatewayTestbed, TOKEN, require_root

pytestmark = pytest.mark.kernel

ADD = "/api/service/exposure/add"
DELETE = "/api/service/exposure/delete"
GOOD = {"exposed_port": 9100, "service_ip": "10.30.0.1", "service_port": 80}
TCP_LISTENER, UDP_LISTENER, LOOPBACK_LISTENER = 7000, 7001, 7002

LISTENERS = f"""
import socket, time
t = socket.socket(socket.AF_INET6)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
t.bind(("::", {TCP_LISTENER})); t.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", {UDP_LISTENER}))
lo = socket.socket(); lo.bind(("127.0.0.1", {LOOPBACK_LISTENER})); lo.listen()
print("listening", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    require_root()
    gateway = GatewayTestbed(tmp_path_factory.mktemp("gw"),
                      config={"network": {"reserved_ports": ["22/tcp", "50103/udp",
                                                             "9999/tcp", "9998/udp"]}})
    listeners = None
    try:
        listeners = gateway.ns.popen(sys.executable, "-c", LISTENERS, stdout=subprocess.PIPE,
                                     text=True)
        assert listeners.stdout.readline().strip() == "listening"
        gateway.start()
        api = gateway.http()
        assert api.add({"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80,
                        "service_id": "seed"}).status == 201
        assert api.add({"exposed_port": 8080, "service_ip": "fdff::1", "service_port": 80}
                       ).status == 201
        yield gateway
    finally:
        if listeners is not None:
            listeners.kill()
            listeners.wait()
        gateway.close()


@pytest.fixture
def unchanged(gw):
    """Asserts after the test that store and kernel are as before it."""
    before = gw.state()
    assert len(before[0]) == 2 and len(before[2]) == 2
    yield
    assert gw.state() == before


def with_(**fields):
    doc = dict(GOOD)
    for name, value in fields.items():
        if value is DROP:
            doc.pop(name, None)
        else:
            doc[name] = value
    return doc


DROP = object()

# (body, field): every one is a 400 "invalid".
ADD_CASES = {
    # shapes
    "array": ([GOOD], None),
    "string": ("8080", None),
    "number": (8080, None),
    "null": (None, None),
    "empty object": ({}, "exposed_port"),
    "missing service_ip": (with_(service_ip=DROP), "service_ip"),
    "missing service_port": (with_(service_port=DROP), "service_port"),
    "unknown field": (with_(comment="hi"), "comment"),
    "unknown field (typo)": (with_(service_port=DROP, servce_port=80), "servce_port"),
    "unknown field beside exposures": ({"exposures": [GOOD], "dry_run": True}, "dry_run"),
    "repeated JSON key": ('{"exposed_port": 9100, "exposed_port": 22, "service_ip": '
                          '"10.30.0.1", "service_port": 80}', "exposed_port"),
    # wrong types
    **{f"exposed_port {name}": (with_(exposed_port=value), "exposed_port") for name, value in {
        "bool": True, "false": False, "float": 8080.0, "fraction": 80.5, "string": "8080",
        "null": None, "list": [8080], "object": {"port": 8080}}.items()},
    **{f"service_port {name}": (with_(service_port=value), "service_port") for name, value in {
        "bool": True, "float": 80.0, "string": "80", "null": None, "list": [80]}.items()},
    **{f"service_ip {name}": (with_(service_ip=value), "service_ip") for name, value in {
        "int": 169738241, "bool": True, "null": None, "list": ["10.30.0.1"],
        "object": {"ip": "10.30.0.1"}, "empty": "", "hostname": "localhost",
        "cidr": "10.30.0.0/16", "with port": "10.30.0.1:80", "leading zeros": "010.030.000.001",
        "garbage": "not an ip"}.items()},
    **{f"protocol {name}": (with_(protocol=value), "protocol") for name, value in {
        "icmp": "icmp", "sctp": "sctp", "number": 6, "bool": True, "null": None,
        "list": ["tcp"], "empty": "", "tcp/udp": "tcp/udp"}.items()},
    **{f"service_id {name}": (with_(service_id=value), "service_id") for name, value in {
        "number": 5, "bool": False, "empty": "", "space": "web 1", "too long": "x" * 129,
        "list": ["web"], "newline": "web\n", "leading dash": "-web"}.items()},
    **{f"family {name}": (with_(family=value), "family") for name, value in {
        "ipv5": "ipv5", "number": 4, "null": None, "mismatch": "ipv6"}.items()},
    # out of range
    **{f"exposed_port {value}": (with_(exposed_port=value), "exposed_port")
       for value in (0, 65536, 2**16 + 80, 2**32, 2**64, -1, -8080)},
    **{f"service_port {value}": (with_(service_port=value), "service_port")
       for value in (0, 65536, 2**64, -80)},
    "internal_port 0": (with_(service_port=DROP, internal_port=0), "internal_port"),
    "internal_port and service_port disagree": (with_(internal_port=81), "internal_port"),
    # nft syntax in strings: never reaches nft
    "nft in exposed_port": (with_(exposed_port="80; flush ruleset"), "exposed_port"),
    "nft in service_ip": (with_(service_ip="10.30.0.1; flush ruleset"), "service_ip"),
    "nft in service_ip (brace)": (with_(service_ip="10.30.0.1 } ; flush ruleset ; {"),
                                  "service_ip"),
    "nft in protocol": (with_(protocol="tcp; flush ruleset"), "protocol"),
    "nft in service_id": (with_(service_id="x; flush ruleset"), "service_id"),
    "nft in service_id (quote)": (with_(service_id='x"; flush ruleset; "'), "service_id"),
    "nft in family": (with_(family="ipv4; flush ruleset"), "family"),
    # addresses that may not be targets
    **{f"service_ip {name}": (with_(service_ip=ip), "service_ip") for name, ip in {
        "outside v4": "192.0.2.1", "next to the range": "10.31.0.1", "public": "8.8.8.8",
        "outside v6": "2001:db8::1", "loopback": "127.0.0.1", "loopback v6": "::1",
        "link-local": "169.254.1.1", "link-local v6": "fe80::1", "multicast": "224.0.0.1",
        "multicast v6": "ff02::1", "unspecified": "0.0.0.0", "unspecified v6": "::",
        "broadcast": "255.255.255.255", "v4-mapped": "::ffff:10.30.0.1",
        "scoped": "fdff::1%lo", "scoped link-local": "fe80::1%goProxyTun"}.items()},
    # reserved ports
    "reserved ssh": (with_(exposed_port=22), "exposed_port"),
    "reserved ssh (upper-case proto)": (with_(exposed_port=22, protocol="TCP"), "exposed_port"),
    "reserved tunnel": (with_(exposed_port=50103, protocol="udp"), "exposed_port"),
    "reserved api port": (with_(exposed_port=API_PORT), "exposed_port"),
    "reserved by config tcp": (with_(exposed_port=9999), "exposed_port"),
    "reserved by config udp": (with_(exposed_port=9998, protocol="udp"), "exposed_port"),
    "local tcp listener": (with_(exposed_port=TCP_LISTENER), "exposed_port"),
    "local tcp listener v6": (with_(exposed_port=TCP_LISTENER, service_ip="fdff::2"),
                              "exposed_port"),
    "local udp listener": (with_(exposed_port=UDP_LISTENER, protocol="udp"), "exposed_port"),
    # batches
    "batch not a list": ({"exposures": GOOD}, "exposures"),
    "batch empty": ({"exposures": []}, "exposures"),
    "batch null": ({"exposures": None}, "exposures"),
    "batch item not an object": ({"exposures": [GOOD, 9101]}, "exposures[1]"),
    "batch bad item": ({"exposures": [GOOD, with_(exposed_port=9101, service_ip="1.1.1.1")]},
                       "exposures[1].service_ip"),
    "batch unknown field": ({"exposures": [with_(x=1)]}, "exposures[0].x"),
    "batch reserved": ({"exposures": [GOOD, with_(exposed_port=22)]},
                       "exposures[1].exposed_port"),
    "batch repeated key": ({"exposures": [GOOD, with_(service_port=81)]},
                           "exposures[1].exposed_port"),
    "batch repeated key (case)": ({"exposures": [GOOD, with_(protocol="TCP")]},
                                  "exposures[1].exposed_port"),
    "batch port notation string": ({"exposures": "8080:80/tcp"}, "exposures"),
}


@pytest.mark.parametrize("body, field", ADD_CASES.values(), ids=ADD_CASES.keys())
def test_add_rejects(gw, unchanged, body, field):
    api = gw.http()
    raw = body if isinstance(body, str) and body.startswith("{") else json.dumps(body)
    r = api.add(None, raw=raw.encode())
    assert r.status == 400, r
    assert r.json["error"] == "invalid", r.json
    assert r.json.get("field") == field, r.json
    assert r.json["message"]


DELETE_CASES = {
    "empty object": ({}, "exposed_port"),
    "array": ([8080], None),
    "exposed_port string": ({"exposed_port": "8080"}, "exposed_port"),
    "exposed_port bool": ({"exposed_port": True}, "exposed_port"),
    "exposed_port float": ({"exposed_port": 8080.0}, "exposed_port"),
    "exposed_port 0": ({"exposed_port": 0}, "exposed_port"),
    "exposed_port 65536": ({"exposed_port": 65536}, "exposed_port"),
    "exposed_port 2**64": ({"exposed_port": 2**64}, "exposed_port"),
    "exposed_port negative": ({"exposed_port": -8080}, "exposed_port"),
    "protocol icmp": ({"exposed_port": 8080, "protocol": "icmp"}, "protocol"),
    "protocol null": ({"exposed_port": 8080, "protocol": None}, "protocol"),
    "family ipv5": ({"exposed_port": 8080, "family": "ipv5"}, "family"),
    "family number": ({"exposed_port": 8080, "family": 6}, "family"),
    "unknown field": ({"exposed_port": 8080, "service_ip": "10.30.0.1"}, "service_ip"),
    "nft syntax": ({"exposed_port": "8080 } ; flush ruleset"}, "exposed_port"),
}


@pytest.mark.parametrize("body, field", DELETE_CASES.values(), ids=DELETE_CASES.keys())
def test_delete_rejects(gw, unchanged, body, field):
    r = gw.http().delete(None, raw=json.dumps(body).encode())
    assert r.status == 400, r
    assert r.json["error"] == "invalid" and r.json.get("field") == field, r.json


GOOD_RAW = json.dumps(GOOD).encode()
SYNTAX_CASES = {
    "truncated": b'{"exposed_port": 9100, "service_ip": "10.30.0.1"',
    "trailing comma": b'{"exposed_port": 9100,}',
    "single quotes": b"{'exposed_port': 9100}",
    "empty body": b"",
    "whitespace only": b"   \n",
    "NaN": b'{"exposed_port": NaN, "service_ip": "10.30.0.1", "service_port": 80}',
    "Infinity": b'{"exposed_port": Infinity, "service_ip": "10.30.0.1", "service_port": 80}',
    "not UTF-8": b'{"exposed_port": 9100, "service_ip": "10.30.0.\xff", "service_port": 80}',
    "UTF-16": GOOD_RAW.decode().encode("utf-16"),
    "two documents": GOOD_RAW + GOOD_RAW,
    "deeply nested": b"[" * 50000 + b"]" * 50000,
    "huge number": b'{"exposed_port": 1' + b"0" * 5000 + b', "service_ip": "10.30.0.1"}',
}


@pytest.mark.parametrize("route", [ADD, DELETE])
@pytest.mark.parametrize("raw", SYNTAX_CASES.values(), ids=SYNTAX_CASES.keys())
def test_malformed_json_is_400(gw, unchanged, route, raw):
    r = gw.http().post(route, raw=raw)
    if raw.startswith(b"[" * 100):
        assert r.status in (400, 413), r  # 100 KB of brackets is past the body limit too
    else:
        assert r.status == 400, r
        assert r.json["error"] == "invalid_json" and "field" not in r.json, r.json


CONTENT_TYPES = {
    "none": None,
    "text/plain": "text/plain",
    "form": "application/x-www-form-urlencoded",
    "multipart": "multipart/form-data; boundary=x",
    "json-ish": "application/jsonp",
    "problem+json": "application/problem+json",
    "latin-1 json": "application/json; charset=latin-1",
}


@pytest.mark.parametrize("route", [ADD, DELETE])
@pytest.mark.parametrize("content_type", CONTENT_TYPES.values(), ids=CONTENT_TYPES.keys())
def test_wrong_content_type_is_415(gw, unchanged, route, content_type):
    r = gw.http().post(route, raw=GOOD_RAW, content_type=content_type)
    assert r.status == 415, r
    assert r.json["error"] == "unsupported_media_type"


def test_json_with_charset_utf8_is_fine(gw, unchanged):
    r = gw.http().add(with_(exposed_port=8080), content_type="application/json; charset=UTF-8")
    assert r.status == 200, r  # identical to the stored one: unchanged


def test_oversized_body_is_413(gw, unchanged):
    # Valid JSON of 70 KiB: the size decides, not the content.
    body = {"exposures": [with_(exposed_port=10000 + i, service_id=f"s{i:0>100}")
                          for i in range(600)]}
    raw = json.dumps(body).encode()
    assert 64 * 1024 < len(raw) < 128 * 1024
    r = gw.http().add(None, raw=raw)
    assert r.status == 413, r
    assert r.json["error"] == "too_large"


def test_oversized_chunked_body_is_413(gw, unchanged):
    chunk = b"x" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    request = (f"POST {ADD} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
               "Connection: close\r\n\r\n").encode() + body
    answer = gw.http().raw_exchange(request)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"too_large"' in answer


def test_huge_body_is_refused_before_buffering(gw, unchanged):
    """Past 128 KiB waitress refuses by Content-Length, before reading the body."""
    request = (f"POST {ADD} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Content-Type: application/json\r\nContent-Length: 100000000\r\n"
               "Connection: close\r\n\r\n").encode()
    answer = gw.http().raw_exchange(request)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_positive_controls(gw):
    """What the catalogue rejects is not everything: the neighbours of rejected values pass."""
    api = gw.http()
    try:
        for body in (with_(exposed_port=22, protocol="udp"),             # 22 is reserved for tcp
                     with_(exposed_port=50103),                           # 50103 for udp
                     with_(exposed_port=LOOPBACK_LISTENER),               # loopback-only listener
                     with_(exposed_port=UDP_LISTENER),                    # the listener is udp
                     with_(exposed_port=1, service_port=65535),
                     with_(exposed_port=65535, service_ip="10.30.255.254"),
                     with_(exposed_port=9101, service_ip="fdff:ffff::1", family="IPv6",
                           service_id="a.b:c@d/e-f_1")):
            r = api.add(body)
            assert r.status == 201, (body, r)
    finally:
        for port, proto in ((22, "udp"), (50103, "tcp"), (LOOPBACK_LISTENER, "tcp"),
                            (UDP_LISTENER, "tcp"), (1, "tcp"), (65535, "tcp"), (9101, "tcp")):
            api.delete({"exposed_port": port, "protocol": proto})
