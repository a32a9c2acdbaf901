"""Security checks (issue 8), each a test:

- the management port is unreachable from the public side (the lab's client), even when the API
  listens on every address and even for a client that forges an allowed source address; with
  positive controls that the same port answers where it should;
- with a token configured, every route but health and ready answers 401 without it (read from
  the served OpenAPI document, so a new route is covered the day it appears), and a refused
  request changes nothing;
- DNAT targets outside the service ranges are impossible: no API input gets one into the maps;
- no user string reaches nft as syntax: hostile strings through every field, while `nft
  monitor` records everything the kernel was told (see also tests/reliability/test_hostile.py);
- the unit runs with only the capabilities it needs: the unit's bounding set is CAP_NET_ADMIN
  alone, and the daemon does its whole job under exactly that set (and cannot start without it).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gw import lab as L
from tests.api.harness import gw_command
from tests.helpers import wait_for
from tests.reliability.common import children, cmdline
from tests.reliability.daemon import TOKEN, docs_set, gateway

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "oakestra-gw.service"
API_PORT = 11022


# -- the management port from the public side --------------------------------------------------

@pytest.fixture(scope="module", params=["0.0.0.0", "::"], ids=["listen-all-ipv4",
                                                                "listen-all-ipv6"])
def lab(request):
    """The worst case: the API listens on every address of the gateway (waitress binds one
    family per socket: each is tried)."""
    with L.Lab() as lab:
        lab.start_services()
        daemon = L.lab_daemon(lab, overrides={"api": {"host": request.param}}).start()
        status, _ = daemon.request("POST", "/api/service/exposure/add", {"exposures": [
            {"exposed_port": 8080, "service_ip": L.SERVICE_V4, "service_port": 80},
            {"exposed_port": 8080, "service_ip": L.SERVICE_V6, "service_port": 80}]})
        assert status == 201
        v6 = request.param == "::"
        yield SimpleNamespace(lab=lab, daemon=daemon,
                              public=L.GATEWAY_V6 if v6 else L.GATEWAY_V4,
                              internal=L.INTERNAL_V6 if v6 else L.INTERNAL_V4,
                              forged="fdff:2000::77" if v6 else "10.30.0.77")
        assert daemon.stop() == 0, daemon.log_tail()


def blocked(probe) -> str | None:
    try:
        probe()
    except OSError as exc:
        return type(exc).__name__
    return None


def health(lab, role: str, host: str, *, source: str | None = None, timeout: float = 1.0):
    return L.http_get(lab, role, host, API_PORT, "/api/health", timeout=timeout, source=source)


def test_the_management_port_is_unreachable_from_the_public_side(lab):
    lab_ = lab.lab
    # Positive controls: the API does listen on the public address (the gateway itself gets an
    # answer there), an allowed source on the Oakestra side reaches it over the network, and
    # the client's packets do reach the gateway (an exposure answers).
    for host in (lab.public, lab.internal):
        assert health(lab_, "gateway", host)[0] == 200, host
    assert health(lab_, "worker", lab.internal)[0] == 200
    assert L.http_get(lab_, "client", lab.public, 8080, "/whoami", timeout=3)[0] == 200
    # From the public side: silently dropped (not even refused), on the public address and on
    # the internal one, although the client routes the internal addresses through the gateway.
    for host in (lab.public, lab.internal):
        assert blocked(lambda: health(lab_, "client", host)) == "TimeoutError", host


def behind_our_input_chain(lab_) -> int:
    """Packets to the API port that got past our input chain (a counter in a table of its own
    that hooks in after ours)."""
    out = lab_.run("gateway", "nft", "list", "chain", "inet", "relprobe", "input").stdout
    return int(re.search(r"counter packets (\d+)", out).group(1))


def test_a_forged_allowed_source_from_the_public_side_is_dropped(lab):
    """A client that claims an address of the allowed Oakestra range: the input chain's reverse
    path check (an answer would not leave through the interface the packet came in on) drops
    it. The gateway would route an answer into the tunnel anyway, so what counts is whether
    the packets get past our input chain at all."""
    lab_, forged = lab.lab, lab.forged
    prefix = 128 if ":" in forged else 32
    lab_.run("gateway", "nft", "add table inet relprobe; add chain inet relprobe input "
             "{ type filter hook input priority 100; }; "
             f"add rule inet relprobe input tcp dport {API_PORT} counter")
    lab_.ip("client", f"addr add {forged}/{prefix} dev eth0" + (" nodad" if prefix == 128 else ""))
    try:
        for host in (lab.public, lab.internal):
            assert blocked(lambda: health(lab_, "client", host, source=forged, timeout=0.5)) \
                == "TimeoutError", (host, forged)
        assert behind_our_input_chain(lab_) == 0, "forged packets passed our input chain"
        # Positive control: the counter does count what the input chain lets through.
        assert health(lab_, "worker", lab.internal)[0] == 200
        assert behind_our_input_chain(lab_) > 0
    finally:
        lab_.ip("client", f"addr del {forged}/{prefix} dev eth0")
        lab_.run("gateway", "nft", "delete", "table", "inet", "relprobe", check=False)


# -- the token ------------------------------------------------------------------------------

def operations(doc: dict) -> list[tuple[str, str]]:
    ops = []
    for path, item in doc["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path))
    return ops


BAD_AUTH = [None, "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}",
            f"Bearer {TOKEN}x", f"Bearer {TOKEN.upper()}", f"Token {TOKEN}", TOKEN,
            f"Bearer  {TOKEN} extra", "Bearer " + "\u00e9" * 20]


def test_every_route_but_health_and_ready_needs_the_token(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        api = gw.http()
        r = api.get("/api/openapi.json")
        assert r.status == 200
        ops = operations(r.json)
        assert ("POST", "/api/service/exposure/add") in ops and len(ops) >= 7, ops
        assert api.add({"exposed_port": 8080, "service_ip": "10.30.0.1",
                        "service_port": 80}).status == 201
        before = gw.state()
        bodies = {"/api/service/exposure/add": {"exposed_port": 9000, "service_ip": "10.30.0.9",
                                                "service_port": 90},
                  "/api/service/exposure/delete": {"exposed_port": 8080}}
        checked = 0
        for method, path in ops:
            body = bodies.get(path)
            for header in BAD_AUTH:
                headers = {} if header is None else {"Authorization": header}
                r = gw.http().request(method, path, body, headers=headers, token=None)
                if path in ("/api/health", "/api/ready"):
                    assert r.status in (200, 503), (method, path, header, r)
                    continue
                assert r.status == 401, (method, path, header, r)
                assert r.json["error"] == "unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")
                checked += 1
        assert gw.state() == before, "a request without a valid token changed something"
        # Positive control: the same requests with the token do what they say.
        assert api.add(bodies["/api/service/exposure/add"]).status == 201
        assert api.delete(bodies["/api/service/exposure/delete"]).status == 200
        assert docs_set(api.list()) == {("ipv4", "tcp", 9000, "10.30.0.9", 90)}
        audit = [ln for ln in gw.log().splitlines() if "gw.audit" in ln]
        assert any("401" in ln for ln in audit), "refused changes are not audited"
        print(f"{checked} unauthenticated requests on {len(ops)} operations: all 401")


# -- DNAT targets ---------------------------------------------------------------------------

OUTSIDE = ["10.31.0.1", "10.29.255.255", "10.3.0.1", "0.0.0.0", "127.0.0.1", "169.254.0.1",
           "224.0.0.1", "255.255.255.255", "198.18.0.1", "8.8.8.8", "::ffff:10.30.0.1",
           "::10.30.0.1", "fe80::1", "::1", "::", "fdfe::1", "fe00::1", "2001:db8::1",
           "ff02::1", "10.30.0.1/16", "10.30.0.0/16", "fdff::1%eth0", "10.30.0.1.5", "010.30.0.1",
           "10.30.1", "0x0a1e0001", "167641089", "10.30.0.1 ; flush ruleset", "[10.30.0.1]x",
           "fdff::1]", "10.30.0.256"]


def test_no_api_input_puts_a_target_outside_the_service_ranges_into_the_maps(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        api = gw.http()
        good = {"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80}
        assert api.add(good).status == 201
        before = gw.state()
        for ip in OUTSIDE:
            single = {"exposed_port": 9001, "service_ip": ip, "service_port": 80}
            for body, field in ((single, "service_ip"),
                                ({"exposures": [dict(good, exposed_port=9002), single]},
                                 "exposures[1].service_ip")):
                r = api.add(body)
                assert r.status == 400 and r.json["field"] == field, (ip, r)
        # Oakestra's port notation goes through the same parser (gw.exposure).
        assert gw.state() == before
        # Normalised forms inside the ranges are fine, and stored in canonical form.
        assert api.add({"exposed_port": 9003, "service_ip": " [fdff:0::1] ",
                        "service_port": 80}).status == 201
        for _fam, _proto, _port, ip, _sport in gw.kernel():
            assert ipaddress.ip_address(ip).is_private and ip.startswith(("10.30.", "fdff:")), ip
        assert ("ipv6", "tcp", 9003, "fdff::1", 80) in gw.kernel_docs()


# -- no user string reaches nft ------------------------------------------------------------

MARK = "QZXmark"
HOSTILE = [f"80; flush ruleset # {MARK}", f"tcp }}; flush ruleset; {{ {MARK}",
           f"10.30.0.1 . 80 }} ; delete table inet oakestra_gw # {MARK}",
           f"udp\nflush ruleset\n{MARK}", f"$tunnel_if{MARK}", f"@expose_v4{MARK}",
           f"include \"/etc/{MARK}\"", f"10.30.0.1{MARK}", f"fdff::1 {MARK}", f"tcp{MARK}",
           f"ipv4{MARK}", f"\u202e{MARK}", f"{MARK}\x00"]


def test_no_user_string_reaches_nft_on_the_real_daemon(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        api = gw.http()
        monitor = gw.ns.popen("nft", "monitor", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        try:
            time.sleep(0.3)
            accepted = 0
            port = 20000
            for text in HOSTILE:
                for field in ("exposed_port", "service_ip", "service_port", "internal_port",
                              "protocol", "family", "service_id", text):
                    body = {"exposed_port": port, "service_ip": "10.30.0.1", "service_port": 80}
                    body[field] = text
                    for route, doc in (("add", body), ("add", {"exposures": [body]}),
                                       ("delete", {"exposed_port": port, field: text})):
                        r = api.post(f"/api/service/exposure/{route}", doc)
                        assert r.status < 500, r
                        if r.status in (200, 201):
                            # Only as a label (letters and digits are valid label text).
                            assert (route, field) == ("add", "service_id"), (route, field, text)
                            accepted += 1
                    port += 1
            # A label may be any of its allowed characters: it is stored, never nft syntax.
            label = f"web-{MARK}.v1"
            r = api.add({"exposed_port": 30000, "service_ip": "10.30.0.2", "service_port": 80,
                         "service_id": label})
            assert r.status == 201 and r.json["exposures"][0]["service_id"] == label
            assert api.delete({"exposed_port": 30000}).status == 200
            time.sleep(0.5)
        finally:
            monitor.terminate()
            out, _ = monitor.communicate(timeout=10)
        assert "tcp . 30000 : 10.30.0.2 . 80" in out, out[-2000:]
        assert MARK not in out, [ln for ln in out.splitlines() if MARK in ln]
        assert docs_set(api.list()) == gw.kernel_docs()
        assert all(MARK in d["service_id"] for d in api.list()) and accepted


# -- capabilities ---------------------------------------------------------------------------

def unit_directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_grants_cap_net_admin_and_nothing_else():
    d = unit_directives()
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert set(" ".join(d.get("AmbientCapabilities", [])).split()) <= {"CAP_NET_ADMIN"}
    assert d["NoNewPrivileges"] == ["yes"]
    assert "SecureBits" not in d or "keep-caps" not in " ".join(d["SecureBits"])
    text = UNIT.read_text()
    for cap in ("CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE",
                "CAP_NET_BIND_SERVICE", "CAP_SETUID"):
        assert cap not in " ".join(v for k, vs in d.items() for v in vs), cap
    assert "@privileged" in " ".join(d.get("SystemCallFilter", []))
    assert text.count("CapabilityBoundingSet=") == 1


CAP_NET_ADMIN_MASK = 1 << 12


def capabilities(pid: int) -> dict[str, int]:
    caps = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cap"):
            name, value = line.split(":")
            caps[name] = int(value, 16)
    return caps


def start_with_bounding_set(gw, caps: str):
    """The daemon as the unit starts it: root, whose bounding set is `caps` (setpriv)."""
    log = open(gw.log_path, "ab")
    gw.mark_log()
    try:
        gw.proc = gw.ns.popen("setpriv", f"--bounding-set=-all{caps}", "--inh-caps=-all",
                              *gw_command(), "serve", "--config", str(gw.config_path),
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    finally:
        log.close()


def test_the_daemon_does_its_job_with_cap_net_admin_alone(tmp_path):
    if subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs setpriv (util-linux)")
    with gateway(tmp_path / "gw") as gw:
        start_with_bounding_set(gw, ",+net_admin")
        gw.wait_serving()
        caps = capabilities(gw.proc.pid)
        assert caps["CapBnd"] == caps["CapEff"] == caps["CapPrm"] == CAP_NET_ADMIN_MASK, caps
        api = gw.http()
        # nftables (load at start, element transactions), netlink (the bridge), the store,
        # the conntrack flush after a delete, the drift watcher's `nft monitor`.
        assert gw.ns.run("ip", "-br", "addr", "show", "oakgw0").returncode == 0
        assert api.add({"exposed_port": 8080, "service_ip": "10.30.0.1",
                        "service_port": 80}).status == 201
        assert api.add({"exposed_port": 8081, "service_ip": "fdff::1",
                        "service_port": 80}).status == 201
        assert api.delete({"exposed_port": 8081}).status == 200
        assert docs_set(api.list()) == gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1",
                                                             80)}
        wait_for(lambda: "conntrack: removed" in gw.log(), what="the conntrack flush",
                 log=gw.log)
        gw.nft("delete", "table", "inet", "oakestra_gw")
        wait_for(lambda: gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80)},
                 what="the drift repair", log=gw.log)
        assert api.get("/api/ready").status == 200
        assert api.get("/metrics").status == 200
        kids = children(gw.proc.pid)
        monitors = [pid for pid in kids if cmdline(pid).startswith("nft monitor")]
        assert monitors, f"no `nft monitor` child to check: {[cmdline(p) for p in kids]}"
        for pid in monitors:
            assert capabilities(int(pid))["CapEff"] & ~CAP_NET_ADMIN_MASK == 0
        assert gw.stop() == 0
        log = gw.log()
        assert "Traceback" not in log and "could not remove entries" not in log, log

        # Without CAP_NET_ADMIN it cannot work, and says so: the one capability is needed.
        start_with_bounding_set(gw, "")
        assert gw.proc.wait(timeout=30) == 1
        line = [ln for ln in gw.log(since_start=True).splitlines()
                if ln.startswith("oakestra-gw: cannot start")]
        assert line and re.search(r"(?i)not permitted|permission", line[0]), gw.log()
