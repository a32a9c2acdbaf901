"""Prometheus metrics of one gateway process, in a registry of its own (never the global one).

What a scrape costs: counting the stored exposures by family and protocol and two small procfs
reads (conntrack count/max and its per-CPU statistics). Never a listing of the nftables maps.
The opt-in per-exposure connection counter is kept up to date by a background thread reading
conntrack's NEW events; a scrape only copies its counts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, disable_created_metrics)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..core import readiness
from ..core.ha_events import ROLES
from ..core.exposure import Exposure
from ..kernel import conntrack
from .connections import ConnectionCounter

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
CONNTRACK_STAT = Path("/proc/net/stat/nf_conntrack")
DROP_COLUMNS = ("drop", "early_drop", "insert_failed")
# Label values never come from a client: any other method is "other", a path that matches no
# route is "unmatched" (routes are their templates), a status is the code we answered.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
UNMATCHED = "unmatched"
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def read_conntrack_drops(path: Path = CONNTRACK_STAT) -> dict[str, int]:
    """Sum of the per-CPU ``drop``, ``early_drop`` and ``insert_failed`` columns (hex) of
    /proc/net/stat/nf_conntrack (this network namespace's counters); {} when unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    if not lines:
        return {}
    header = lines[0].split()
    totals = {name: 0 for name in DROP_COLUMNS if name in header}
    for line in lines[1:]:
        values = line.split()
        if len(values) != len(header):
            continue
        for name in totals:
            try:
                totals[name] += int(values[header.index(name)], 16)
            except ValueError:
                pass
    return totals


class _StateCollector:
    """Values read at scrape time: all cheap."""

    def __init__(self, metrics: "Metrics"):
        self._m = metrics

    def describe(self):
        return []

    def collect(self):
        m = self._m
        if m.gateway is not None:
            exposures = GaugeMetricFamily("oakestra_gw_exposures", "Stored exposures by family and "
                                          "protocol", labels=["family", "protocol"])
            counts = m.gateway.counts()
            for family in ("ipv4", "ipv6"):
                for protocol in ("tcp", "udp"):
                    exposures.add_metric([family, protocol], counts.get((family, protocol), 0))
            yield exposures
            syncs = getattr(m.gateway.store, "syncs", None)
            if syncs is not None:
                yield CounterMetricFamily("oakestra_gw_store_syncs", "fdatasyncs of the store's "
                                          "journal (one per commit, a commit per group of "
                                          "changes)", value=syncs)
        found = m.ready() if m.ready is not None else (
            m.gateway.health.snapshot() if m.gateway is not None else None)
        if found is not None:
            yield GaugeMetricFamily("oakestra_gw_ready", "1 when /api/ready answers 200, else 0",
                                    value=0 if found else 1)
            problems = GaugeMetricFamily("oakestra_gw_problems", "Why the gateway is not ready, "
                                         "by cause as /api/ready names it: 1 while present",
                                         labels=["cause"])
            for cause, present in sorted(readiness.by_cause(found).items()):
                problems.add_metric([cause], present)
            yield problems
        yield GaugeMetricFamily("oakestra_gw_restart_needed", "Configuration keys changed "
                                "since the start that only a restart applies (0: none; the keys "
                                "are in /api/ready and `oakestra-gw status`)",
                                value=len(m.restart_needed))
        yield GaugeMetricFamily("oakestra_gw_exposures_conflicting", "Stored exposures on a "
                                "reserved port or one a local process listens on (checked at "
                                "start and reload)", value=m.conflicting)
        yield GaugeMetricFamily("oakestra_gw_exposures_refused_own", "Stored exposures not "
                                "loaded because their service IP is the gateway's own internal "
                                "address (checked at start and on new addresses)",
                                value=m.refused_own)
        stats = m.conntrack_stats()
        if "nf_conntrack_count" in stats:
            yield GaugeMetricFamily("oakestra_gw_conntrack_entries", "Conntrack entries in use",
                                    value=stats["nf_conntrack_count"])
        if "nf_conntrack_max" in stats:
            yield GaugeMetricFamily("oakestra_gw_conntrack_max", "Conntrack table limit",
                                    value=stats["nf_conntrack_max"])
        drops = m.conntrack_drops()
        if drops:
            family = CounterMetricFamily("oakestra_gw_conntrack_drops", "Conntrack drops by kind "
                                         "(/proc/net/stat/nf_conntrack, all CPUs)",
                                         labels=["kind"])
            for kind, value in sorted(drops.items()):
                family.add_metric([kind], value)
            yield family
        cluster = m.cluster()
        if cluster:
            mode = cluster.get("mode", "")
            if "connected" in cluster:
                yield GaugeMetricFamily("oakestra_gw_cluster_connected", "1 while the gateway is "
                                        "connected to the cluster's broker (MQTT mode)",
                                        value=int(bool(cluster["connected"])))
            endpoints = GaugeMetricFamily("oakestra_gw_cluster_endpoint", "The configured cluster "
                                          "orchestrators (http) or brokers (mqtt): 1 for the "
                                          "one in use", labels=["mode", "url"])
            for url in cluster.get("configured", ()):
                endpoints.add_metric([mode, url], int(url == cluster.get("active")))
            yield endpoints
            if "announced" in cluster:
                yield CounterMetricFamily("oakestra_gw_ha_announcements", "In a pair: times "
                                          "this node announced the pair to the cluster as its "
                                          "master (ready acknowledged, deployed sent)",
                                          value=cluster["announced"])
        if m.ha_role is not None:
            yield _ha_role_family(m.ha_role()["role"])
        yield from _egress_families(m.egress_counters())
        if m.connections is not None:
            yield from m.connections.collect()


def _ha_role_family(current: str) -> GaugeMetricFamily:
    """Every role as a series (0 or 1), so that an alert on "no master" has data to look at."""
    family = GaugeMetricFamily("oakestra_gw_ha_role", "This gateway's role in its pair, from "
                               "keepalived's notify (ha notify): 1 for the current one",
                               labels=["role"])
    for role in ROLES:
        family.add_metric([role], int(role == current))
    return family


EGRESS_PROTOCOLS = ("tcp", "udp", "icmp", "other")
EGRESS_DROP_CAUSES = ("policy", "cap")


def _egress_families(counts: dict[str, int]):
    """From our table's named counters (rules/gateway.nft), which start from zero whenever the
    table is loaded (start, a reload that changed its values, a repair)."""
    if not counts:
        return
    conns = CounterMetricFamily("oakestra_gw_egress_connections", "New egress connections "
                                "(services to the Internet, masqueraded) by family and protocol",
                                labels=["family", "protocol"])
    for family in ("ipv4", "ipv6"):
        for protocol in EGRESS_PROTOCOLS:
            conns.add_metric([family, protocol], counts.get(f"egress_{family}_{protocol}", 0))
    yield conns
    drops = CounterMetricFamily("oakestra_gw_egress_drops", "Egress connections refused, by "
                                "cause (policy: egress.deny_destinations or deny_ports; cap: "
                                "egress.max_connections_per_source)", labels=["cause"])
    for cause in EGRESS_DROP_CAUSES:
        drops.add_metric([cause], counts.get(f"egress_drop_{cause}", 0))
    yield drops


class Metrics:
    """Everything /metrics shows. Create it before the firewall and the gateway (they report
    to `observe_firewall` and `on_change`), then `bind` the gateway."""

    def __init__(self, gateway=None, *, ready: Callable[[], dict] | None = None, conntrack_stats: Callable[[], dict] = conntrack.table_stats,
                 conntrack_drops: Callable[[], dict] = read_conntrack_drops):
        disable_created_metrics()  # no *_created series: they only double the output
        self.registry = CollectorRegistry(auto_describe=True)
        self.gateway = gateway
        self.ready = ready
        self.conntrack_stats = conntrack_stats
        self.conntrack_drops = conntrack_drops
        self.connections: ConnectionCounter | None = None
        # The table's named counters (Firewall.counters), read at scrape time; see `bind`.
        self.egress_counters: Callable[[], dict] = dict
        # What the daemon's checks found; see `report`.
        self.restart_needed: list[str] = []
        self.conflicting = 0
        self.refused_own = 0
        r = self.registry
        self.api_requests = Counter("oakestra_gw_api_requests", "API requests by route, method and "
                                    "status", ["route", "method", "status"], registry=r)
        self.api_latency = Histogram("oakestra_gw_api_request_duration_seconds", "API request latency "
                                     "by route and method", ["route", "method"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.fw_latency = Histogram("oakestra_gw_firewall_transaction_duration_seconds", "nftables "
                                    "transaction latency by kind (change, load)", ["kind"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.fw_failures = Counter("oakestra_gw_firewall_transaction_failures", "nftables transactions "
                                   "the kernel refused, by kind", ["kind"], registry=r)
        self.changes = Counter("oakestra_gw_kernel_commits", "Gateway commits to the kernel by kind "
                               "(change, reconcile) and result", ["kind", "result"], registry=r)
        self.reconcile_runs = Counter("oakestra_gw_reconcile_runs", "Loads of the whole table from the "
                                      "store (start, reload, repair) by result", ["result"],
                                      registry=r)
        self.drift_checks = Counter("oakestra_gw_drift_checks", "Comparisons of the kernel with the "
                                    "store the drift watcher ran, one per batch of foreign "
                                    "changes it coalesced", registry=r)
        self.drift_repairs = Counter("oakestra_gw_drift_repairs", "Reconciles that found the kernel "
                                     "different from the store and repaired it", registry=r)
        self.drift_elements = Counter("oakestra_gw_drift_repaired_elements", "Map elements repaired, by "
                                      "what was wrong (missing, unexpected, wrong_target)",
                                      ["what"], registry=r)
        self.store_failures = Counter("oakestra_gw_store_failures", "Changes the store could "
                                      "not make durable (answered 503 store_unavailable)",
                                      registry=r)
        self.groups = Histogram("oakestra_gw_commit_group_requests", "Group commits (one store "
                                "commit and one kernel commit for changes that arrived together) "
                                "by the requests in them", buckets=GROUP_BUCKETS, registry=r)
        self.mqtt_messages = Counter("oakestra_gw_mqtt_messages", "MQTT messages from the cluster by "
                                     "kind (deploy, expose, unexpose) and result (ok, "
                                     "invalid, conflict, failed)", ["kind", "result"],
                                     registry=r)
        # The cluster orchestrator or broker in use (Oakestra mode); see `bind`.
        self.cluster: Callable[[], dict] = lambda: {}
        # The role in a gateway pair (ha.enabled); None: not in a pair, no series.
        self.ha_role: Callable[[], dict] | None = None
        self.started = Gauge("oakestra_gw_start_time_seconds", "When the process started (Unix time)",
                             registry=r)
        self.started.set(time.time())
        for kind in ("change", "load"):
            self.fw_failures.labels(kind)
        for result in ("ok", "failed"):
            self.reconcile_runs.labels(result)
        self.build_info = Gauge("oakestra_gw_build_info", "The running version (always 1)",
                                ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        # The standard collectors (process_*, python_*), on our registry rather than the global.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_StateCollector(self))

    def bind(self, gateway, ready: Callable[[], dict] | None = None, *,
             egress_counters: Callable[[], dict] | None = None,
             cluster: Callable[[], dict] | None = None,
             ha_role: Callable[[], dict] | None = None) -> "Metrics":
        """`ready()`: the reasons /api/ready gives (gw.readiness.reasons), read per scrape;
        `egress_counters()`: the table's named counters; `cluster()`: the orchestrator or
        broker in use (Oakestra mode); `ha_role()`: the role in a pair (ha.enabled)."""
        self.gateway = gateway
        if ready is not None:
            self.ready = ready
        if egress_counters is not None:
            self.egress_counters = egress_counters
        if cluster is not None:
            self.cluster = cluster
        if ha_role is not None:
            self.ha_role = ha_role
        return self

    def report(self, *, conflicting: int | None = None, refused_own: int | None = None,
               restart_needed: list[str] | None = None) -> None:
        """What the daemon's checks found (start, reload, new addresses); None: unchanged."""
        if conflicting is not None:
            self.conflicting = conflicting
        if refused_own is not None:
            self.refused_own = refused_own
        if restart_needed is not None:
            self.restart_needed = list(restart_needed)

    # -- hooks ---------------------------------------------------------------------------

    def observe_firewall(self, kind: str, seconds: float, ok: bool) -> None:
        """Firewall(observe=...)."""
        self.fw_latency.labels(kind).observe(seconds)
        if not ok:
            self.fw_failures.labels(kind).inc()

    def on_change(self, kind: str, ok: bool) -> None:
        """Gateway(on_change=...)."""
        result = "ok" if ok else "failed"
        self.changes.labels(kind, result).inc()
        if kind == "reconcile":
            self.reconcile_runs.labels(result).inc()
        if ok and self.connections is not None:
            self.connections.poke()  # the set of exposures changed: re-read it soon

    def observe_group(self, requests: int) -> None:
        """Committer.observe: a group of `requests` was committed."""
        self.groups.observe(requests)

    def observe_mqtt(self, kind: str, result: str) -> None:
        self.mqtt_messages.labels(kind, result).inc()

    def observe_request(self, route: str | None, method: str, status: int,
                        seconds: float) -> None:
        """`route`: the matched rule's template, None for no match."""
        route = route or UNMATCHED
        method = method if method in METHODS else "other"
        self.api_requests.labels(route, method, str(status)).inc()
        self.api_latency.labels(route, method).observe(seconds)

    def reconciled(self, diff) -> None:
        """After Gateway.reconcile(): count a repair when the kernel had drifted."""
        if not diff:
            return
        self.drift_repairs.inc()
        for what, items in (("missing", diff.missing), ("unexpected", diff.unexpected),
                            ("wrong_target", diff.wrong)):
            if items:
                self.drift_elements.labels(what).inc(len(items))
        if diff.table_missing:
            self.drift_elements.labels("table").inc()

    # -- per-exposure counters -------------------------------------------------------------

    def start_connection_counter(self, exposures: Callable[[], Iterable[Exposure]],
                                 **kw) -> "ConnectionCounter":
        self.connections = ConnectionCounter(exposures, **kw)
        self.connections.start()
        return self.connections

    def close(self) -> None:
        if self.connections is not None:
            self.connections.close()

    def render(self) -> bytes:
        return generate_latest(self.registry)
