"""Hostile input (issue 8):

- hypothesis over the parser: whatever JSON arrives, parsing either raises InvalidInput or
  gives exposures that obey every rule (ports, protocol, service ranges, reserved ports, unique
  keys), and the nft text made from them matches a strict grammar of typed values;
- hypothesis through the whole app (Flask, the gateway, a recording stand-in for libnftables):
  strings carrying a marker, in every field and as field names, never reach nft;
- schemathesis with many examples against /api/openapi.json on the real daemon: no 5xx, no
  answer outside the document, and a rejected request changes nothing (a custom check compares
  the served exposures, the store's files and the kernel's maps before and after each one);
- slow and half-open clients (slowloris: headers byte by byte; connections that send nothing;
  bodies that never finish; clients that never read, with the server's sends to them shown
  blocked) do not block the others: every normal request is answered.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gw.core import ruleset
from gw.core.config import parse_config
from gw.core.errors import InvalidInput
from gw.kernel.nft import NoSuchObject
from gw.core.exposure import (ADD_FIELDS, PROTOCOLS, Exposure, parse_delete, parse_exposures,
                         parse_port_notation)
from tests.helpers import wait_for
from tests.reliability.common import SOAK, Timer, enter_netns, report, scaled
from tests.api.harness import schemathesis_bin
from tests.reliability.daemon import API_PORT, HOST, TOKEN, docs_set, gateway

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1",
                                     "reserved_ports": ["22/tcp", "50103/udp", "7777/udp"]}})
POLICY = SETTINGS.policy(listening=lambda: {(9090, "tcp")})
EXAMPLES = scaled(1500, 20000)
MARK = "QZXmark"

# -- the strict grammar of what nft may be given for exposures --------------------------------

_PORT = r"(?:[1-9]\d{0,4})"
_V4 = r"(?:\d{1,3}(?:\.\d{1,3}){3})"
_V6 = r"(?:[0-9a-f:]+(?:\d{1,3}(?:\.\d{1,3}){3})?)"
_KEY = rf"(?:tcp|udp) \. {_PORT}"
_ELEM = {"expose_v4": rf"{_KEY} : {_V4} \. {_PORT}", "expose_v6": rf"{_KEY} : {_V6} \. {_PORT}"}
_LINE = re.compile(
    rf"add element inet oakestra_gw expose_v4 \{{ {_ELEM['expose_v4']}(?:, {_ELEM['expose_v4']})* \}}"
    rf"|add element inet oakestra_gw expose_v6 \{{ {_ELEM['expose_v6']}(?:, {_ELEM['expose_v6']})* \}}"
    rf"|delete element inet oakestra_gw expose_v[46] \{{ {_KEY}(?:, {_KEY})* \}}"
    rf"|get element inet oakestra_gw expose_v[46] \{{ {_KEY} \}}")


def assert_grammar(text: str) -> None:
    for line in text.splitlines():
        assert _LINE.fullmatch(line), f"not the grammar of typed values: {line!r}"


def assert_valid(exposures: list[Exposure]) -> None:
    keys = [e.key for e in exposures]
    assert len(keys) == len(set(keys))
    for e in exposures:
        assert type(e.exposed_port) is int and 1 <= e.exposed_port <= 65535
        assert type(e.service_port) is int and 1 <= e.service_port <= 65535
        assert e.protocol in PROTOCOLS
        assert isinstance(e.service_ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))
        assert any(e.service_ip in net for net in POLICY.service_ranges
                   if net.version == e.service_ip.version), e
        assert (e.exposed_port, e.protocol) not in POLICY.reserved
        assert (e.exposed_port, e.protocol) != (9090, "tcp")
    assert_grammar(ruleset.script(ruleset.change_tx(add=exposures)))
    assert_grammar(ruleset.script(ruleset.change_tx(remove=exposures)))


# -- strategies -------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
hostile_text = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["80; flush ruleset", "tcp }; flush ruleset; {", "10.30.0.1 . 80 }",
                     "udp\nflush ruleset", "$tunnel_if", "@expose_v4", "10.30.0.1\x00",
                     "10.30.0.1 ", " [fdff::1] ", "10.30.0.1/16", "fdff::1%eth0", "TCP", "Udp",
                     "include \"/etc/passwd\"", "ipv4; delete table inet oakestra_gw"]))
ports = st.one_of(st.integers(min_value=1, max_value=65535), st.integers(), st.booleans(),
                  st.floats(allow_nan=False), st.text(max_size=6), st.none())
service_ips = st.one_of(st.ip_addresses().map(str), hostile_text,
                        st.integers(0, 255).map(lambda i: f"10.30.{i}.7"),
                        st.integers(1, 0xffff).map(lambda i: f"fdff:2000::{i:x}"),
                        st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"))
near_valid = st.fixed_dictionaries(
    {"exposed_port": ports, "service_ip": service_ips},
    optional={"service_port": ports, "internal_port": ports,
              "protocol": st.one_of(st.sampled_from(["tcp", "udp", "TCP", "sctp"]), hostile_text),
              "service_id": st.one_of(st.none(), hostile_text, st.from_regex(
                  r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,20}", fullmatch=True)),
              "family": st.one_of(st.sampled_from(["ipv4", "ipv6", "IPv6"]), hostile_text),
              "extra": json_values})
# Valid by construction (ports clear of the reserved and listening ones), so that about half
# of the parser's inputs take the "accepted" branch.
free_ports = st.integers(1, 65535).filter(lambda p: p not in (22, 7777, 9090, 11022, 50103))
valid = st.fixed_dictionaries(
    {"exposed_port": free_ports, "service_ip": st.one_of(
        st.integers(1, 0xfffe).map(lambda i: f"10.30.{i >> 8}.{i & 255}"),
        st.integers(1, 0xffff).map(lambda i: f"fdff:2000::{i:x}")),
     "service_port": st.integers(1, 65535)},
    optional={"protocol": st.sampled_from(["tcp", "udp", "TCP", "Udp"]),
              "service_id": st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)})
invalid = st.one_of(json_values, near_valid,
                    st.lists(near_valid, min_size=1, max_size=5).map(lambda l: {"exposures": l}),
                    st.fixed_dictionaries({"exposures": json_values}))
bodies = st.one_of(valid, valid.map(lambda d: {"exposures": [d]}), invalid)
FAST = settings(max_examples=EXAMPLES, deadline=None, derandomize=not SOAK,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


def test_the_parser_accepts_only_valid_exposures():
    outcomes = {"accepted": 0, "rejected": 0}

    @FAST
    @given(bodies)
    def check(body):
        try:
            exposures = parse_exposures(body, POLICY)
        except InvalidInput as exc:
            assert exc.message and (exc.field is None or isinstance(exc.field, str))
            outcomes["rejected"] += 1
            return
        outcomes["accepted"] += 1
        assert exposures
        assert_valid(exposures)

    check()
    # Both branches really ran (the valid strategies make about half of the inputs).
    share = outcomes["accepted"] / sum(outcomes.values())
    report("parser", **outcomes, accepted_share=f"{share:.2f}")
    assert 0.3 <= share <= 0.9, outcomes


@FAST
@given(st.one_of(json_values, st.fixed_dictionaries(
    {"exposed_port": ports}, optional={"protocol": hostile_text, "family": hostile_text})))
def test_the_delete_parser_accepts_only_valid_requests(body):
    try:
        req = parse_delete(body)
    except InvalidInput:
        return
    assert 1 <= req.exposed_port <= 65535 and req.protocol in PROTOCOLS
    assert req.family in (None, "ipv4", "ipv6")
    fake = [Exposure(req.exposed_port, req.protocol, ipaddress.ip_address(
        "10.30.0.1" if fam == "ipv4" else "fdff::1"), 1) for fam, _, _ in req.keys()]
    assert_grammar(ruleset.script(ruleset.change_tx(remove=fake)))


@FAST
@given(st.one_of(st.text(max_size=40), st.lists(st.from_regex(
    r"\d{1,6}(:\d{1,6})?(/[a-zA-Z]{1,4})?", fullmatch=True), min_size=1, max_size=5)
    .map(";".join)), service_ips)
def test_the_port_notation_parser_accepts_only_valid_exposures(spec, ip):
    try:
        exposures = parse_port_notation(spec, ip, POLICY)
    except InvalidInput:
        return
    assert_valid(exposures)


@settings(max_examples=scaled(2000, 20000), deadline=None, derandomize=not SOAK)
@given(st.one_of(st.ip_addresses(), st.ip_addresses(v=4, network="10.30.0.0/15"),
                 st.ip_addresses(v=6, network="fdfe::/15")))
def test_no_target_outside_the_service_ranges_is_accepted(ip):
    body = {"exposed_port": 8080, "service_ip": str(ip), "service_port": 80}
    try:
        [e] = parse_exposures(body, POLICY)
    except InvalidInput as exc:
        assert exc.field == "service_ip"
        inside = any(ip in net for net in POLICY.service_ranges if net.version == ip.version)
        assert not inside or ip.is_loopback or ip.is_link_local or ip.is_multicast \
            or ip.is_unspecified or (ip.version == 6 and ip.ipv4_mapped)
        return
    assert any(e.service_ip in net for net in POLICY.service_ranges)
    assert e.service_ip == ip


# -- through the whole app: nft never sees a user's string ------------------------------------

class RecordingSession:
    """Stands in for gw.kernel.nft.NftSession: succeeds, and records every text nft would get
    (the session's own rendering of each transaction)."""

    def __init__(self):
        self.texts: list[str] = []

    def apply(self, tx) -> None:
        self.texts.append(ruleset.script(tx))

    def map_elements(self, family: str) -> list[bytes]:
        raise NoSuchObject("no table")  # as before the first load

    def chain_rules(self) -> dict:
        return {}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from gw.daemon.api import create_app
    from gw.kernel.firewall import Firewall
    from gw.service.gateway import Gateway
    from gw.store.local import LocalStore

    session = RecordingSession()
    store = LocalStore(tmp_path_factory.mktemp("store") / "exposures.json", fsync=False)
    gw = Gateway(store, Firewall(session, ruleset.skeleton_vars(SETTINGS)))
    application = create_app(gw, SETTINGS, token=None, listening=lambda: ())
    yield application.test_client(), session, gw
    store.close()


marked = st.text(max_size=20).flatmap(
    lambda t: st.sampled_from([MARK + t, t + MARK, f"10.30.0.1{MARK}", f"{MARK}; flush ruleset",
                               f"tcp{MARK}", f"fdff::1 {MARK}", f"web-{MARK}{t}"]))
marked_values = st.one_of(marked, st.integers(1, 65535), st.lists(marked, max_size=2),
                          st.dictionaries(marked, marked, max_size=2))
marked_bodies = st.one_of(
    st.dictionaries(st.sampled_from(sorted(ADD_FIELDS) + [MARK]), marked_values, max_size=7),
    st.fixed_dictionaries({"exposed_port": st.integers(1000, 65535), "service_ip":
                           st.sampled_from(["10.30.0.1", "fdff::1"]), "service_port":
                           st.integers(1, 65535)}, optional={
                               "service_id": marked, "protocol": marked, "family": marked}),
    st.lists(st.fixed_dictionaries({"exposed_port": st.integers(1000, 65535),
                                    "service_ip": st.one_of(marked, st.just("10.30.0.2")),
                                    "service_port": st.integers(1, 65535)},
                                   optional={"service_id": marked}), min_size=1, max_size=3)
    .map(lambda items: {"exposures": items}))


@settings(max_examples=scaled(800, 10000), deadline=None, derandomize=not SOAK,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=marked_bodies, route=st.sampled_from(["add", "delete"]))
def test_no_string_of_a_request_reaches_nft(app, body, route):
    client, session, gw = app
    before = len(session.texts)
    resp = client.post(f"/api/service/exposure/{route}", json=body)
    assert resp.status_code < 500, resp.get_json()
    for text in session.texts[before:]:
        assert MARK not in text, text
        assert_grammar(text)
    if resp.status_code >= 400:
        assert len(session.texts) == before, "a rejected request reached nft"
    # Accepted labels are stored, but a label is never nft syntax.
    if route == "add" and resp.status_code in (200, 201):
        for doc in resp.get_json()["exposures"]:
            assert MARK not in doc["service_ip"] and MARK not in doc["protocol"]
    if len(gw.exposures()) > 200:
        for e in gw.exposures():
            client.post("/api/service/exposure/delete", json={
                "exposed_port": e.exposed_port, "protocol": e.protocol})


# -- schemathesis against the real daemon -----------------------------------------------------

@pytest.mark.kernel
@pytest.mark.slow
def test_schemathesis_fuzz_no_5xx_and_rejections_change_nothing(tmp_path):
    binary = schemathesis_bin()
    examples = scaled(400, 3000)
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        api = gw.http()
        assert api.add({"exposed_port": 8080, "service_ip": "10.30.0.1",
                        "service_port": 80}).status == 201
        tally = tmp_path / "tally"
        env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(ROOT),
               "SCHEMATHESIS_HOOKS": "tests.reliability.st_hooks",
               "OAKGW_ST_API": f"http://{HOST}:{API_PORT}", "OAKGW_ST_TOKEN": TOKEN,
               "OAKGW_ST_STORE_DIR": str(gw.store_dir), "OAKGW_ST_TALLY": str(tally)}
        started = time.monotonic()
        proc = gw.ns.run(
            binary, "run", f"http://{HOST}:{API_PORT}/api/openapi.json",
            "--header", f"Authorization: Bearer {TOKEN}",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(examples), "--workers", "1",
            "--phases", "examples,coverage,fuzzing", "--request-timeout", "10",
            "--seed", "8" if not SOAK else str(int(time.time())),
            "--output-truncate", "true", "--report", "junit",
            "--report-junit-path", str(tmp_path / "junit.xml"),
            check=False, timeout=900, env=env, cwd=str(ROOT))
        elapsed = time.monotonic() - started
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-20000:]
        # The custom check ran: it compared the state around every rejected mutation.
        rejected = tally.read_text().splitlines()
        assert len(rejected) > 50, output[-3000:]
        listed = docs_set(api.list())
        assert listed == gw.kernel_docs()
        for _, _, _, ip, _ in listed:
            assert any(ipaddress.ip_address(ip) in net for net in SETTINGS.network.service_ranges)
        assert api.get("/api/ready").status == 200
        assert "Traceback" not in gw.log()
        page = api.get("/metrics").body.decode()
        served = re.findall(r'^oakestra_gw_api_requests_total\{[^}]*status="(\d+)"\} ([0-9.e+]+)$', page,
                            re.M)
        assert not [s for s, _ in served if s.startswith("5")], served
        requests = int(sum(float(n) for _, n in served))
    report("schemathesis", max_examples=examples, requests_served=requests,
           rejected_mutations_checked_unchanged=len(rejected), seconds=f"{elapsed:.0f}")


# -- slow and half-open clients --------------------------------------------------------------

def _open(n: int, rcvbuf: int | None = None) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        if rcvbuf:  # before connect, so the advertised window stays small
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect((HOST, API_PORT))
        s.setblocking(False)
        socks.append(s)
    return socks


# Pipelined requests per never-reading client: their answers (the OpenAPI document, ~13 KB
# each) are far more than a small receive window and the server's send buffer hold.
DEAF_REQUESTS = 20


def blocked_sends(gw, ports: set[int]) -> int:
    """How many of the server's connections to these client ports have unsent data queued
    (Send-Q > 0): the server's writes to them are blocked."""
    out = gw.ns.run("ss", "-tnH", "state", "established", f"( sport = :{API_PORT} )").stdout
    count = 0
    for line in out.splitlines():
        fields = line.split()
        send_q, peer = int(fields[1]), fields[3]
        if send_q > 0 and int(peer.rsplit(":", 1)[1]) in ports:
            count += 1
    return count


@pytest.mark.kernel
@pytest.mark.slow
def test_slow_and_half_open_clients_do_not_block_others(tmp_path):
    slow_n, idle_n, body_n, deaf_n = (scaled(200, 400), scaled(200, 400), scaled(50, 100),
                                      scaled(50, 50))
    seconds = scaled(6, 25)
    header = (b"POST /api/service/exposure/add HTTP/1.1\r\nHost: gw\r\n"
              b"Content-Type: application/json\r\nX-Padding: " + b"a" * 2000)
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        stop = threading.Event()
        errors: list[BaseException] = []
        latency = Timer()
        opened = threading.Event()
        held: list[socket.socket] = []
        deaf_ports: set[int] = set()

        def attackers():
            try:
                enter_netns(gw.ns.name)
                slow = _open(slow_n)                      # headers, one byte at a time
                idle = _open(idle_n)                      # connect, send nothing
                bodies = _open(body_n)                    # a body that never finishes
                for s in bodies:
                    s.sendall(b"POST /api/service/exposure/add HTTP/1.1\r\nHost: gw\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 60000\r\n"
                              b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n{")
                deaf = _open(deaf_n, rcvbuf=4096)         # ask, never read the answer
                ask = (b"GET /api/openapi.json HTTP/1.1\r\nHost: gw\r\nAuthorization: "
                       b"Bearer " + TOKEN.encode() + b"\r\n\r\n")
                for s in deaf:
                    s.setblocking(True)
                    s.sendall(ask * DEAF_REQUESTS)
                    s.setblocking(False)
                    deaf_ports.add(s.getsockname()[1])
                held.extend(slow + idle + bodies + deaf)
                opened.set()
                i = 0
                while not stop.is_set():
                    for s in slow:
                        try:
                            s.send(header[i % len(header):i % len(header) + 1])
                        except BlockingIOError:
                            pass
                    for s in bodies:
                        try:
                            s.send(b" ")
                        except BlockingIOError:
                            pass
                    i += 1
                    stop.wait(0.1)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                opened.set()

        def normal():
            enter_netns(gw.ns.name)
            from gw.lab.http import KeepAliveHttp
            port = 20000
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                client = KeepAliveHttp(HOST, API_PORT, TOKEN, timeout=10)  # a new connection each time
                t0 = time.monotonic()
                status, _ = client.add({"exposed_port": port, "service_ip": "10.30.0.1",
                                        "service_port": 80})
                status2, _ = client.list()
                latency.add(time.monotonic() - t0)
                client.close()
                assert (status, status2) == (201, 200)
                port += 1
                time.sleep(0.05)

        attacker = threading.Thread(target=attackers, daemon=True)
        attacker.start()
        assert opened.wait(60)
        assert not errors, errors
        # The never-reading clients really hold the server up: every one of its sockets to
        # them has a full window and data waiting.
        blocked = wait_for(lambda: blocked_sends(gw, deaf_ports) == deaf_n and deaf_n,
                           timeout=30, what="the server's sends to never-reading clients to block")
        try:
            box: dict = {}

            def run_normal():
                try:
                    normal()
                except BaseException as exc:  # noqa: BLE001
                    box["error"] = exc

            t = threading.Thread(target=run_normal, daemon=True)
            t.start()
            t.join(seconds + 60)
            assert not t.is_alive(), "a normal client hangs"
            if "error" in box:
                raise box["error"]
        finally:
            stop.set()
            attacker.join(10)
            for s in held:
                s.close()
        assert not errors, errors
        report("slow clients", slow_headers=slow_n, idle=idle_n, unfinished_bodies=body_n,
               never_reading=deaf_n, never_reading_blocked=blocked,
               normal_add_plus_list=latency.summary())
        assert len(latency.samples) >= 10
        # Every normal request was answered (none hung: the join above); how fast is a figure,
        # not a limit, on a shared machine.
        assert gw.http().get("/api/health").status == 200
        assert json.dumps(gw.http().list())  # still serving lists
