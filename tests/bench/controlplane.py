"""Benchmarks 2-4: the daemon (`oakestra-gw serve`) in the lab's gateway namespace.

2. Latency of POST /api/service/exposure/add and /delete over HTTP (one keep-alive client,
   requests back to back, each an add of a new port then its delete), with 0, 10,000 and
   50,000 exposures stored and >= 100,000 entries in the gateway's conntrack table.
3. Cold start: process start -> /api/ready 200, with 0 and 50,000 exposures stored and our
   table absent from the kernel.
4. Drift repair: `nft flush ruleset` in the gateway namespace -> a new TCP connection through
   the measured exposure succeeds again, at 50,000 exposures; and the daemon's RSS.

The store lives on a disk filesystem (/var/tmp), so its fsyncs are real.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from gw.lab.daemon import GatewayDaemon
from gw.lab.http import KeepAliveHttp, NetnsHttp, in_netns

from .exposures import MEASURED_PORT, as_docs, exposures, measured_exposure
from .stats import latency_summary, median, summary
from .topology import (CLIENT_IP, EXTRA_SOURCES, INTERNAL_IPV4, INTERNAL_IPV6, PUBLIC_IP,
                       SERVICE_IP, BenchLab, wait_for)

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("out")   # git-ignored
API_PORT = 11022
UDP_PORTS = [5353, 5354, 5355, 5356]   # the exposures the conntrack filler sends through
FLUSH_PORTS = range(5400, 5450)        # exposures deleted by the conntrack flush benchmark
# The numbered promises of the design, compared with what was measured.
FLUSH_PROMISE_S, DRIFT_PROMISE_S = 1.0, 2.0
PROBE_PORTS = range(9000, 9990)        # exposures added and deleted by the latency benchmark
BATCH = 10000                          # the API's limit of exposures per batch
MAX_BODY = 60 * 1024                   # under the API's 64 KiB request limit

# -- the API client ------------------------------------------------------------------------

def api_of(lab: BenchLab, timeout: float = 60) -> KeepAliveHttp:
    """A keep-alive client of the daemon, its socket in the gateway namespace."""
    return KeepAliveHttp("127.0.0.1", API_PORT, timeout=timeout, ns_name=lab.gateway.name)


def get_status(lab: BenchLab, path: str, timeout: float = 1.0) -> int | None:
    """One GET on a fresh connection; None when nothing answers (not listening yet)."""
    try:
        client = NetnsHttp(lab.gateway.name, "127.0.0.1", API_PORT, timeout=timeout)
        return client.get(path).status
    except (OSError, http.client.HTTPException):
        return None


# -- the daemon ------------------------------------------------------------------------------

class BenchDaemon(GatewayDaemon):
    """The daemon in the bench lab's gateway namespace, its state in the lab's directory, timed
    from process start to /api/ready."""

    def __init__(self, lab: BenchLab):
        self.lab = lab
        super().__init__(lab.gateway, lab.tmp, {
            "api": {"host": "127.0.0.1", "port": API_PORT},
            "store": {"path": str(lab.tmp / "state" / "exposures.json")},
            "network": {"tunnel_interface": "goProxyTun", "bridge_interface": "oakgw0",
                        "internal_ipv4": INTERNAL_IPV4, "internal_ipv6": INTERNAL_IPV6}},
            cwd=REPO)

    def start_timed(self, timeout: float = 60, wrap: list[str] | None = None) -> dict:
        """Start and wait for /api/ready 200. Returns seconds to health and to ready, measured
        from just before the process is created."""
        t0 = time.perf_counter()
        self.start(wait=False, wrap=wrap)
        t_health = None
        deadline = t0 + timeout
        while True:  # bounded by the deadline
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            status = get_status(self.lab, "/api/ready", timeout=5)
            now = time.perf_counter()
            if status is not None and t_health is None:
                t_health = now - t0
            if status == 200:
                return {"health_s": t_health, "ready_s": now - t0}
            if now > deadline:
                raise TimeoutError(f"/api/ready not 200 after {timeout} s: {self.log_tail()}")
            time.sleep(0.005)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> dict:
        """VmRSS and VmHWM (peak) of the daemon, in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
        return {"rss_mib": fields.get("VmRSS"), "hwm_mib": fields.get("VmHWM")}


# -- the phases ------------------------------------------------------------------------------

def drop_table(lab: BenchLab) -> None:
    lab.nft("-f", "-", input="table inet oakestra_gw\ndelete table inet oakestra_gw\n")


def cold_start(lab: BenchLab, daemon: BenchDaemon, reps: int, log) -> dict:
    """Stop, remove our table, start, time to ready. Returns summaries."""
    health, ready = [], []
    for i in range(reps):
        daemon.stop()
        drop_table(lab)
        t = daemon.start_timed()
        health.append(t["health_s"])
        ready.append(t["ready_s"])
        log(f"    cold start {i + 1}/{reps}: health {t['health_s']:.3f} s, "
            f"ready {t['ready_s']:.3f} s")
    return {"health_s": summary(health), "ready_s": summary(ready)}


def fill_conntrack(lab: BenchLab, api: KeepAliveHttp, flows: int, log) -> dict:
    status, body, _ = api.timed("POST", "/api/service/exposure/add", {"exposures": [
        {"exposed_port": p, "protocol": "udp", "service_ip": SERVICE_IP, "service_port": p - 5300}
        for p in UDP_PORTS]})
    if status not in (200, 201):
        raise RuntimeError(f"adding the UDP exposures: {status} {body}")
    # Per-namespace sysctl of the gateway namespace: unreplied UDP entries live an hour.
    lab.gateway.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=3600")
    # The worker drops the datagrams silently (no ICMP back): its own namespace's table.
    lab.worker.run("nft", "-f", "-", input=(
        "table ip oakgw_bench_worker {\n chain input {\n"
        "  type filter hook input priority 0; policy accept;\n"
        "  udp dport 53-56 drop\n }\n}\n"))
    out = lab.client.run(sys.executable, "-m", "tests.bench.udpfill", PUBLIC_IP,
                         ",".join(map(str, UDP_PORTS)), str(flows), CLIENT_IP, *EXTRA_SOURCES,
                         cwd=REPO, timeout=300).stdout
    sent = json.loads(out.strip().splitlines()[-1])
    count = wait_for(lambda: (c := lab.conntrack_count()) >= flows * 0.98 and c, 10,
                     f"{flows} conntrack entries in the gateway namespace")
    log(f"    conntrack: {count} entries ({sent['sent']} datagrams in {sent['seconds']:.1f} s)")
    return {"entries": count, "fill_s": sent["seconds"]}


def batches_of(docs: list[dict]) -> list[list[dict]]:
    """Consecutive batches of at most BATCH documents whose JSON body fits MAX_BODY."""
    out, current, size = [], [], 20
    for doc in docs:
        n = len(json.dumps(doc)) + 2
        if current and (size + n > MAX_BODY or len(current) >= BATCH):
            out.append(current)
            current, size = [], 20
        current.append(doc)
        size += n
    if current:
        out.append(current)
    return out


def populate(lab: BenchLab, api: KeepAliveHttp, target: int, have: int, log) -> list[dict]:
    """Add filler exposures through the API, in the largest batches the API's request size
    limit lets through, until `target` are stored."""
    batches = []
    start = time.perf_counter()
    fillers = exposures(target, measured=False)
    for chunk in batches_of(as_docs(fillers[have:target])):
        status, body, seconds = api.timed("POST", "/api/service/exposure/add", {"exposures": chunk})
        if status != 201:
            raise RuntimeError(f"batch add: {status} {body}")
        batches.append({"size": len(chunk), "stored_before": have, "seconds": seconds})
        have += len(chunk)
    if batches:
        sizes = sorted({b["size"] for b in batches})
        log(f"    stored {have}: {len(batches)} batch adds of {sizes[0]}-{sizes[-1]} in "
            f"{time.perf_counter() - start:.1f} s (median "
            f"{median(b['seconds'] for b in batches) * 1000:.0f} ms per batch)")
    return batches


def in_kernel(lab: BenchLab, port: int) -> bool:
    return lab.gateway.run("nft", "get", "element", "inet", "oakestra_gw", "expose_v4",
                           f"{{ tcp . {port} }}", check=False).returncode == 0


def metric(api: KeepAliveHttp, name: str) -> float:
    """The sum of a Prometheus metric's samples on /metrics (0 when absent)."""
    try:
        status, body, _ = api.timed("GET", "/metrics")
    except (OSError, http.client.HTTPException):
        return math.nan
    text = body.get("raw", "") if isinstance(body, dict) else ""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.split()[0].split("{")[0]
            if head == name:
                total += float(line.rsplit(None, 1)[-1])
    return total


def scrape(api: KeepAliveHttp) -> str:
    try:
        status, body, _ = api.timed("GET", "/metrics")
    except (OSError, http.client.HTTPException):
        return ""
    return body.get("raw", "") if isinstance(body, dict) else ""


def histogram(text: str, name: str, **labels: str) -> dict:
    """A Prometheus histogram's cumulative buckets (by upper bound), count and sum, for the
    series whose labels include `labels`."""
    out: dict = {"buckets": {}, "count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        if not line.startswith(name + "_"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if "=" in p)
        pairs = {k: v.strip('"') for k, v in pairs.items()}
        if any(pairs.get(k) != v for k, v in labels.items()):
            continue
        if metric == name + "_bucket":
            le = pairs["le"]
            out["buckets"][le] = out["buckets"].get(le, 0.0) + float(value)
        elif metric == name + "_count":
            out["count"] += float(value)
        elif metric == name + "_sum":
            out["sum"] += float(value)
    return out


def over(before: dict, after: dict, seconds: str) -> dict:
    """Between two scrapes: observations, how many took longer than `seconds` (a bucket
    bound, e.g. "0.005"), and their mean in ms."""
    n = after["count"] - before["count"]
    below = after["buckets"].get(seconds, 0.0) - before["buckets"].get(seconds, 0.0)
    return {"n": n, f"over_{float(seconds) * 1000:g}ms": n - below,
            "mean_ms": (after["sum"] - before["sum"]) / n * 1000 if n else math.nan}


def server_side(before: str, after: str) -> dict:
    """What the daemon's own metrics saw between two scrapes: time inside the API handlers
    and inside nftables transactions."""
    out = {}
    for key, name, labels in (
            ("api_add", "oakestra_gw_api_request_duration_seconds",
             {"route": "/api/service/exposure/add", "method": "POST"}),
            ("api_delete", "oakestra_gw_api_request_duration_seconds",
             {"route": "/api/service/exposure/delete", "method": "POST"}),
            ("nft_change", "oakestra_gw_firewall_transaction_duration_seconds", {"kind": "change"})):
        b, a = histogram(before, name, **labels), histogram(after, name, **labels)
        out[key] = {**over(b, a, "0.005"), **{k: v for k, v in over(b, a, "0.01").items()
                                               if k.startswith("over")}}
    return out


def slow_traces(text: str) -> dict:
    """The daemon's traces of slow requests (gw.service.trace) in a stretch of its log: how
    many, and for each phase how many of them it dominated and its total ms across them."""
    out: dict = {"n": 0, "dominant": {}, "total_ms": {}}
    for line in text.splitlines():
        _, found, rest = line.partition("slow request: ")
        if not found or ": " not in rest:
            continue
        parts = [p.rsplit(" ", 1) for p in rest.split(": ", 1)[1].split(", ")]
        ms = {name: float(v) for name, v in parts if v.replace(".", "", 1).isdigit()}
        if not ms:
            continue
        out["n"] += 1
        top = max(ms, key=ms.get)
        out["dominant"][top] = out["dominant"].get(top, 0) + 1
        for name, v in ms.items():
            out["total_ms"][name] = round(out["total_ms"].get(name, 0.0) + v, 2)
    return out


def latency(lab: BenchLab, api: KeepAliveHttp, pairs: int, warmup: int, log,
            max_seconds: float = 300, daemon: BenchDaemon | None = None) -> dict:
    """`pairs` add+delete of fresh ports, each followed by a `GET /api/health` (the control),
    back to back (at most `max_seconds`), each request on a new connection as curl and most
    cluster clients send them; the client runs inside the gateway namespace. Checks a sample
    of acknowledged changes against the kernel (outside the timing). With `daemon`, the
    daemon's traces of its slow requests in that stretch are summed up by phase."""
    repairs_before = metric(api, "oakestra_gw_drift_repairs_total")
    log_start = daemon.log_path.stat().st_size if daemon is not None else 0
    scraped = scrape(api)
    fresh = KeepAliveHttp("127.0.0.1", API_PORT, timeout=60, fresh=True)
    adds, deletes, health, checked = in_netns(lab.gateway.name, _pairs, lab, fresh, pairs,
                                              warmup, max_seconds, log)
    result = {"add": latency_summary(adds), "delete": latency_summary(deletes),
              "health": latency_summary(health), "kernel_checks": checked,
              "drift_repairs": metric(api, "oakestra_gw_drift_repairs_total") - repairs_before,
              "server": server_side(scraped or "", scrape(api)),
              "connection": "new per request"}
    if daemon is not None:
        with open(daemon.log_path, "rb") as f:
            f.seek(log_start)
            result["slow_traces"] = slow_traces(f.read().decode(errors="replace"))
    for op, client in (("add", adds), ("delete", deletes), ("health", health)):
        result[op]["over_5ms"] = sum(t > 0.005 for t in client)
        result[op]["over_10ms"] = sum(t > 0.01 for t in client)
    hp99 = result["health"]["p99_ms"]
    result["ratio_add_p99"] = result["add"]["p99_ms"] / hp99 if hp99 else math.nan
    result["ratio_delete_p99"] = result["delete"]["p99_ms"] / hp99 if hp99 else math.nan
    srv = result["server"]
    log(f"    > 5 ms: client saw add {result['add']['over_5ms']}, delete "
        f"{result['delete']['over_5ms']}, health {result['health']['over_5ms']}; inside the "
        f"handlers add {srv['api_add'].get('over_5ms', 0):g}, delete "
        f"{srv['api_delete'].get('over_5ms', 0):g}; nft transactions "
        f"{srv['nft_change'].get('over_5ms', 0):g} of {srv['nft_change']['n']:g} "
        f"(mean {srv['nft_change']['mean_ms']:.2f} ms)")
    if result.get("slow_traces", {}).get("n"):
        log(f"    slow traces (>= 5 ms in the daemon): {result['slow_traces']}")
    if result["drift_repairs"]:
        log(f"    the daemon ran {result['drift_repairs']:g} drift repairs meanwhile")
    for op in ("add", "delete", "health"):
        r = result[op]
        log(f"    {op:<6} p50 {r['p50_ms']:.2f}  p99 {r['p99_ms']:.2f}  max {r['max_ms']:.2f} ms"
            + (" (the control)" if op == "health" else ""))
    log(f"    p99 / health p99: add {result['ratio_add_p99']:.2f}, delete "
        f"{result['ratio_delete_p99']:.2f}")
    return result


def _pairs(lab: BenchLab, api: KeepAliveHttp, pairs: int, warmup: int, max_seconds: float,
           log) -> tuple[list, list, list, int]:
    """The loop of `latency`, on a thread inside the gateway namespace (no namespace switch
    per connection)."""
    adds, deletes, health = [], [], []
    checked = 0
    ports = list(PROBE_PORTS)
    deadline = time.monotonic() + max_seconds
    for i in range(warmup + pairs):
        if time.monotonic() > deadline:
            log(f"    stopped after {max_seconds:g} s: {len(adds)} of {pairs} pairs done")
            break
        port = ports[i % len(ports)]
        doc = {"exposed_port": port, "service_ip": "10.30.9.9", "service_port": 80}
        status, body, t_add = api.timed("POST", "/api/service/exposure/add", doc)
        if status != 201:
            raise RuntimeError(f"add {port}: {status} {body}")
        if i % 50 == 0:
            if not in_kernel(lab, port):
                raise RuntimeError(f"add {port} acknowledged but not in the kernel")
            checked += 1
        status, body, t_del = api.timed("POST", "/api/service/exposure/delete",
                                       {"exposed_port": port, "family": "ipv4"})
        if status != 200:
            raise RuntimeError(f"delete {port}: {status} {body}")
        if i % 50 == 1:
            if in_kernel(lab, port):
                raise RuntimeError(f"delete {port} acknowledged but still in the kernel")
            checked += 1
        # The control: a request that does nothing (no store, no kernel) on the same path,
        # a new connection too. Its tail is what this machine adds to any request then.
        status, _, t_health = api.timed("GET", "/api/health")
        if i >= warmup:
            adds.append(t_add)
            deletes.append(t_del)
            health.append(t_health)
    return adds, deletes, health, checked


def connects(lab: BenchLab, timeout: float = 0.05) -> bool:
    """A new TCP connection from the client through the measured exposure completes."""
    sock = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((PUBLIC_IP, MEASURED_PORT))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def wait_flowing(lab: BenchLab, deadline: float) -> float | None:
    """perf_counter() of the first successful connect before `deadline`, else None."""
    while time.perf_counter() < deadline:
        if connects(lab):
            return time.perf_counter()
        time.sleep(0.002)
    return None


def flows_to(lab: BenchLab, port: int) -> int:
    """The gateway's conntrack entries of UDP flows to `port` (the conntrack tool's count)."""
    out = lab.gateway.run("conntrack", "-L", "-p", "udp", "--orig-port-dst", str(port),
                          check=False).stdout
    return len(out.splitlines())


def conntrack_flush(lab: BenchLab, api: KeepAliveHttp, reps: int, flows_each: int, log) -> dict:
    """The promise: a deleted exposure's conntrack entries are gone within 1 s of the answer
    (the flusher runs at idle priority). Per run: an exposure with `flows_each` UDP flows, among
    everything else in the table, deleted; the time from the API's answer until the conntrack
    tool lists none of them (the resolution is one listing, measured as poll_s)."""
    runs, polls = [], []
    for port in FLUSH_PORTS[:reps]:
        status, body, _ = api.timed("POST", "/api/service/exposure/add", {
            "exposed_port": port, "protocol": "udp", "service_ip": SERVICE_IP,
            "service_port": 53})  # the worker drops port 53 silently: the flows stay open
        if status != 201:
            raise RuntimeError(f"adding the flush exposure: {status} {body}")
        lab.client.run(sys.executable, "-m", "tests.bench.udpfill", PUBLIC_IP, str(port),
                       str(flows_each), CLIENT_IP, cwd=REPO, timeout=300)
        wait_for(lambda: flows_to(lab, port) >= flows_each * 0.98, 30,
                 f"{flows_each} flows to {port}")
        status, body, _ = api.timed("POST", "/api/service/exposure/delete",
                                   {"exposed_port": port, "protocol": "udp"})
        answered = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"deleting the flush exposure: {status} {body}")
        while True:  # bounded below
            t0 = time.perf_counter()
            left = flows_to(lab, port)
            polls.append(time.perf_counter() - t0)
            if not left:
                break
            if t0 - answered > 60:
                raise RuntimeError(f"{left} flows to {port} still there after 60 s")
        runs.append(time.perf_counter() - answered)
    result = {"flows_each": flows_each, "delete_to_flushed_s": summary(runs),
              "poll_s": median(polls), "promise_s": FLUSH_PROMISE_S}
    log(f"    flush: median {result['delete_to_flushed_s']['median']:.3f} s "
        f"(max {result['delete_to_flushed_s']['max']:.3f} s) for {flows_each} flows")
    return result


def drift(lab: BenchLab, daemon: BenchDaemon, reps: int, watch_s: float, log) -> dict:
    """`nft flush ruleset` in the gateway namespace, then time until traffic flows again. If
    nothing repairs it within `watch_s` (no drift watcher), send SIGHUP (reload and
    reconcile) and time from there too."""
    if not connects(lab, timeout=1):
        raise RuntimeError("the measured exposure does not carry traffic before the flush")
    runs = []
    for i in range(reps):
        lab.nft("flush", "ruleset")
        t_flush = time.perf_counter()
        if connects(lab, timeout=0.2):
            raise RuntimeError("traffic still flows right after `nft flush ruleset`")
        t_ok = wait_flowing(lab, t_flush + watch_s)
        if t_ok is not None:
            run = {"by": "watcher", "flush_to_flow_s": t_ok - t_flush}
        else:
            t_hup = time.perf_counter()
            os.kill(daemon.pid, signal.SIGHUP)
            t_ok = wait_flowing(lab, t_hup + 60)
            if t_ok is None:
                raise RuntimeError("traffic did not flow again within 60 s of SIGHUP")
            run = {"by": "sighup", "flush_to_flow_s": t_ok - t_flush,
                   "sighup_to_flow_s": t_ok - t_hup}
        runs.append(run)
        log(f"    drift {i + 1}/{reps}: repaired by {run['by']}, "
            + ", ".join(f"{k} {v:.3f}" for k, v in run.items() if k != "by"))
        # Let the reconcile finish before the next round (ready again).
        wait_for(lambda: get_status(lab, "/api/ready", timeout=5) == 200, 60, "ready")
    by = sorted({r["by"] for r in runs})
    out = {"by": by, "runs": runs, "promise_s": DRIFT_PROMISE_S,
           "flush_to_flow_s": summary([r["flush_to_flow_s"] for r in runs])}
    if "sighup" in by:
        out["sighup_to_flow_s"] = summary([r["sighup_to_flow_s"] for r in runs
                                           if "sighup_to_flow_s" in r])
    return out


def run(levels=(0, 10000, 50000), pairs: int = 500, warmup: int = 20, flows: int = 120000,
        cold_reps: int = 5, drift_reps: int = 3, watch_s: float = 5.0, settle: float = 3.0,
        log=print) -> dict:
    levels = sorted(levels)
    result: dict = {"levels": levels, "latency": {}, "batches": [], "rss": {}}
    with BenchLab(bridge=False) as lab:  # the daemon sets up its bridge itself
        lab.start_nginx()
        daemon = BenchDaemon(lab)
        api = api_of(lab)
        try:
            log("  cold start, empty store")
            daemon.start_timed()
            result["cold_start_0"] = cold_start(lab, daemon, max(1, cold_reps // 2), log)
            time.sleep(0.5)
            result["rss"]["0"] = daemon.rss()
            status, body, _ = api.timed("POST", "/api/service/exposure/add",
                                       measured_exposure().to_dict())
            if status != 201:
                raise RuntimeError(f"adding the measured exposure: {status} {body}")
            result["conntrack"] = fill_conntrack(lab, api, flows, log)
            stored = 0
            for level in levels:
                added = populate(lab, api, level, stored, log)
                result["batches"] += added
                stored = max(stored, level)
                if added:
                    time.sleep(settle)  # background work of the bulk add (compaction) ends
                log(f"  latency with {level} exposures stored "
                    f"(+{1 + len(UDP_PORTS)} measured/UDP), "
                    f"{lab.conntrack_count()} conntrack entries")
                result["latency"][str(level)] = latency(lab, api, pairs, warmup, log,
                                                       daemon=daemon)
                result["latency"][str(level)]["conntrack_entries"] = lab.conntrack_count()
            top = levels[-1]
            log(f"  conntrack flush after a delete, {top} exposures stored, "
                f"{lab.conntrack_count()} conntrack entries")
            result["flush"] = conntrack_flush(lab, api, drift_reps, min(flows // 10, 5000), log)
            api.close()
            log(f"  drift repair with {top} exposures")
            result["drift"] = drift(lab, daemon, drift_reps, watch_s, log)
            result["drift"]["exposures"] = top
            log(f"  cold start, {top} exposures stored, our table removed")
            result["cold_start"] = cold_start(lab, daemon, cold_reps, log)
            result["cold_start"]["exposures"] = top
            time.sleep(0.5)
            result["rss"][str(top)] = daemon.rss()
            log(f"  RSS: {result['rss']}")
            result["flusher_backlog_note"] = daemon.log_tail(400)
        finally:
            api.close()
            daemon.stop()
            keep_logs(lab)
    result.pop("flusher_backlog_note", None)
    return result


def keep_logs(lab: BenchLab) -> None:
    """The daemon's log, for a look after the run: tests/bench/out/daemon.log."""
    OUT.mkdir(exist_ok=True)
    if (lab.tmp / "daemon.log").exists():
        shutil.copy(lab.tmp / "daemon.log", OUT / "daemon.log")
