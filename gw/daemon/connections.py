"""New connections per exposure, counted from conntrack's NEW events (opt-in:
api.per_exposure_metrics). A supervised ``conntrack -E`` is read by a thread; a scrape only
copies the counts (see docs/api.md, metrics).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily

from ..core.exposure import Exposure, Key
from ..kernel.supervisor import Supervisor

log = logging.getLogger(__name__)

EVENT_RE = re.compile(
    r"\[NEW\]\s+(?P<proto>tcp|udp)\s.*?"
    r"src=(?P<osrc>\S+) dst=(?P<odst>\S+) sport=\d+ dport=(?P<odport>\d+)\s.*?"
    r"src=(?P<rsrc>\S+) dst=\S+ sport=(?P<rsport>\d+) dport=\d+")


def parse_event(line: str) -> tuple[Key, tuple] | None:
    """Pure: a ``conntrack -E`` NEW line -> (key it would match, (reply source IP, port))."""
    m = EVENT_RE.search(line)
    if not m:
        return None
    try:
        reply_src = ipaddress.ip_address(m["rsrc"])
    except ValueError:
        return None
    family = "ipv4" if reply_src.version == 4 else "ipv6"
    return (family, m["proto"], int(m["odport"])), (reply_src, int(m["rsport"]))


class ConnectionCounter:
    """Counts new connections per exposure: a ``conntrack -E -e NEW`` subprocess read by a
    thread; an event counts for an exposure when its original destination port is the
    exposed port and its reply comes from the exposure's target (so it was DNATed by it).
    The kernel may drop events under a storm (conntrack warns, we count them as lost):
    the counter can only undercount. The set of exposures is re-read every `refresh`
    seconds; the counter of a deleted exposure disappears."""

    def __init__(self, exposures: Callable[[], Iterable[Exposure]], refresh: float = 5.0,
                 command: tuple[str, ...] = ("conntrack", "-E", "-e", "NEW", "-b", "4194304")):
        self._exposures = exposures
        self._refresh = refresh
        self._lock = threading.Lock()
        self._targets: dict[Key, tuple] = {}
        self._counts: dict[Key, int] = {}
        self.lost = 0
        self._stop = threading.Event()
        self._poked = threading.Event()
        self._events = Supervisor(command, self._read, label="per-exposure metrics",
                                  first=1.0, most=60.0, steady=60.0)
        self._refresher = threading.Thread(target=self._refresh_loop, name="exposure-refresh",
                                           daemon=True)

    def start(self) -> None:
        self.refresh()
        self._events.start()
        self._refresher.start()

    def refresh(self) -> None:
        targets = {e.key: e.target for e in self._exposures()}
        with self._lock:
            self._targets = targets
            self._counts = {k: v for k, v in self._counts.items() if k in targets}

    def count(self, line: str) -> None:
        parsed = parse_event(line)
        if parsed is None:
            if "ENOBUFS" in line or "losing events" in line:
                with self._lock:
                    self.lost += 1
            return
        key, reply = parsed
        with self._lock:
            if self._targets.get(key) == reply:
                self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[Key, int]:
        with self._lock:
            return dict(self._counts)

    def collect(self):
        family = CounterMetricFamily(
            "oakestra_gw_exposure_new_connections", "New connections DNATed by each exposure since "
            "the process started (conntrack NEW events; may undercount under event loss)",
            labels=["family", "protocol", "exposed_port"])
        for (fam, proto, port), value in sorted(self.snapshot().items()):
            family.add_metric([fam, proto, str(port)], value)
        yield family
        yield CounterMetricFamily("oakestra_gw_exposure_connection_events_lost",
                                  "Times conntrack reported lost events", value=self.lost)

    def poke(self) -> None:
        """Re-read the exposures now rather than at the next period (after a change)."""
        self._poked.set()

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self._poked.wait(self._refresh)
            self._poked.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a metrics thread must never die
                log.exception("per-exposure metrics: refresh failed")

    def _read(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.count(line)

    def close(self) -> None:
        self._stop.set()
        self._poked.set()
        self._events.stop()
        if self._refresher.is_alive():
            self._refresher.join(timeout=2)
