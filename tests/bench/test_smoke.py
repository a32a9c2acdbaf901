"""A tiny run of every benchmark: the machinery works and its numbers are sane. No timing
targets here (`make bench` measures those); seconds, not minutes."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tests.bench import burst, controlplane, dataplane, limit, portspace, report, udpfill
from tests.bench.exposures import BASELINE_TABLE, MEASURED_PORT, baseline_ruleset, exposures

pytestmark = [pytest.mark.bench]
TOOLS = [t for t in ("wrk", "nginx", "conntrack", "nft", "iperf3") if shutil.which(t) is None]
needs_tools = pytest.mark.skipif(bool(TOOLS), reason=f"missing tools: {', '.join(TOOLS)} "
                                                     "(make bench-deps)")


# -- pure parts ------------------------------------------------------------------------------

def test_exposure_sets_put_the_measured_port_last():
    items = exposures(1000)
    assert len(items) == 1000 and len({e.key for e in items}) == 1000
    assert items[-1].exposed_port == MEASURED_PORT
    assert all(e.exposed_port != 11022 for e in items)
    assert len(exposures(50000)) == 50000


def test_baseline_is_one_rule_per_exposure_measured_last():
    text = baseline_ruleset(exposures(100))
    rules = [line.strip() for line in text.splitlines() if " dnat ip to " in line]
    assert len(rules) == 100
    assert rules[-1] == f"tcp dport {MEASURED_PORT} dnat ip to 10.30.0.1:80"
    assert f"delete table {BASELINE_TABLE}" in text


def test_udpfill_makes_distinct_flows():
    ports, sources = [5353, 5354], ["198.18.0.2", "198.18.0.3"]
    flows = set()
    for datagram in udpfill.packets("198.18.0.1", ports, 5000, sources):
        src = datagram[12:16]
        sport, dport = struct.unpack("!HH", datagram[20:24])
        flows.add((src, sport, dport))
    assert len(flows) == 5000


def test_parse_wrk():
    out = ("Running 1s test @ http://198.18.0.1:8080/\n  2 threads and 32 connections\n"
           "  10234 requests in 1.00s, 1.2MB read\n"
           "  Socket errors: connect 0, read 3, write 0, timeout 1\n"
           "Requests/sec:  10201.55\nTransfer/sec:      1.21MB\n")
    assert dataplane.parse_wrk(out) == {"rate": 10201.55, "requests": 10234, "errors": 4}


def test_batches_fit_the_api_limits():
    docs = [{"exposed_port": p, "protocol": "tcp", "service_ip": "10.30.200.200",
             "service_port": 65535} for p in range(1, 20000)]
    batches = controlplane.batches_of(docs)
    assert sum(map(len, batches)) == len(docs)
    assert all(len(json.dumps({"exposures": b})) < 64 * 1024 for b in batches)


# -- the benchmarks, tiny --------------------------------------------------------------------

@needs_tools
@pytest.mark.kernel
@pytest.mark.slow
def test_dataplane_smoke():
    res = dataplane.run(sizes=(1, 300), reps=2, seconds=1, warmup=0, log=lambda *_: None)
    assert len(res["runs"]) == 2 * 2 * 2
    for variant in ("ours", "baseline"):
        for n in (1, 300):
            point = res["points"][variant][n]
            assert point["n"] == 2
            assert 50 < point["median"] < 1e6, (variant, n, point)
        assert res["ratios"][variant][1]["median"] == 1.0
        assert 0 < res["ratios"][variant][300]["median"] < 10
    assert res["errors"] <= 0.01 * sum(r["requests"] or 0 for r in res["runs"])
    assert all(l["ours_s"] > 0 and l["baseline_s"] > 0 for l in res["loads"])


@needs_tools
@pytest.mark.kernel
@pytest.mark.slow
def test_limit_smoke():
    """Ours against plain routing, tiny: every workload measured for both variants in both
    rounds; plain routing really bypassed conntrack (no table, so no entry), ours really went
    through it; the ratios only loosely bounded (a noisy, shared machine)."""
    res = limit.run(reps=2, seconds=1, tcp_bytes="200M", log=lambda *_: None)
    assert res["workloads"] == ["conn", "tcp", "udp"]
    for w in res["workloads"]:
        runs = [r for r in res["runs"] if r["workload"] == w]
        assert sorted((r["round"], r["variant"]) for r in runs) == \
            [(0, "ours"), (0, "routing"), (1, "ours"), (1, "routing")]
        assert all(r["value"] > 0 for r in runs), runs
        assert all(r["conntrack_after"] == 0 for r in runs if r["variant"] == "routing"), runs
        assert all(r["conntrack_after"] >= 1 for r in runs if r["variant"] == "ours"), runs
        ratio = res["ratios"][w]["ours"]
        assert ratio["n"] == 2 and 0.3 < ratio["median"] < 3, (w, ratio)
    tcp = [r for r in res["runs"] if r["workload"] == "tcp"]
    # What the receiver counted: the transfer, less what was in flight when it stopped counting.
    assert all(r["bytes"] >= 0.9 * 200 * 2**20 for r in tcp), tcp
    conn = [r for r in res["runs"] if r["workload"] == "conn"]
    assert res["errors"] <= 0.01 * sum(r["requests"] or 0 for r in conn)


@needs_tools
@pytest.mark.kernel
@pytest.mark.slow
def test_controlplane_smoke():
    res = controlplane.run(levels=(0, 300), pairs=10, warmup=2, flows=3000, cold_reps=2,
                           drift_reps=1, watch_s=0.5, settle=0.2,
                           log=lambda *_: None)
    assert res["conntrack"]["entries"] >= 3000
    for level in ("0", "300"):
        for op in ("add", "delete"):
            lat = res["latency"][level][op]
            assert lat["n"] == 10
            assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"] < 10_000
        assert res["latency"][level]["kernel_checks"] >= 1
    assert sum(b["size"] for b in res["batches"]) == 300
    for key in ("cold_start_0", "cold_start"):
        ready = res[key]["ready_s"]
        assert 0 < ready["median"] < 60
    assert res["drift"]["flush_to_flow_s"]["median"] > 0
    assert res["drift"]["by"] in (["watcher"], ["sighup"], ["sighup", "watcher"])
    flush = res["flush"]
    assert flush["delete_to_flushed_s"]["n"] == 1 and flush["delete_to_flushed_s"]["median"] > 0
    assert flush["flows_each"] == 300 and flush["promise_s"] == 1.0
    assert 5 < res["rss"]["0"]["rss_mib"] < 2000
    assert res["rss"]["300"]["rss_mib"] > 5


def test_report_from_results(tmp_path):
    pytest.importorskip("matplotlib")
    summary = lambda v: {"n": len(v), "median": sorted(v)[len(v) // 2], "min": min(v),
                         "max": max(v), "spread": 0.1, "values": v}
    lat = {"n": 3, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "max_ms": 4.0, "mean_ms": 1.5}
    results = {
        "machine": {"cpu": "test"}, "params": {"reps": 2}, "duration": "1 s",
        "dataplane": {"sizes": [1, 10], "errors": 0,
                      "points": {v: {"1": summary([100.0, 110.0]), "10": summary([90.0, 95.0])}
                                 for v in ("ours", "baseline")},
                      "ratios": {v: {"1": summary([1.0, 1.0]), "10": summary([0.9, 0.95])}
                                 for v in ("ours", "baseline")},
                      "ours_over_baseline": {"1": summary([1.0]), "10": summary([1.1])},
                      "load_times": {"1": {"ours_s": 0.01, "baseline_s": 0.02},
                                     "10": {"ours_s": 0.01, "baseline_s": 0.02}}},
        "controlplane": {"levels": [0, 10], "conntrack": {"entries": 100},
                         "latency": {"0": {"add": lat, "delete": lat},
                                     "10": {"add": lat, "delete": lat}},
                         "batches": [], "rss": {"0": {"rss_mib": 40.0, "hwm_mib": 41.0}},
                         "cold_start": {"exposures": 10, "ready_s": summary([0.5, 0.6])},
                         "drift": {"exposures": 10, "by": ["sighup"],
                                   "flush_to_flow_s": summary([1.0]),
                                   "sighup_to_flow_s": summary([0.2])}},
        "limit": {"workloads": ["conn", "tcp", "udp"], "variants": ["ours", "routing"],
                  "errors": 0, "units": {"conn": "conn/s", "tcp": "bit/s", "udp": "packets/s"},
                  "points": {"conn": {"ours": summary([900.0, 950.0]),
                                      "routing": summary([1000.0, 1000.0])},
                             "tcp": {"ours": summary([9e9, 9e9]), "routing": summary([1e10, 1e10])},
                             "udp": {"ours": summary([80.0, 85.0]),
                                     "routing": summary([100.0, 100.0])}},
                  "ratios": {"conn": {"ours": summary([0.9, 0.95])},
                             "tcp": {"ours": summary([0.9, 0.9])},
                             "udp": {"ours": summary([0.8, 0.85])}}},
    }
    page = tmp_path / "performance.md"
    written = report.write(results, page, tmp_path / "img")
    text = page.read_text()
    assert "| 10 | 95 (90-95)" in text
    assert "cold start to ready" in text and "![" in text
    assert (tmp_path / "img" / "bench-dataplane.png").stat().st_size > 1000
    assert (tmp_path / "img" / "bench-latency.png").stat().st_size > 1000
    assert (tmp_path / "img" / "bench-limit.png").stat().st_size > 1000
    assert len(written) == 4
    assert "| new TCP connections | 950 (900-950) conn/s | 1,000 (1,000-1,000) conn/s | " \
           "0.950 (0.900-0.950) | 2 |" in text
    assert "| one TCP transfer | 9.00 (9.00-9.00) Gbit/s |" in text
    assert "| UDP packets received: ours >= 0.9 x plain routing (median of per-round ratios) " \
           "| 0.850 | **no** |" in text
    figures = report.all_figures(results).splitlines()
    # One line per figure, each carrying the numbers it was given.
    assert len(figures) == 2 * 3 + 3 + 2 * 2 + 4, figures
    assert ("limit conn ours     : 950 conn/s, routing 1,000; ours/routing median 0.950 "
            "(0.900-0.950, n 2)") in figures
    assert any(f.startswith("dataplane ours") and "95 conn/s" in f and "ratio to 1: 0.950"
               in f for f in figures), figures
    assert "load              10: ours 10 ms, baseline 20 ms" in figures
    assert "add    at     10 stored: p50 1.00 ms, p99 3.00 ms, max 4.00 ms (n 3)" in figures
    assert "cold_start: median 0.600 s (min 0.500, max 0.600, n 2)" in figures
    assert ("drift (sighup): flush->flow median 1.000 s, sighup->flow median 0.200 s"
            in figures)
    assert "rss at 0: 40.0 MiB (peak 41.0)" in figures and figures[-1] == "conntrack entries: 100"


def test_port_space_is_every_exposable_key_once():
    items = portspace.port_space()
    keys = [e.key for e in items]
    assert len(set(keys)) == len(keys) == portspace.FULL
    assert items[0].exposed_port == MEASURED_PORT
    assert not any((e.exposed_port, e.protocol) in portspace.RESERVED for e in items)
    assert not any(str(e.service_ip).startswith("10.30.255.") for e in items)


@needs_tools
@pytest.mark.kernel
@pytest.mark.slow
def test_portspace_smoke():
    """The whole-port-space benchmark, small: each size started cold and again, reconciled in
    sync, measured; the rate through the measured exposure loosely bounded by ratio."""
    res = portspace.run(sizes=(1, 3000), reps=1, seconds=0.5, log=lambda *_: None)
    assert [p["exposures"] for p in res["points"]] == [1, 3000]
    for p in res["points"]:
        assert p["rate"] > 0 and p["cold_s"] > 0 and p["restart_s"] > 0, p
        assert p["rss_mib"] > 0 and p["hwm_mib"] >= p["rss_mib"], p
    assert 0.3 < res["by_size"]["3000"]["rate_ratio"]["median"] < 3
    assert "The whole port space" in portspace.section(res)


def test_burst_report_shows_both_settings_and_the_target():
    p = {"add_per_s": 800.0, "health_per_s": 1000.0, "ratio": 0.8, "requests_per_group": 9.5,
         "add": {"p50_ms": 20.0, "p99_ms": 40.0}}
    one = {**p, "add_per_s": 200.0, "ratio": 0.2, "requests_per_group": 1.0}
    res = {"clients": [4, 32], "seconds": 1, "threads": 64, "connection": "keep-alive",
           "by_group_commit": {"1": [one, one], "64": [p, p]}}
    text = burst.section(res)
    assert "| 32 | 1 | 200 | 1,000 | 0.20 |" in text and "| 32 | 64 | 800 | 1,000 | 0.80 |" in text
    assert burst.target_row(res).endswith("(group_commit 64) | 0.80 | yes |")
    assert len(burst.figures(res)) == 3


@needs_tools
@pytest.mark.kernel
@pytest.mark.slow
def test_burst_smoke():
    """The burst benchmark, tiny: both settings, every add acknowledged and in the kernel (the
    run checks it), rates loosely bounded by ratio; with group commit off every request is a
    group and an fdatasync of its own."""
    res = burst.run(clients=(1, 4), seconds=0.5, groups=(1, 64), threads=8,
                    log=lambda *_: None)
    for g in ("1", "64"):
        for p in res["by_group_commit"][g]:
            assert p["adds"] > 0 and p["kernel_checked"] == p["adds"], p
            assert 0 < p["ratio"] < 10, p
    for p in res["by_group_commit"]["1"]:
        assert p["groups"] == p["fdatasyncs"] == p["adds"], p


def test_burst_and_portspace_plots_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from tests.bench import burst, portspace
    s = lambda m: {"median": m, "min": m * 0.9, "max": m * 1.1}
    curve = [{"add_per_s": 100.0 * n, "health_per_s": 300.0 * n, "ratio": 1 / 3} for n in (1, 4)]
    space = {"sizes": [1, 1000], "by_size": {
        str(n): {"rate_ratio": s(1.0), "cold_s": s(0.5), "restart_s": s(0.6),
                 "reconcile_s": s(0.1)} for n in (1, 1000)}}
    written: list[str] = []
    burst.plot({"clients": [1, 4], "by_group_commit": {"1": curve, "64": curve}}, tmp_path,
               written)
    portspace.plot(space, tmp_path, written)
    assert written == [str(tmp_path / "bench-burst.png"), str(tmp_path / "bench-portspace.png")]
    assert all((tmp_path / name).stat().st_size > 1000
               for name in ("bench-burst.png", "bench-portspace.png"))
