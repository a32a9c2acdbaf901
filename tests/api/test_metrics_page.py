"""/metrics against a real daemon (waitress, nftables in its own namespace): no label value
comes from a client, and the page is what Prometheus and promtool expect."""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from gw import __version__
from tests.api.harness import running
from tests.helpers import wait_for

pytestmark = pytest.mark.kernel

JUNK_REQUESTS = 2000     # of each kind: junk methods, junk paths, both
PER_CONNECTION = 250     # pipelined on one keep-alive connection
# What junk may add at most: one series per fixed method ("other" included) of the
# "unmatched" route and its statuses, with the latency histogram's buckets. Far below one
# series per request (thousands), which is what a label taken from the client gives.
MAX_NEW_SERIES = 60
MAX_PAGE_BYTES = 128 * 1024


def series(page: str) -> list[str]:
    return [line for line in page.splitlines() if line and not line.startswith("#")]


def pipelined(api, requests: list[bytes]) -> bytes:
    """Send `requests` on one connection (the last one closes it); everything answered."""
    sock = api.connect()
    try:
        requests[-1] = requests[-1].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        sock.sendall(b"".join(requests))
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def junk(kind: str, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        method = f"X{secrets.token_hex(12).upper()}" if kind in ("method", "both") else "GET"
        path = f"/junk/{i}/{secrets.token_hex(8)}" if kind in ("path", "both") else "/api/health"
        out.append(f"{method} {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    return out


def test_junk_methods_and_paths_leave_series_and_page_bounded(gw, api):
    api.get("/api/health")
    before = api.get("/metrics").body.decode()
    answered = 0
    for kind in ("method", "path", "both"):
        requests = junk(kind, JUNK_REQUESTS)
        for start in range(0, len(requests), PER_CONNECTION):
            batch = requests[start:start + PER_CONNECTION]
            answers = pipelined(api, batch)
            statuses = re.findall(rb"^HTTP/1\.1 (\d{3}) ", answers, re.M)
            assert len(statuses) == len(batch), answers[-500:]
            assert set(statuses) <= {b"404", b"405", b"501"}, set(statuses)
            answered += len(statuses)
    assert answered == 3 * JUNK_REQUESTS

    r = api.get("/metrics")
    assert r.status == 200
    after = r.body.decode()
    grown = len(series(after)) - len(series(before))
    print(f"series {len(series(before))} -> {len(series(after))} (+{grown}) after {answered} "
          f"junk requests; page {len(before)} -> {len(after)} bytes")
    assert grown <= MAX_NEW_SERIES, grown
    assert len(r.body) <= MAX_PAGE_BYTES, len(r.body)
    assert "/junk/" not in after
    labels = set(re.findall(r'method="([^"]*)"', after))
    assert labels <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}, labels
    assert "other" in labels
    routes = set(re.findall(r'route="([^"]*)"', after))
    assert routes <= {rule for rule in ROUTES} | {"unmatched"}, routes
    # The junk is still counted, under the fixed values.
    other = re.findall(r'^oakestra_gw_api_requests_total\{method="other",route="unmatched",'
                       r'status="\d+"\} ([0-9.e+]+)$', after, re.M)
    assert sum(float(v) for v in other) >= 2 * JUNK_REQUESTS


ROUTES = ("/api/service/exposure/add", "/api/service/exposure/delete", "/api/service/exposure",
          "/api/health", "/api/ready", "/metrics", "/api/openapi.json")


# -- what Prometheus' own tool says ----------------------------------------------------------

def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (make bench-deps installs Debian's prometheus)")
    return subprocess.run([found, *args], input=stdin, capture_output=True, timeout=60)


def test_promtool_check_metrics_passes_on_a_real_scrape(tmp_path):
    with running(tmp_path / "gw", config={"api": {"per_exposure_metrics": True}}) as gw:
        api = gw.http()
        for body in ({"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80},
                     {"exposed_port": 5353, "service_ip": "10.30.0.2", "service_port": 53,
                      "protocol": "udp"},
                     {"exposed_port": 8443, "service_ip": "fdff::1", "service_port": 443}):
            assert api.add(body).status == 201
        assert api.add({"exposed_port": 8080, "service_ip": "10.30.0.9",
                        "service_port": 80}).status == 409
        assert api.request("BREW", "/coffee").status == 404
        page = api.get("/metrics")
        assert page.status == 200
        text = page.body.decode()
        # The page has what the check is about: our families, the standard ones, readiness.
        for name in ("oakestra_gw_exposures", "oakestra_gw_build_info", "oakestra_gw_ready 1.0",
                     'oakestra_gw_problems{cause="tunnel"} 0.0', "process_cpu_seconds_total",
                     "process_resident_memory_bytes", "python_info",
                     "oakestra_gw_exposure_new_connections_total"):
            assert name in text, name
        assert f'oakestra_gw_build_info{{version="{__version__}"}} 1.0' in text
        proc = promtool("check", "metrics", stdin=page.body)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
        assert proc.stdout + proc.stderr == b"", (proc.stdout + proc.stderr).decode()


def test_promtool_check_rules_passes_on_the_shipped_alerts():
    proc = promtool("check", "rules", str(ALERTS))
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    names = re.findall(r"^\s*- alert: (\S+)", ALERTS.read_text(), re.M)
    assert f"SUCCESS: {len(names)} rules found" in out, out
    assert {"OakestraGwTunnelDown", "OakestraGwDriftRepaired", "OakestraGwStoreFault",
            "OakestraGwConntrackNearlyFull"} <= set(names), names
    # Every metric a rule names exists on a real page (a typo would never fire).
    source = "".join(p.read_text() for p in (ROOT / "gw" / "daemon").glob("*.py"))
    known = set(re.findall(r'"(oakestra_gw_[a-z_]+)"', source))
    used = set(re.findall(r"\b(oakestra_gw_[a-z_]+)", ALERTS.read_text()))
    assert used, ALERTS
    for name in used:
        assert name in known or name.removesuffix("_total") in known, name


ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"


# -- readiness as metrics, cause by cause --------------------------------------------------

def problems_of(page: str) -> dict[str, int]:
    return {cause: int(float(v)) for cause, v in
            re.findall(r'^oakestra_gw_problems\{cause="([^"]+)"\} (\S+)$', page, re.M)}


def ready_of(page: str) -> int:
    return int(float(re.search(r"^oakestra_gw_ready (\S+)$", page, re.M)[1]))


def assert_matches_ready(api) -> set[str]:
    """/metrics says what /api/ready says: the same causes, nothing more, nothing less."""
    ready = api.get("/api/ready")
    page = api.get("/metrics").body.decode()
    causes = {key.split(" ")[0] for key in (ready.json.get("reasons") or {})}
    flags = problems_of(page)
    assert {c for c, v in flags.items() if v} == causes, (flags, ready.json)
    assert ready_of(page) == (1 if ready.status == 200 else 0), ready
    return causes


def test_readiness_metrics_match_api_ready_cause_by_cause(gw, api):
    assert assert_matches_ready(api) == set()
    flags = problems_of(api.get("/metrics").body.decode())
    assert {"tunnel", "route", "forwarding_ipv4", "forwarding_ipv6", "drift", "firewall",
            "store"} <= set(flags), flags  # present while all is well, so alerts can fire
    try:
        gw.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
        assert assert_matches_ready(api) == {"forwarding_ipv4"}
        gw.ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
        assert assert_matches_ready(api) == {"forwarding_ipv4", "forwarding_ipv6"}
        gw.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        gw.ns.run("ip", "link", "set", "goProxyTun", "down")
        assert assert_matches_ready(api) == {"tunnel", "route"}
    finally:
        gw.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        gw.ns.run("ip", "link", "set", "goProxyTun", "up")
        gw.ns.run("ip", "route", "replace", "10.30.0.0/16", "dev", "goProxyTun")
        gw.ns.run("ip", "-6", "route", "replace", "fdff::/16", "dev", "goProxyTun")
    assert assert_matches_ready(api) == set()
    gw.nft("delete", "table", "inet", "oakestra_gw")  # no drift watcher here: stays gone
    try:
        assert api.add({"exposed_port": 8081, "service_ip": "10.30.0.1",
                        "service_port": 80}).status == 503
        assert assert_matches_ready(api) == {"firewall"}
    finally:
        gw.send(signal.SIGHUP)  # the reconcile restores the table
        wait_for(lambda: api.get("/api/ready").status == 200, what="ready again", log=gw.log)
    assert assert_matches_ready(api) == set()
