"""The daemon's lifecycle: SIGHUP (repair, live config, bad config, token rotation), SIGTERM
(rules and store stay, a restart serves the same), exit codes, sd_notify and the watchdog,
slow clients, per-exposure metrics."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.api.harness import (API_PORT, INTERNAL_V4, GatewayTestbed, docs_set, gw_command,
                               require_root)
from tests.helpers import ex, wait_for

pytestmark = pytest.mark.kernel


@pytest.fixture
def make(tmp_path):
    require_root()
    made = []

    def factory(name="gw", **kw) -> GatewayTestbed:
        gateway = GatewayTestbed(tmp_path / name, **kw)
        made.append(gateway)
        return gateway

    try:
        yield factory
    finally:
        for gateway in made:
            gateway.close()


# -- SIGHUP ------------------------------------------------------------------------------------

def test_sighup_repairs_a_tampered_map(make):
    gw = make(drift_watch=False).start()
    api = gw.http()
    for body in (ex(8080), ex(8081), ex(53, "fdff::1", 53, "udp")):
        assert api.add(body).status == 201
    want = docs_set(api.list())
    gw.nft("delete", "element", "inet", "oakestra_gw", "expose_v4", "{ tcp . 8080 }")
    gw.nft("add", "element", "inet", "oakestra_gw", "expose_v4",
           "{ tcp . 9999 : 10.30.6.6 . 66 }")
    gw.nft("flush", "map", "inet", "oakestra_gw", "expose_v6")
    assert gw.kernel_docs() != want

    gw.send(signal.SIGHUP)
    wait_for(lambda: gw.kernel_docs() == want, what="repair", log=gw.log)
    gw.wait_log("reconcile: repaired: ")
    metrics = api.get("/metrics").body.decode()
    assert "oakestra_gw_drift_repairs_total 1.0" in metrics
    assert 'oakestra_gw_drift_repaired_elements_total{what="missing"} 2.0' in metrics
    assert 'oakestra_gw_drift_repaired_elements_total{what="unexpected"} 1.0' in metrics
    assert api.get("/api/ready").status == 200


def test_sighup_repairs_a_deleted_table(make):
    gw = make(drift_watch=False).start()
    api = gw.http()
    assert api.add(ex(8080)).status == 201
    gw.nft("delete", "table", "inet", "oakestra_gw")
    gw.send(signal.SIGHUP)
    wait_for(lambda: gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80)},
             what="table restored", log=gw.log)
    chains = gw.nft("list", "table", "inet", "oakestra_gw").stdout
    for chain in ("prerouting", "output", "postrouting", "forward", "input"):
        assert f"chain {chain}" in chains


def test_drift_is_repaired_without_a_signal(make):
    """The drift watcher (nft monitor) repairs a change by another process by itself."""
    gw = make().start()
    api = gw.http()
    assert api.add(ex(8080)).status == 201
    want = gw.kernel_docs()
    gw.nft("delete", "element", "inet", "oakestra_gw", "expose_v4", "{ tcp . 8080 }")
    wait_for(lambda: gw.kernel_docs() == want, timeout=30, what="repair", log=gw.log)
    wait_for(lambda: "oakestra_gw_drift_repairs_total 1.0" in api.get("/metrics").body.decode(),
             what="repair counted", log=gw.log)


def test_sighup_applies_a_changed_config(make):
    gw = make().start()
    api = gw.http()
    assert api.add(ex(7777)).status == 201
    before = gw.nft("list", "chain", "inet", "oakestra_gw", "input").stdout
    assert "10.30.0.0/16" in before and "192.0.2.0/24" not in before

    gw.config["api"]["allowed_sources"] = ["192.0.2.0/24", "2001:db8:1::/48"]
    gw.config["network"]["reserved_ports"] = ["22/tcp", "50103/udp", "7778/tcp"]
    gw.config["api"]["port"] = API_PORT + 1        # cannot change live
    gw.config["api"]["threads"] = 3                 # cannot change live
    gw.write_config()
    gw.send(signal.SIGHUP)
    log = gw.wait_log("gw.daemon.server: reconcile: ")
    assert "reload: api.port changed: restart needed" in log
    assert "reload: api.threads changed: restart needed" in log
    assert "api.allowed_sources" in log.split("reload: applied")[1].splitlines()[0]

    after = gw.nft("list", "chain", "inet", "oakestra_gw", "input").stdout
    assert "192.0.2.0/24" in after and "2001:db8:1::/48" in after
    assert "10.30.0.0/16" not in after
    # The reserved ports apply to new requests; the API still serves on the old port.
    r = api.add(ex(7778))
    assert r.status == 400 and r.json["field"] == "exposed_port", r
    assert api.add(ex(7779)).status == 201
    # The exposures survived the skeleton reload.
    assert docs_set(api.list()) == gw.kernel_docs() and len(gw.kernel_docs()) == 2


def test_sighup_with_a_bad_config_keeps_the_running_one(make):
    gw = make().start()
    api = gw.http()
    assert api.add(ex(8080)).status == 201
    good = gw.config_path.read_text()
    for bad in ("[api]\nport = 'eleven'\n", "[api\n", "[network]\nnonsense = 1\n"):
        gw.write_config(bad)
        gw.send(signal.SIGHUP)
        gw.wait_log("keeping the running configuration")
        assert gw.proc.poll() is None
        assert api.get("/api/ready").status == 200
        assert api.add(ex(8081)).status in (200, 201)
        gw.write_config(good)
        gw.mark_log()
    log = gw.log()
    assert "reload: api.port: api.port must be a port number" in log or \
        "reload: api.port must be a port number" in log
    assert "unknown key network.nonsense" in log


def test_sighup_rotates_the_token(make):
    gw = make().start()
    assert gw.http().get("/api/service/exposure").status == 200
    new = "rotated-token-abcdef0123456789"
    (gw.dir / "token").write_text(new + "\n")
    gw.send(signal.SIGHUP)
    gw.wait_log("reload: applied")
    assert gw.http().get("/api/service/exposure").status == 401
    assert gw.http(token=new).get("/api/service/exposure").status == 200
    # An unreadable token file on reload keeps the running token.
    (gw.dir / "token").write_text("short\n")
    gw.mark_log()
    gw.send(signal.SIGHUP)
    gw.wait_log("keeping the running token")
    assert gw.http(token=new).get("/api/service/exposure").status == 200


# -- SIGTERM and restart -------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_leaves_rules_and_store_and_a_restart_serves_the_same(make, sig):
    gw = make().start()
    gw.open_path()
    api = gw.http()
    bodies = [ex(8080), ex(8081, "fdff::1"), ex(53, "10.30.0.2", 53, "udp")]
    assert api.add({"exposures": bodies}).status == 201
    assert api.add({**ex(8082), "service_id": "labelled"}).status == 201
    listed = api.list()
    kernel = gw.kernel_docs()
    assert kernel == docs_set(listed)
    table = gw.nft("list", "table", "inet", "oakestra_gw").stdout
    assert gw.exchange(8080, "before") == "before"

    assert gw.stop(sig) == 0
    assert gw.kernel_docs() == kernel
    assert gw.exchange(8080, "stopped") == "stopped"  # traffic keeps flowing
    assert gw.nft("list", "table", "inet", "oakestra_gw").stdout == table
    assert "left in place" in gw.log()
    files = gw.store_files()
    assert files

    gw.start()
    assert api.list() == listed
    assert gw.kernel_docs() == kernel
    assert api.get("/api/ready").status == 200


def test_sigterm_waits_for_nothing_and_exits_promptly(make):
    gw = make().start()
    assert gw.stop(signal.SIGTERM) == 0  # stop() fails if it is still running after 15 s


# -- start failures ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, key", [
    ("[api]\nport = 'x'\n", "api.port"),
    ("[api]\nport = 70000\n", "api.port"),
    ("[network]\ninternal_ipv4 = '10.30.255.1'\n", "network.internal_ipv6"),
    ("[network]\ninternal_ipv4 = '10.30.255.1'\ninternal_ipv6 = 'fdff::1'\n"
     "reserved_ports = ['22/icmp']\n", "network.reserved_ports"),
    ("[api]\ncolour = 'blue'\n", "api.colour"),
    ("[api]\nhost = '127.0.0.1'\ntoken_file = '/nonexistent/token'\n[network]\n"
     "internal_ipv4 = '10.30.255.1'\ninternal_ipv6 = 'fdff::1'\n", "api.token_file"),
])
def test_config_error_is_one_line_and_exit_2(make, text, key):
    gw = make(data_path=False)
    gw.write_config(text.replace("[api]\n", f"[store]\npath = '{gw.store_dir}/e.json'\n[api]\n", 1)
                    if "[api]" in text else f"[store]\npath = '{gw.store_dir}/e.json'\n" + text)
    gw.start(wait=False)
    assert gw.proc.wait(timeout=20) == 2
    lines = [line for line in gw.log().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("oakestra-gw: config error: ") and key in lines[0], lines
    assert gw.kernel() is None  # nothing loaded


def test_missing_config_file_is_exit_2(make):
    gw = make(data_path=False)
    gw.start(wait=False, args=["serve", "--config", str(gw.dir / "nope.toml")])
    assert gw.proc.wait(timeout=20) == 2
    assert "no such file" in gw.log()


def test_second_daemon_on_the_same_store_exits_1(make):
    gw = make().start()
    assert gw.http().add(ex(8080)).status == 201
    proc = gw.ns.run(*gw_command(),
                     "serve", "--config", str(gw.config_path), check=False, timeout=30)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().count("\n") == 0 and "in use" in proc.stderr, proc.stderr
    assert gw.http().list()  # the first one is unharmed
    assert gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80)}


def test_port_in_use_exits_1(make):
    gw = make()
    blocker = gw.ns.popen(sys.executable, "-c", f"""
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", {API_PORT})); s.listen(); print("up", flush=True)
time.sleep(60)""", stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout.readline().strip() == "up"
        gw.start(wait=False)
        assert gw.proc.wait(timeout=20) == 1
        assert f"cannot listen on 127.0.0.1:{API_PORT}" in gw.log()
    finally:
        blocker.kill()
        blocker.wait()


# -- systemd -----------------------------------------------------------------------------------

def test_sd_notify_ready_reload_watchdog_stopping(make, tmp_path):
    gw = make()
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    try:
        gw.start(wait=False, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})

        def next_message():
            return sock.recv(4096).decode()

        first = next_message()
        assert first.startswith("READY=1"), first
        assert gw.http().get("/api/health").status == 200  # READY=1 came after the bind
        pings = [next_message() for _ in range(3)]
        assert pings == ["WATCHDOG=1"] * 3, pings
        gw.send(signal.SIGHUP)
        seen = [next_message() for _ in range(6)]
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in seen), seen
        assert "READY=1" in seen[seen.index(next(m for m in seen if m.startswith("RELOADING"))):]
        gw.send(signal.SIGTERM)
        rest = []
        while "STOPPING=1" not in rest:
            rest.append(next_message())
        assert gw.proc.wait(timeout=15) == 0
    finally:
        sock.close()


# -- tokens and listening beyond loopback ---------------------------------------------------------

def test_no_token_beyond_loopback_warns_and_serves_without_auth(make):
    gw = make(token=None, config={"api": {"host": INTERNAL_V4}})
    gw.start(wait=False)
    api = gw.http(host=INTERNAL_V4)
    wait_for(lambda: _answers(api), what="serving on the internal IPv4", log=gw.log)
    assert "without a token" in gw.log()
    assert api.add(ex(8080), token=None).status == 201
    doc = api.get("/api/openapi.json", token=None).json
    assert "securitySchemes" not in doc.get("components", {}) and "security" not in doc


def _answers(api) -> bool:
    try:
        return api.get("/api/health").status == 200
    except OSError:
        return False


# -- slow clients -------------------------------------------------------------------------------

def test_slow_and_half_open_clients_do_not_block_others(make):
    gw = make(config={"api": {"threads": 2}}).start()
    api = gw.http()
    stalled = []
    try:
        for i in range(40):
            s = api.connect()
            if i % 2:
                s.sendall(b"POST /api/service/exposure/add HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 1000\r\nContent-Type: application/json\r\n\r\n{")
            else:
                s.sendall(b"GET /api/he")  # half a request line, then silence
            stalled.append(s)
        for _ in range(20):
            assert api.get("/api/service/exposure").status == 200
    finally:
        for s in stalled:
            s.close()


# -- per-exposure metrics -----------------------------------------------------------------------

def test_per_exposure_new_connection_counter(make):
    gw = make(config={"api": {"per_exposure_metrics": True}})
    gw.ns.run("ip", "addr", "add", "198.18.0.1/32", "dev", "lo")
    gw.start()
    api = gw.http()
    assert api.add(ex(5353, "10.30.0.1", 53, "udp")).status == 201
    assert api.add(ex(5354, "10.30.0.1", 54, "udp")).status == 201
    time.sleep(0.5)  # the counter re-reads the exposures after a change
    send = ("import socket\nfor i in range(3):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    s.sendto(b'x', ('198.18.0.1', 5353)); s.close()\n")
    gw.ns.run(sys.executable, "-c", send)

    def counted():
        text = api.get("/metrics").body.decode()
        m = re.search(r'oakestra_gw_exposure_new_connections_total\{exposed_port="5353",family="ipv4",'
                      r'protocol="udp"\} (\d+)', text)
        return m is not None and int(m[1]) == 3

    wait_for(counted, timeout=10, what="3 new connections counted", log=gw.log)
    text = api.get("/metrics").body.decode()
    assert 'exposed_port="5354"' not in text or \
        'oakestra_gw_exposure_new_connections_total{exposed_port="5354",family="ipv4",protocol="udp"} 0' \
        in text
