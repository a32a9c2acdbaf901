"""`python -m tests.bench`: run the benchmarks, keep the results, regenerate the report.

Run it through `tests/run-isolated` (as `make bench` does), as root, from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import burst, controlplane, dataplane, limit, portspace, report

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "performance.md"
IMG = REPO / "docs" / "img"
RESULTS = IMG / "bench-results.json"
ANALYSIS = Path(__file__).with_name("analysis.md")
NICE = -10
BENCHMARKS = ("dataplane", "limit", "controlplane", "burst", "portspace")
NEEDS = {"wrk": "wrk", "nginx": "nginx-light", "conntrack": "conntrack", "nft": "nftables",
         "iperf3": "iperf3"}


def log(text: str) -> None:
    print(text, flush=True)


def _out(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() \
            or subprocess.run(cmd, capture_output=True, text=True, timeout=10).stderr.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    virt = ""
    for line in _out("lscpu").splitlines():
        if line.startswith("Hypervisor vendor:"):
            virt = f"{line.split(':', 1)[1].strip()} virtual machine"
    if not virt and "hypervisor" in Path("/proc/cpuinfo").read_text():
        virt = "virtual machine"
    os_name = "?"
    if Path("/etc/os-release").exists():
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    if Path("/etc/debian_version").exists():
        os_name += f" ({Path('/etc/debian_version').read_text().strip()})"
    fs = _out("findmnt", "-n", "-o", "FSTYPE", "--target", "/var/tmp")
    return {"cpu": cpu, "cores": os.cpu_count(), "virt": virt or "bare metal",
            "memory": f"{mem_kib / 1024 / 1024:.0f} GiB", "kernel": platform.release(),
            "os": os_name, "nft": _out("nft", "--version"),
            "python": platform.python_version(),
            "wrk": _out("wrk", "-v").splitlines()[0].split(" Copyright")[0] if shutil.which("wrk") else "?",
            "nginx": _out("nginx", "-v").replace("nginx version: ", ""),
            "store_fs": f"{fs} (/var/tmp)",
            "load_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "commit": _out("git", "-C", str(REPO), "describe", "--always", "--dirty")}


def check_tools() -> None:
    missing = [pkg for tool, pkg in NEEDS.items() if shutil.which(tool) is None]
    if missing:
        sys.exit(f"tests.bench: missing tools; apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        sys.exit("tests.bench: needs root (network namespaces, nftables)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    p.add_argument("--only", choices=BENCHMARKS, action="append",
                   help="run only this benchmark (repeatable; the other sections of the "
                        "page keep the figures of the results file); default: all")
    p.add_argument("--sizes", default="1,1000,10000,50000",
                   help="data plane: exposures per point (default %(default)s)")
    p.add_argument("--reps", type=int, default=9, help="data plane: rounds (default 9)")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="data plane: seconds per measurement (default 3)")
    p.add_argument("--limit-reps", type=int, default=7,
                   help="against the limit: rounds (default %(default)s)")
    p.add_argument("--limit-bytes", default="1G",
                   help="against the limit: size of the TCP transfer (default %(default)s)")
    p.add_argument("--levels", default="0,10000,50000",
                   help="control plane: exposures stored (default %(default)s)")
    p.add_argument("--pairs", type=int, default=500,
                   help="control plane: add+delete pairs per level (default 500)")
    p.add_argument("--flows", type=int, default=120000,
                   help="conntrack entries to create in the gateway (default 120000)")
    p.add_argument("--cold-reps", type=int, default=5)
    p.add_argument("--drift-reps", type=int, default=3)
    p.add_argument("--watch", type=float, default=5.0,
                   help="seconds to wait for the drift watcher before sending SIGHUP")
    p.add_argument("--burst-clients", default=",".join(map(str, burst.CLIENTS)),
                   help="burst: concurrent clients per point (default %(default)s)")
    p.add_argument("--burst-seconds", type=float, default=3.0,
                   help="burst: seconds of adds (and of health) per point (default 3)")
    p.add_argument("--burst-groups", default="1,64",
                   help="burst: the store.group_commit values compared (default %(default)s)")
    p.add_argument("--burst-threads", type=int, default=8,
                   help="burst: the API's worker threads (default %(default)s)")
    p.add_argument("--space-sizes", default=f"1,50000,{portspace.FULL}",
                   help="whole port space: exposures per point (default %(default)s)")
    p.add_argument("--space-reps", type=int, default=3,
                   help="whole port space: rounds (default %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true",
                   help="only regenerate the page and plots from --results")
    p.add_argument("--no-report", action="store_true",
                   help="do not touch docs/ (results are still written to a --results path "
                        "given explicitly)")
    args = p.parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so namespaces and processes are removed.
    signal.signal(signal.SIGTERM, _interrupt)

    if args.report_only:
        results = json.loads(args.results.read_text())
    else:
        check_tools()
        # The machines this runs on are shared: other jobs' processes compete for the two
        # cores. Everything the benchmark starts (wrk, nginx, the daemon and its children, the
        # HTTP client) inherits this priority, so other work disturbs the figures less.
        os.nice(NICE)
        only = set(args.only or BENCHMARKS)
        start = time.monotonic()
        results = {"machine": machine(),
                   "params": {"reps": args.reps, "seconds": args.seconds,
                              "wrk_threads": dataplane.WRK_THREADS,
                              "wrk_connections": dataplane.WRK_CONNECTIONS,
                              "pairs": args.pairs, "warmup": 20, "flows": args.flows,
                              "watch_s": args.watch, "nice": NICE, "settle_s": 3.0,
                              "limit_reps": args.limit_reps, "limit_bytes": args.limit_bytes}}
        if "dataplane" in only:
            log("data plane: new TCP connections per second")
            results["dataplane"] = dataplane.run(
                sizes=[int(x) for x in args.sizes.split(",")], reps=args.reps,
                seconds=args.seconds, log=log)
        if "limit" in only:
            log("data plane against the limit: ours versus plain routing")
            results["limit"] = limit.run(reps=args.limit_reps, seconds=args.seconds,
                                         tcp_bytes=args.limit_bytes, log=log)
        if "controlplane" in only:
            log("control plane, cold start, drift, memory (the daemon)")
            results["controlplane"] = controlplane.run(
                levels=[int(x) for x in args.levels.split(",")], pairs=args.pairs,
                flows=args.flows, cold_reps=args.cold_reps, drift_reps=args.drift_reps,
                watch_s=args.watch, log=log)
        if "burst" in only:
            log("burst: concurrent clients of single adds against health, by group commit")
            results["burst"] = burst.run(
                clients=[int(x) for x in args.burst_clients.split(",")],
                seconds=args.burst_seconds,
                groups=[int(x) for x in args.burst_groups.split(",")],
                threads=args.burst_threads, log=log)
        if "portspace" in only:
            log("the whole port space: start, reconcile, memory, rate")
            results["portspace"] = portspace.run(
                sizes=[int(x) for x in args.space_sizes.split(",")], reps=args.space_reps,
                seconds=args.seconds, log=log)
        if args.only and args.results.exists():
            # A partial run: the other benchmarks' figures stay, and the page says whose.
            kept = json.loads(args.results.read_text())
            fresh = sorted(only)
            results = {**kept, **{k: results[k] for k in fresh if k in results},
                       "partial": {"fresh": fresh, "machine": results["machine"]}}
        minutes, seconds = divmod(int(time.monotonic() - start), 60)
        results["duration"] = f"about {minutes} min {seconds} s"
        results["machine"]["load_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if not args.no_report or args.results != RESULTS:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1, default=str) + "\n")
    log("\n" + report.all_figures(results))
    if not args.no_report:
        analysis = ANALYSIS.read_text() if ANALYSIS.exists() else ""
        for path in report.write(results, PAGE, IMG, analysis):
            log(f"wrote {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
