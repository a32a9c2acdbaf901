"""Pure pieces of the API, server and metrics modules (no root, no daemon)."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import uuid

import pytest

from gw.daemon import auth

from gw.kernel import sockets
from gw.core.config import parse_config
from gw.core.errors import ConfigError
from gw.core.exposure import Exposure
from gw.kernel.firewall import Diff
from gw.daemon.connections import ConnectionCounter, parse_event
from gw.daemon.metrics import Metrics, read_conntrack_drops
from gw.core.errors import one_line
from gw.daemon.reload import apply_live, config_changes
from gw.daemon.systemd import sd_notify, watchdog_interval
from tests.helpers import wait_for

BASE = {"network": {"internal_ipv4": "10.30.255.1", "internal_ipv6": "fdff::ffff:1"}}


# -- sockets ----------------------------------------------------------------------------------

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100A8C0:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0100A8C0:1F93 0200A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 4 1
"""
TCP6 = """  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:0051 00000000000000000000000000000000:0000 0A
   2: 0000000000000000FFFF00000100007F:0052 00000000000000000000000000000000:0000 0A
"""
UDP = """   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
  1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0
  2: 0100007F:0036 00000000:0000 07 00000000:00000000 00:00000000 00000000     0
  3: 0100A8C0:0037 0200A8C0:0035 01 00000000:00000000 00:00000000 00000000     0
"""


@pytest.mark.skipif(os.sys.byteorder != "little", reason="fixtures are little-endian procfs")
def test_listening_sockets_from_procfs():
    assert sockets.parse_table(TCP, "tcp") == {(8080, "tcp"), (8082, "tcp")}
    # ::, ::1 (loopback: out), ::ffff:127.0.0.1 (loopback: out)
    assert sockets.parse_table(TCP6, "tcp") == {(80, "tcp")}
    assert sockets.parse_table(UDP, "udp") == {(53, "udp")}
    assert sockets.parse_table("garbage\nnot a line\n", "tcp") == set()


def test_listening_reads_this_namespace_and_caches():
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        assert (port, "tcp") in sockets.read_listening()
        reads = []
        cached = sockets.Listening(ttl=60, read=lambda: reads.append(1) or {(1, "tcp")})
        assert cached() == {(1, "tcp")} and cached() == {(1, "tcp")} and len(reads) == 1
    finally:
        s.close()


# -- auth -------------------------------------------------------------------------------------

def test_bearer_matches():
    token = "x" * 20
    assert auth.bearer_matches(f"Bearer {token}", token)
    assert auth.bearer_matches(f"bearer   {token} ", token)
    for header in (None, "", token, f"Basic {token}", f"Bearer {token}y", "Bearer ",
                   f"Bearer {token[:-1]}", "Bearer \udcff"):
        assert not auth.bearer_matches(header, token)


def test_read_token_rules(tmp_path):
    f = tmp_path / "token"
    f.write_text("  a-good-token-0123456789  \n")
    assert auth.read_token(f) == "a-good-token-0123456789"
    for bad in ("short\n", "", "two words-0123456789\n", "x" * 5000):
        f.write_text(bad)
        with pytest.raises(ConfigError) as info:
            auth.read_token(f)
        assert info.value.field == "api.token_file"
    with pytest.raises(ConfigError, match="cannot read"):
        auth.read_token(tmp_path / "missing")


def test_oakestra_mode_generates_a_private_token_once(tmp_path):
    settings = parse_config({"store": {"path": str(tmp_path / "state" / "e.json")},
                             "oakestra": {"cluster_url": "http://cluster:10000"}})
    (tmp_path / "state").mkdir()
    token = auth.daemon_token(settings)
    path = tmp_path / "state" / "api-token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.daemon_token(settings) == token  # reused, never replaced
    assert auth.client_token(settings) == token  # the CLI finds it


def test_standalone_token_is_optional(tmp_path):
    settings = parse_config({"store": {"path": str(tmp_path / "e.json")}})
    assert auth.daemon_token(settings) is None
    assert not (tmp_path / "api-token").exists()


# -- sd_notify ----------------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(tmp_path, abstract):
    name = f"oakgw-test-{uuid.uuid4().hex}"
    address = "\0" + name if abstract else str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    try:
        env = {"NOTIFY_SOCKET": "@" + name if abstract else address}
        assert sd_notify("READY=1", env)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def drain(sock) -> list[bytes]:
    """The datagrams already queued, without waiting."""
    got, timeout = [], sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(100))
    except BlockingIOError:
        return got
    finally:
        sock.settimeout(timeout)


def test_watchdog_pings_only_while_the_api_answers(tmp_path, monkeypatch):
    import http.server
    import threading

    from gw.daemon.systemd import api_answers, watchdog_loop

    healthy = {"ok": True}
    unhealthy_answers = []  # one item per 503 the watchdog was given

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = healthy["ok"] and self.path == "/api/health"
            if not ok:
                unhealthy_answers.append(self.path)
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)  # only catches a hang
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    stopping = threading.Event()
    port = server.server_address[1]
    thread = threading.Thread(target=watchdog_loop, daemon=True,
                              args=(stopping, 0.05, lambda t: api_answers("127.0.0.1", port, t)))
    thread.start()
    try:
        assert sock.recv(100) == b"WATCHDOG=1"
        healthy["ok"] = False
        # The loop is sequential: once it was given a 503, every ping of a 200 before the
        # switch has been sent. Drain those, then let it see three more 503s: no ping.
        wait_for(lambda: unhealthy_answers, timeout=30, what="a 503 to the watchdog")
        drain(sock)
        seen = len(unhealthy_answers)
        wait_for(lambda: len(unhealthy_answers) >= seen + 3, timeout=30, what="three more 503s")
        assert drain(sock) == [], "a ping while the API did not answer"
        healthy["ok"] = True
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        stopping.set()
        thread.join(2)
        server.shutdown()
        sock.close()


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None or \
        os.getpid() == 1
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# -- reload ---------------------------------------------------------------------------------------

def test_reload_applies_only_live_keys():
    running = parse_config(BASE)
    new = parse_config({**BASE, "api": {"port": 12000, "allowed_sources": ["192.0.2.0/24"],
                                        "token_file": "/t"},
                        "network": {**BASE["network"], "reserved_ports": ["1/udp"],
                                    "tunnel_interface": "tun9", "bridge_interface": "br9"}})
    assert set(config_changes(running, new)) == {
        "api.port", "api.allowed_sources", "api.token_file", "network.reserved_ports",
        "network.tunnel_interface", "network.bridge_interface"}
    live = apply_live(running, new)
    assert set(config_changes(running, live)) == {
        "api.allowed_sources", "api.token_file", "network.reserved_ports",
        "network.tunnel_interface"}
    assert live.api.port == 11022 and live.network.bridge_interface == "oakgw0"


def test_one_line_names_the_key():
    assert one_line(ConfigError("must be a port", field="api.port")) == "api.port: must be a port"
    assert one_line(ConfigError("api.port must be a port", field="api.port")) == \
        "api.port must be a port"


# -- metrics --------------------------------------------------------------------------------------

def test_conntrack_drops_sum_all_cpus(tmp_path):
    f = tmp_path / "nf_conntrack"
    f.write_text("entries  clashres found new invalid ignore delete chainlength insert "
                 "insert_failed drop early_drop icmp_error\n"
                 "0000000a  00000000 00000000 00000000 00000001 00000000 00000000 00000000 "
                 "00000000 00000002 00000010 00000001 00000000\n"
                 "0000000a  00000000 00000000 00000000 00000001 00000000 00000000 00000000 "
                 "00000000 00000001 00000001 00000000 00000000\n")
    assert read_conntrack_drops(f) == {"drop": 17, "early_drop": 1, "insert_failed": 3}
    assert read_conntrack_drops(tmp_path / "missing") == {}


def test_conntrack_event_parsing_and_counting():
    line = ("    [NEW] udp      17 30 src=198.18.0.9 dst=198.18.0.1 sport=39256 dport=5353 "
            "[UNREPLIED] src=10.30.0.1 dst=10.30.255.1 sport=53 dport=39256\n")
    assert parse_event(line) == (("ipv4", "udp", 5353), (ipaddress.ip_address("10.30.0.1"), 53))
    six = ("[NEW] tcp      6 120 SYN_SENT src=2001:db8::2 dst=2001:db8::1 sport=4000 dport=443 "
           "[UNREPLIED] src=fdff::1 dst=fdff::ffff:1 sport=8443 dport=4000")
    assert parse_event(six) == (("ipv6", "tcp", 443), (ipaddress.ip_address("fdff::1"), 8443))
    assert parse_event("conntrack v1.4.7 (conntrack-tools): 2 flow events have been shown.") \
        is None
    counter = ConnectionCounter(lambda: [Exposure(5353, "udp", ipaddress.ip_address("10.30.0.1"),
                                                  53)])
    counter.refresh()
    counter.count(line)
    counter.count(line)
    # Not DNATed by this exposure (the host's own flow to port 5353): not counted.
    counter.count(line.replace("src=10.30.0.1", "src=198.18.0.1"))
    counter.count("WARNING: We have hit ENOBUFS! We are losing events.")
    assert counter.snapshot() == {("ipv4", "udp", 5353): 2}
    assert counter.lost == 1


def test_metrics_hooks_and_registry_is_private():
    from prometheus_client import REGISTRY

    m = Metrics(conntrack_stats=lambda: {"nf_conntrack_count": 3, "nf_conntrack_max": 10},
                conntrack_drops=lambda: {"drop": 2})
    m.observe_firewall("change", 0.01, True)
    m.observe_firewall("change", 0.02, False)
    m.on_change("reconcile", True)
    m.reconciled(Diff(missing=[object()], unexpected=[("ipv4", "tcp", 1)]))
    m.reconciled(Diff())
    m.observe_request("/api/health", "GET", 200, 0.001)
    text = m.render().decode()
    for line in ('oakestra_gw_firewall_transaction_failures_total{kind="change"} 1.0',
                 'oakestra_gw_reconcile_runs_total{result="ok"} 1.0', "oakestra_gw_drift_repairs_total 1.0",
                 'oakestra_gw_drift_repaired_elements_total{what="missing"} 1.0',
                 "oakestra_gw_conntrack_entries 3.0", "oakestra_gw_conntrack_max 10.0",
                 'oakestra_gw_conntrack_drops_total{kind="drop"} 2.0',
                 'oakestra_gw_api_requests_total{method="GET",route="/api/health",status="200"} 1.0'):
        assert line in text, line
    assert "_created" not in text
    assert REGISTRY.get_sample_value("oakestra_gw_drift_repairs_total") is None
    Metrics()  # a second one in the same process does not collide
