"""Benchmark: our table against the physical limit, plain routing through the same gateway
namespace with no table of ours (no NAT, no filter chains, so no conntrack either).

The same client, worker and veths carry both variants; only the destination differs:

    ours     client -> 198.18.0.1:PORT, DNATed by our map to 10.30.0.1:PORT, SNATed to the
             gateway's internal address (our table loaded with the three measured exposures)
    routing  client -> 10.30.0.1:PORT, routed by the gateway (our table deleted; the worker
             routes the client's network back through the gateway)

Two more variants take the difference apart (`--variants`; not part of `make bench`):

    conntrack  as routing, with a table whose one forward rule makes the namespace track
               connections (conntrack, no NAT)
    nat        client -> 198.18.0.1:PORT through a minimal NAT table: the DNAT rules and the
               SNAT rule alone, none of our filter chains

Three workloads, each measured for every variant in every round, the order of the variants
rotating from round to round:

    conn  new TCP connections per second: wrk, `Connection: close`, nginx in the worker
    tcp   throughput of one TCP transfer of a fixed size (iperf3 -n), receiver's bits/s
    udp   UDP packets/s received by the worker (iperf3 -u, small datagrams, no rate limit)

The figure of each workload is the median over rounds of ours / routing within the round.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .dataplane import WRK_CONNECTIONS, WRK_THREADS, parse_wrk
from .exposures import IPERF_PORT, MEASURED_PORT
from .report import limit_figures
from .stats import summary
from .topology import (INTERNAL_IPV4, PUBLIC_IP, SERVICE_IP, SERVICE_PORT, TUNNEL_IF,
                       BenchLab, wait_for)

REPO = Path(__file__).resolve().parents[2]
UDP_LENGTH = 64          # bytes of UDP payload: the packet rate, not the byte rate, is measured
CLIENT_NET = "198.18.0.0/24"
TARGET = {"ours": PUBLIC_IP, "routing": SERVICE_IP, "conntrack": SERVICE_IP, "nat": PUBLIC_IP}
VARIANTS = ("ours", "routing")
# Through a DNAT (ours, nat) the client asks for the exposed port, else for the service's own.
PORT = {"conn": (MEASURED_PORT, SERVICE_PORT), "tcp": (IPERF_PORT, IPERF_PORT),
        "udp": (IPERF_PORT, IPERF_PORT)}
BENCH_TABLES = ("ip oakgw_bench_ct", "ip oakgw_bench_nat")
CONNTRACK_TABLE = """\
table ip oakgw_bench_ct {
  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
  }
}
"""
NAT_TABLE = f"""\
table ip oakgw_bench_nat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {PUBLIC_IP} tcp dport {MEASURED_PORT} dnat to {SERVICE_IP}:{SERVICE_PORT}
    ip daddr {PUBLIC_IP} meta l4proto {{ tcp, udp }} th dport {IPERF_PORT} dnat to {SERVICE_IP}:{IPERF_PORT}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat oifname "{TUNNEL_IF}" snat to {INTERNAL_IPV4}
  }}
}}
"""
UNIT = {"conn": "conn/s", "tcp": "bit/s", "udp": "packets/s"}
WORKLOADS = tuple(UNIT)


def load_ours(lab: BenchLab, skeleton: str | None = None) -> None:
    lab.gateway.run(sys.executable, "-m", "tests.bench.nsload", "limit",
                    *([skeleton] if skeleton else []), cwd=REPO, timeout=120)


def remove_tables(lab: BenchLab) -> None:
    lab.nft("-f", "-", input="".join(f"table {t}\ndelete table {t}\n" for t in
                                     ("inet oakestra_gw", *BENCH_TABLES)))


def prepare(lab: BenchLab, variant: str, skeletons: dict | None = None) -> None:
    """The gateway namespace holds exactly the variant's table (none for routing), with an
    empty conntrack table. `skeletons`: variant -> another skeleton file for our table."""
    remove_tables(lab)
    if variant in (skeletons or {}):
        load_ours(lab, skeletons[variant])
    elif variant == "ours":
        load_ours(lab)
    elif variant == "conntrack":
        lab.nft("-f", "-", input=CONNTRACK_TABLE)
    elif variant == "nat":
        lab.nft("-f", "-", input=NAT_TABLE)
    lab.conntrack_flush()


def routing_back(lab: BenchLab) -> None:
    """The worker reaches the client's network through the gateway (for the routing variant:
    ours SNATs to the internal address, which the worker reaches on its own link)."""
    lab.worker.run("ip", "route", "add", CLIENT_NET, "via", INTERNAL_IPV4, "dev", "tun0")
    lab.client.run("ip", "route", "add", "10.30.0.0/16", "via", PUBLIC_IP)


def tune(lab: BenchLab) -> None:
    """Per-namespace settings of the lab's own namespaces (as tests/bench/dataplane.py): finished
    connections must not pile up in the gateway's conntrack table or as TIME_WAIT sockets in the
    worker, or later measurements would be slower than earlier ones."""
    lab.gateway.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")
    lab.worker.run("sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0")


def start_iperf(lab: BenchLab) -> None:
    lab.spawn(lab.worker, "iperf3", "-s", "-B", SERVICE_IP, "-p", str(IPERF_PORT))
    wait_for(lambda: f":{IPERF_PORT}" in lab.worker.run("ss", "-Htln").stdout, 10,
             "iperf3 listening in the worker namespace")


def iperf(lab: BenchLab, args: list[str], timeout: float) -> dict:
    # iperf3's server takes one test at a time and may still be closing the last one: retry
    # "server is busy" briefly.
    for _ in range(50):
        res = lab.client.run("iperf3", "-J", *args, check=False, timeout=timeout)
        doc = json.loads(res.stdout or "{}")
        if "busy" not in doc.get("error", ""):
            break
        time.sleep(0.1)
    if doc.get("error") or res.returncode:
        raise RuntimeError(f"iperf3 {' '.join(args)}: {doc.get('error') or res.stderr}")
    return doc


def measure(lab: BenchLab, workload: str, variant: str, seconds: float, tcp_bytes: str) -> dict:
    ip = TARGET.get(variant, PUBLIC_IP)  # another skeleton of ours: our public address
    port = PORT[workload][ip != PUBLIC_IP]
    if workload == "conn":
        cmd = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{max(1, round(seconds))}s",
               "--timeout", "2s", "-H", "Connection: close", f"http://{ip}:{port}/"]
        res = parse_wrk(lab.client.run(*cmd, timeout=seconds + 30).stdout)
        return {"value": res["rate"], "errors": res["errors"], "requests": res["requests"]}
    if workload == "tcp":
        doc = iperf(lab, ["-c", ip, "-p", str(port), "-n", tcp_bytes], timeout=300)
        got = doc["end"]["sum_received"]
        return {"value": got["bits_per_second"], "bytes": got["bytes"],
                "seconds": got["seconds"], "errors": 0}
    doc = iperf(lab, ["-c", ip, "-p", str(port), "-u", "-b", "0", "-l", str(UDP_LENGTH),
                      "-t", str(max(1, round(seconds)))], timeout=seconds + 60)
    s = doc["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    return {"value": received / s["seconds"], "sent": s["packets"], "lost": s["lost_packets"],
            "errors": 0}


def conntrack_entries(lab: BenchLab) -> int:
    return lab.conntrack_count()


def run(reps: int = 7, seconds: float = 3.0, tcp_bytes: str = "1G",
        workloads=WORKLOADS, variants=VARIANTS, skeletons=None, log=print) -> dict:
    """Returns {"runs": [...], "points": {workload: {variant: summary}},
    "ratios": {workload: {variant: summary of variant / routing, paired by round}}}."""
    workloads, variants = list(workloads), list(variants)
    runs: list[dict] = []
    with BenchLab() as lab:
        lab.start_nginx()
        start_iperf(lab)
        routing_back(lab)
        tune(lab)
        for r in range(reps):
            for w in workloads:
                shift = (r + workloads.index(w)) % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    prepare(lab, variant, skeletons)
                    time.sleep(0.2)
                    res = measure(lab, w, variant, seconds, tcp_bytes)
                    # Plain routing must not have touched conntrack: without our table no
                    # hook of the gateway namespace needs it.
                    res["conntrack_after"] = conntrack_entries(lab)
                    res.update(round=r, workload=w, variant=variant)
                    runs.append(res)
                    log(f"  round {r + 1}/{reps}  {w:<4} {variant:<9} "
                        f"{res['value']:>14,.0f} {UNIT[w]}")
        remove_tables(lab)
    return analyse(runs, workloads, variants)


def analyse(runs: list[dict], workloads: list[str], variants: list[str]) -> dict:
    points, ratios = {}, {}
    for w in workloads:
        by = {v: {r["round"]: r["value"] for r in runs if r["workload"] == w
                  and r["variant"] == v} for v in variants}
        points[w] = {v: summary(list(by[v].values())) for v in variants}
        ratios[w] = {v: summary([by[v][k] / by["routing"][k] for k in by[v]
                                 if by["routing"].get(k)]) for v in variants if v != "routing"}
    return {"workloads": workloads, "variants": variants, "runs": runs, "points": points,
            "ratios": ratios,
            "units": {w: UNIT[w] for w in workloads},
            "errors": sum(r["errors"] for r in runs)}


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m tests.bench.limit")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--bytes", default="1G")
    p.add_argument("--only", action="append", choices=WORKLOADS)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, routing among them (default %(default)s; also "
                        "conntrack, nat)")
    p.add_argument("--skeleton", action="append", default=[], metavar="NAME=FILE",
                   help="one more variant: our table from another skeleton file")
    args = p.parse_args(argv)
    skeletons = dict(s.split("=", 1) for s in args.skeleton)
    variants = args.variants.split(",") + list(skeletons)
    if "routing" not in variants or not set(variants) <= set(TARGET) | set(skeletons):
        p.error(f"--variants: routing and any of {', '.join(TARGET)}")
    res = run(reps=args.reps, seconds=args.seconds, tcp_bytes=args.bytes,
              workloads=args.only or WORKLOADS, variants=variants, skeletons=skeletons)
    print("\n".join(limit_figures(res)))


if __name__ == "__main__":
    main()
