"""Where the CPU goes while tests/bench/limit.py measures: a system-wide `perf record` (cpu-clock,
both cores) during one measurement of each variant, the samples sorted into classes.

    tests/run-isolated .venv/bin/python -m tests.bench.limitprofile [--workload conn] [--seconds 4]

Prints, per variant, the share of all samples in each class (netfilter: conntrack, NAT,
nftables and the flowtable; the rest of the kernel; user space by program; idle) and the
top netfilter symbols. The machine is shared: other jobs' samples land in "other programs".
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
import time
from pathlib import Path

from . import limit
from .stats import median
from .topology import BenchLab

IDLE = re.compile(r"safe_halt|default_idle|cpu_idle|poll_idle|intel_idle|acpi_idle")
NETFILTER = re.compile(r"^(__)?(nf_|nft_|nf_conntrack|nf_nat|ipv4_conntrack|ipv6_conntrack|"
                       r"nf_flow|flow_offload|tcp_in_window|tcp_packet|hash_conntrack|"
                       r"__nf_|nf_hook|ct_|nat_|iptable|ipt_|xt_|conntrack|ipv4_nf|"
                       r"nf_ct|nft_do_chain|nf_confirm|get_unique_tuple|masquerade)")
PROGRAMS = ("wrk", "nginx", "iperf3")


def classify(comm: str, dso: str, sym: str) -> str:
    if IDLE.search(sym):
        return "idle"
    if dso == "[kernel.kallsyms]" or sym.startswith("[k]"):
        # Only the measured programs' and softirq's time is ours: other jobs on the machine
        # run nft too.
        if not (comm in PROGRAMS or comm.startswith("ksoftirqd") or comm == "swapper"):
            return "kernel: other programs"
        if NETFILTER.match(sym.removeprefix("[k] ").strip()):
            return "kernel: netfilter"
        return "kernel: network stack and syscalls"
    if comm in PROGRAMS:
        return f"user: {comm}"
    return "user: other programs"


def report(data: Path) -> tuple[dict, dict]:
    """CPU nanoseconds (cpu-clock periods) by class and by kernel symbol."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                          "--sort", "comm,dso,sym", "-F", "period,comm,dso,sym",
                          "--field-separator", "\t"],
                         capture_output=True, text=True, timeout=300).stdout
    classes: collections.Counter = collections.Counter()
    symbols: collections.Counter = collections.Counter()
    for line in out.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        period, comm, dso, sym = int(parts[0]), parts[1].strip(), parts[2].strip(), parts[3]
        cls = classify(comm, dso, sym.strip())
        classes[cls] += period
        if cls.startswith("kernel: n"):
            symbols[sym.strip().removeprefix("[k] ").strip()] += period
    return dict(classes), dict(symbols)


def profile(lab: BenchLab, workload: str, variant: str, seconds: float, tcp_bytes: str,
            tmp: Path, skeletons: dict | None = None) -> dict:
    """One measurement under perf: CPU nanoseconds per unit of the workload (a connection,
    a packet, a bit) by class and by kernel symbol."""
    data = tmp / f"{workload}-{variant}.data"
    limit.prepare(lab, variant, skeletons)
    # perf samples both cores, whatever their namespace; it runs in the host's.
    perf = subprocess.Popen(["perf", "record", "-a", "-e", "cpu-clock", "-o", str(data), "--",
                             "sleep", str(seconds)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf is recording before the load starts
    result = limit.measure(lab, workload, variant, seconds - 0.6, tcp_bytes)
    perf.wait(timeout=seconds + 60)
    classes, symbols = report(data)
    units = result["value"] * result.get("seconds", seconds - 0.6)
    return {"value": result["value"], "units": units,
            "classes": {k: v / units for k, v in classes.items()},
            "symbols": {k: v / units for k, v in symbols.items()}}


def _medians(dicts: list[dict]) -> dict:
    return {k: median(d.get(k, 0.0) for d in dicts) for k in {k for d in dicts for k in d}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.limitprofile")
    p.add_argument("--workload", choices=limit.WORKLOADS, default="conn")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--bytes", default="1G")
    p.add_argument("--symbols", type=int, default=15)
    p.add_argument("--variants", default="ours,routing")
    p.add_argument("--skeleton", action="append", default=[], metavar="NAME=FILE",
                   help="one more variant: our table from another skeleton file")
    p.add_argument("--repeat", type=int, default=1, help="profile each variant this often "
                   "(in turn) and report the median of each figure")
    args = p.parse_args(argv)
    skeletons = dict(s.split("=", 1) for s in args.skeleton)
    variants = args.variants.split(",") + list(skeletons)
    unit = limit.UNIT[args.workload].split("/")[0]
    with tempfile.TemporaryDirectory(prefix="oakgw-perf-", dir="/var/tmp") as tmp, \
            BenchLab() as lab:
        lab.start_nginx()
        limit.start_iperf(lab)
        limit.routing_back(lab)
        limit.tune(lab)
        runs = [{v: profile(lab, args.workload, v, args.seconds, args.bytes, Path(tmp),
                            skeletons) for v in variants} for _ in range(args.repeat)]
        res = {v: {"value": median(r[v]["value"] for r in runs),
                   "classes": _medians([r[v]["classes"] for r in runs]),
                   "symbols": _medians([r[v]["symbols"] for r in runs])} for v in variants}
        limit.remove_tables(lab)
    print(f"CPU ns per {unit} ({args.workload}), by class:")
    print(f"{'':40}" + "".join(f"{v:>12}" for v in variants))
    print(f"{'rate (' + limit.UNIT[args.workload] + ')':40}"
          + "".join(f"{res[v]['value']:>12,.0f}" for v in variants))
    for cls in sorted({c for r in res.values() for c in r["classes"]}):
        print(f"{cls:40}" + "".join(f"{res[v]['classes'].get(cls, 0):>12,.1f}" for v in variants))
    first, last = variants[0], variants[-1]
    grew = sorted({s for r in res.values() for s in r["symbols"]},
                  key=lambda s: res[last]["symbols"].get(s, 0) - res[first]["symbols"].get(s, 0))
    print(f"\nkernel symbols with the most CPU ns per {unit} more in {first} than in {last}:")
    for sym in grew[:args.symbols]:
        print(f"{sym:40}" + "".join(f"{res[v]['symbols'].get(sym, 0):>12,.1f}" for v in variants))


if __name__ == "__main__":
    main()
