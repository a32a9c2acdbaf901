"""Benchmark 5: the whole port space. Every port that is not reserved, TCP and UDP, IPv4 and
IPv6 (262,134 exposures), against fewer: the daemon's cold start, its restart with the table in
place, a full reconcile (SIGHUP: list the kernel's maps, compare, repair nothing), its RSS, and
new TCP connections/s through the measured exposure.

The store is written beforehand with the store's own code (LocalStore, a batch per commit),
once per size, and copied into the daemon's state directory before each start: what a gateway
finds after a reboot. Every exposure points at another service IP (none shared: the most
memory; a few share one where 10.30.0.0/16 runs out), but the measured one (8080/tcp -> the worker's nginx). Sizes are visited forward,
then backward, round by round.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import time
from pathlib import Path

from gw.core.exposure import Exposure
from gw.store.local import LocalStore

from . import plotting
from .controlplane import API_PORT, BenchDaemon, drop_table
from .dataplane import wrk
from .exposures import MEASURED_PORT, measured_exposure
from .stats import median, summary
from .topology import PUBLIC_IP, BenchLab

RESERVED = {(22, "tcp"), (50103, "udp"), (API_PORT, "tcp")}
FAMILIES_PROTOCOLS = (("ipv4", "tcp"), ("ipv4", "udp"), ("ipv6", "tcp"), ("ipv6", "udp"))


def port_space() -> list[Exposure]:
    """Every exposable (family, protocol, port): the measured exposure first, so that every
    prefix of the list holds it."""
    measured = measured_exposure()
    out = [measured]
    for family, protocol in FAMILIES_PROTOCOLS:
        for port in range(1, 65536):
            if (port, protocol) in RESERVED or (family, protocol, port) == measured.key:
                continue
            if family == "ipv4":
                # 10.30.255.0/24 holds the gateway's own internal addresses.
                ip = ipaddress.IPv4Address("10.30.0.0") + 1 + port % (254 * 256 - 1)
            else:
                ip = ipaddress.IPv6Address(f"fdff::{1 + (protocol == 'udp')}:{port:x}")
            out.append(Exposure(port, protocol, ip, 80, f"svc-{port % 4096}"))
    return out


FULL = len(port_space())


def write_store(path: Path, items: list[Exposure]) -> None:
    with LocalStore(path, fsync=False) as store:
        for start in range(0, len(items), 1000):
            store.commit(put=items[start:start + 1000])
    # Closing compacted it: a snapshot and no journal, as after a clean stop.


def reconcile_s(daemon: BenchDaemon, timeout: float = 300) -> float:
    """SIGHUP with the same configuration: the daemon lists the kernel, compares it with the
    store and finds it in sync. Seconds from the signal to its log line."""
    daemon.mark_log()
    start = time.perf_counter()
    daemon.send(signal.SIGHUP)
    log = daemon.wait_log("reconcile: ", timeout=timeout)
    elapsed = time.perf_counter() - start
    if "reconcile: kernel in sync" not in log:
        raise RuntimeError(f"the reconcile repaired something: {daemon.log_tail()}")
    return elapsed


def run(sizes=(1, 50000, FULL), reps: int = 3, seconds: float = 3.0, settle: float = 1.0,
        log=print) -> dict:
    sizes = sorted(sizes)
    items = port_space()
    points: list[dict] = []
    with BenchLab(bridge=False) as lab:
        lab.start_nginx()
        stores = lab.tmp / "stores"
        for n in sizes:
            write_store(stores / str(n) / "exposures.json", items[:n])
        daemon = BenchDaemon(lab)
        state = lab.tmp / "state"
        try:
            for r in range(reps):
                for n in sizes if r % 2 == 0 else list(reversed(sizes)):
                    if daemon.proc is not None and daemon.proc.poll() is None:
                        daemon.stop()
                    shutil.rmtree(state, ignore_errors=True)
                    shutil.copytree(stores / str(n), state)
                    drop_table(lab)
                    p = {"round": r, "exposures": n}
                    p["cold_s"] = daemon.start_timed(timeout=300)["ready_s"]
                    time.sleep(settle)
                    p.update(daemon.rss())
                    lab.conntrack_flush()
                    p["rate"] = wrk(lab, PUBLIC_IP, seconds)["rate"]
                    p["reconcile_s"] = reconcile_s(daemon)
                    daemon.stop()
                    p["restart_s"] = daemon.start_timed(timeout=300)["ready_s"]
                    points.append(p)
                    log(f"    {n:>7} exposures: cold start {p['cold_s']:.2f} s, restart "
                        f"{p['restart_s']:.2f} s, reconcile {p['reconcile_s']:.2f} s, RSS "
                        f"{p['rss_mib']:.0f} MiB (peak {p['hwm_mib']:.0f}), "
                        f"{p['rate']:,.0f} conn/s")
        finally:
            if daemon.proc is not None:
                daemon.stop()
    return summarize(sizes, points)


def summarize(sizes: list[int], points: list[dict]) -> dict:
    """Summaries by size; the rate as a ratio to the smallest size's rate of the same round."""
    out: dict = {"sizes": sizes, "points": points, "by_size": {}}
    first = {p["round"]: p["rate"] for p in points if p["exposures"] == sizes[0]}
    for n in sizes:
        mine = [p for p in points if p["exposures"] == n]
        out["by_size"][str(n)] = {
            name: summary(p[name] for p in mine)
            for name in ("cold_s", "restart_s", "reconcile_s", "rss_mib", "hwm_mib", "rate")}
        out["by_size"][str(n)]["rate_ratio"] = summary(p["rate"] / first[p["round"]]
                                                       for p in mine if first.get(p["round"]))
    return out


def per_exposure_kib(result: dict) -> float:
    """The daemon's RSS per exposure between the smallest and the largest size."""
    small, big = result["sizes"][0], result["sizes"][-1]
    by = result["by_size"]
    grown = median([by[str(big)]["rss_mib"]["median"]]) - by[str(small)]["rss_mib"]["median"]
    return grown * 1024 / (big - small)


TARGETS = {"rate_ratio": 0.95, "cold_s": 2.0, "reconcile_s": 2.0, "rss_mib": 128}


def section(result: dict) -> str:
    """docs/performance.md: the table of this benchmark's figures and its targets."""
    by, big = result["by_size"], result["sizes"][-1]
    out = ["## The whole port space", "",
           f"Every exposable port, TCP and UDP, IPv4 and IPv6: {big:,} exposures, against fewer "
           "(tests/bench/portspace.py). Median of "
           f"{by[str(big)]['cold_s']['n']} rounds (min-max).", "",
           "![rate, start and reconcile against exposures](img/bench-portspace.png)", "",
           "| exposures | cold start to ready | restart, table in place | full reconcile | "
           "RSS (peak) | new TCP connections/s | rate / rate at the smallest |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in result["sizes"]:
        s = by[str(n)]
        out.append(f"| {n:,} | {_mm(s['cold_s'], 's')} | {_mm(s['restart_s'], 's')} | "
                   f"{_mm(s['reconcile_s'], 's')} | {s['rss_mib']['median']:.0f} MiB "
                   f"({s['hwm_mib']['median']:.0f}) | {s['rate']['median']:,.0f} | "
                   f"{_mm(s['rate_ratio'], '', 3)} |")
    s = by[str(big)]
    out += ["", f"RSS per exposure: {per_exposure_kib(result):.2f} KiB.", "",
            "| target at the whole port space | measured | met |", "|---|---:|:---:|"]
    for name, text, higher in (("rate_ratio", "data plane rate >= 0.95 of its rate with 1", True),
                               ("cold_s", "cold start to ready <= 2 s", False),
                               ("reconcile_s", "full reconcile <= 2 s", False),
                               ("rss_mib", "daemon RSS <= 128 MiB", False)):
        value = s[name]["median"]
        ok = value >= TARGETS[name] if higher else value <= TARGETS[name]
        out.append(f"| {text} | {value:.3g} | {'yes' if ok else '**no**'} |")
    return "\n".join(out) + "\n"


def _mm(s: dict, unit: str, digits: int = 2) -> str:
    return (f"{s['median']:.{digits}f}{' ' + unit if unit else ''} "
            f"({s['min']:.{digits}f}-{s['max']:.{digits}f})")


def plot(result: dict, img: Path, written: list) -> None:
    plt = plotting.pyplot()

    sizes, by = result["sizes"], result["by_size"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    rate = [by[str(n)]["rate_ratio"] for n in sizes]
    med = [r["median"] for r in rate]
    ax.errorbar(sizes, med, yerr=[[m - r["min"] for m, r in zip(med, rate)],
                                  [r["max"] - m for m, r in zip(med, rate)]],
                fmt="o-", capsize=4, label="ours")
    ax.axhline(TARGETS["rate_ratio"], color="grey", lw=0.8, ls=":", label="target 0.95")
    ax.set_ylim(0, 1.3)
    ax.set_ylabel(f"conn/s / conn/s at {sizes[0]:,}, same round")
    ax.set_title("Rate vs exposures")
    for name, label in (("cold_s", "cold start"), ("restart_s", "restart, table in place"),
                        ("reconcile_s", "full reconcile")):
        ax2.plot(sizes, [by[str(n)][name]["median"] for n in sizes], "o-", label=label)
    ax2.axhline(2.0, color="grey", lw=0.8, ls=":", label="target 2 s")
    ax2.set_ylabel("seconds (median)")
    ax2.set_title("Start and reconcile")
    plotting.style((ax, ax2), "exposures stored")
    plotting.save(fig, img / "bench-portspace.png", written)
