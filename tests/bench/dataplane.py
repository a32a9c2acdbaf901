"""Benchmark 1: new TCP connections per second through the gateway, ours versus one nft rule per
exposure, with N exposures installed.

wrk in the client namespace sends `Connection: close` requests, so every request is a new TCP
connection whose SYN goes through the gateway's NAT hooks (later packets of a flow only hit
conntrack). nginx in the worker namespace answers them. Both tables are loaded at the same
time: connections to PUBLIC_IP are DNATed by our map, those to BASELINE_IP by the linear chain
(see exposures.baseline_ruleset), so ours and the baseline alternate run by run with no reload
between them. Rounds visit every N (forward, then backward, to cancel slow drift), reloading
both tables for each N, and alternate which variant runs first.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from .exposures import MEASURED_PORT, baseline_ruleset, exposures, remove_baseline
from .stats import median, summary
from .topology import BASELINE_IP, PUBLIC_IP, BenchLab

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {"ours": PUBLIC_IP, "baseline": BASELINE_IP}
WRK_THREADS = 2
WRK_CONNECTIONS = 32


def load_ours(lab: BenchLab, n: int) -> float:
    out = lab.gateway.run(sys.executable, "-m", "tests.bench.nsload", str(n), cwd=REPO,
                          timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])["load_s"]


def load_baseline(lab: BenchLab, n: int) -> float:
    path = lab.tmp / f"baseline-{n}.nft"
    if not path.exists():
        path.write_text(baseline_ruleset(exposures(n)))
    start = time.perf_counter()
    lab.nft("-f", str(path))
    return time.perf_counter() - start


def wrk(lab: BenchLab, ip: str, seconds: float, threads: int = WRK_THREADS,
        connections: int = WRK_CONNECTIONS) -> dict:
    """One wrk run; connections per second = completed requests per second."""
    # wrk takes whole seconds only.
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
           "--timeout", "2s", "-H", "Connection: close", f"http://{ip}:{MEASURED_PORT}/"]
    out = lab.client.run(*cmd, timeout=seconds + 30).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict:
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    errors = 0
    if sock := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                         out):
        errors += sum(int(x) for x in sock.groups())
    if non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(non2xx[1])
    return {"rate": float(m[1]), "requests": int(total[1]) if total else None, "errors": errors}


def run(sizes=(1, 1000, 10000, 50000), reps: int = 5, seconds: float = 3.0,
        warmup: float = 1.0, log=print) -> dict:
    """Returns {"sizes", "runs": [...], "points": {variant: {n: summary}}, "ratios": ...}."""
    sizes = sorted(sizes)
    runs: list[dict] = []
    loads: list[dict] = []
    with BenchLab() as lab:
        lab.start_nginx()
        # Per-namespace: TIME_WAIT entries of finished runs must not pile up in the gateway.
        lab.gateway.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")
        # Per-namespace: nginx closes each connection first; TIME_WAIT sockets piling up in the
        # worker would slow later measurements (SYNs meeting them) more than earlier ones.
        lab.worker.run("sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0")
        for r in range(reps):
            order = sizes if r % 2 == 0 else list(reversed(sizes))
            for i, n in enumerate(order):
                ours_s = load_ours(lab, n)
                base_s = load_baseline(lab, n)
                loads.append({"round": r, "exposures": n, "ours_s": ours_s, "baseline_s": base_s})
                if r == 0 and i == 0 and warmup:
                    for ip in VARIANTS.values():
                        wrk(lab, ip, warmup)
                # Which variant goes first flips from round to round for every size.
                first_ours = (r + sizes.index(n)) % 2 == 0
                variants = list(VARIANTS) if first_ours else list(reversed(VARIANTS))
                for variant in variants:
                    lab.conntrack_flush()
                    time.sleep(0.2)
                    res = wrk(lab, VARIANTS[variant], seconds)
                    res.update(round=r, exposures=n, variant=variant)
                    runs.append(res)
                    log(f"  round {r + 1}/{reps}  {n:>6} exposures  {variant:<8} "
                        f"{res['rate']:>9.0f} conn/s  (errors {res['errors']})")
        lab.nft("-f", "-", input=remove_baseline())
    return analyse(sizes, runs, loads)


def analyse(sizes, runs, loads) -> dict:
    points: dict[str, dict[int, dict]] = {}
    ratios: dict[str, dict[int, dict]] = {}
    rounds = sorted({r["round"] for r in runs})
    smallest = sizes[0]
    for variant in VARIANTS:
        by_n = {n: [r["rate"] for r in runs if r["variant"] == variant and r["exposures"] == n]
                for n in sizes}
        points[variant] = {n: summary(v) for n, v in by_n.items()}
        # Paired within a round: rate at N / rate at the smallest N of the same round.
        rate = {(r["round"], r["exposures"]): r["rate"] for r in runs if r["variant"] == variant}
        ratios[variant] = {}
        for n in sizes:
            paired = [rate[(k, n)] / rate[(k, smallest)] for k in rounds
                      if (k, n) in rate and rate.get((k, smallest))]
            ratios[variant][n] = summary(paired)
            ratios[variant][n]["of_medians"] = (points[variant][n]["median"] /
                                                points[variant][smallest]["median"])
    # Ours versus the baseline at each N, paired by round.
    versus = {}
    for n in sizes:
        o = {r["round"]: r["rate"] for r in runs if r["variant"] == "ours" and r["exposures"] == n}
        b = {r["round"]: r["rate"] for r in runs
             if r["variant"] == "baseline" and r["exposures"] == n}
        versus[n] = summary([o[k] / b[k] for k in o if b.get(k)])
    load_times = {n: {"ours_s": median(l["ours_s"] for l in loads if l["exposures"] == n),
                      "baseline_s": median(l["baseline_s"] for l in loads if l["exposures"] == n)}
                  for n in sizes}
    return {"sizes": sizes, "runs": runs, "loads": loads, "points": points, "ratios": ratios,
            "ours_over_baseline": versus, "load_times": load_times,
            "errors": sum(r["errors"] for r in runs)}
