"""Conntrack entries of removed exposures. Deleting an exposure stops new flows at once (the map
element is gone) but established flows keep their NAT binding until their entries go; a
background worker removes them so the API can answer before the flush (docs/oakestra.md,
"Deleting an exposure"). It takes every flush queued meanwhile at once (a burst of deletes is
one job) and works over netlink, no process started: per exposure one dump that the kernel
filters itself (original destination port, reply source, DNAT status), then a delete of each
entry found by its exact tuple.

A flush can be lost (a crash between the kernel commit and the flush, a SIGTERM with flushes
queued, an element someone else added while the daemon was down). So after every load of the
table (start, repair) the same worker sweeps: one dump of the DNATed flows, and every flow our
table NATed that no current exposure explains is deleted by its exact tuple.

The sweep's dump is of every DNATed flow; the `conntrack` tool filters and prints it in C,
which stays cheap on a large table where walking the entries from Python would not. It runs
once per load, never per change."""

from __future__ import annotations

import collections
import ipaddress
import logging
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pyroute2.netlink.exceptions import NetlinkError

from ..core.exposure import Exposure

log = logging.getLogger(__name__)
PROC = Path("/proc/sys/net/netfilter")
DELETED_RE = re.compile(r"(\d+) flow entries have been deleted")
_idle = ["chrt", "--idle", "0"] if shutil.which("chrt") else []


def _run_idle(argv: list[str]) -> subprocess.CompletedProcess:
    """A filtered delete still walks the whole table, so its CPU grows with it: run it at
    idle priority so it never competes with the API's requests for the cores. Where a system
    call filter forbids that (chrt fails before it runs conntrack), run it plainly."""
    global _idle
    proc = subprocess.run(_idle + argv, capture_output=True, text=True, timeout=30)
    if _idle and proc.returncode != 0 and proc.stderr.startswith("chrt:"):
        log.info("conntrack: cannot run at idle priority (%s)", proc.stderr.strip())
        _idle = []
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return proc


IPS_DST_NAT = 1 << 5  # nf_conntrack_common.h


def through_filter(e: Exposure) -> dict:
    """Pure: the attributes of a conntrack dump that the kernel filters down to the flows
    DNATed to `e`'s ports: original destination port = the exposed port, reply source port =
    the service port, status DNAT. The reply's source address is checked on what comes back
    (`flows_through`): this kernel's filter never matches an IPv6 one. The host's own flows
    to the service are not DNATed, so they never match."""
    from pyroute2.netlink.nfnetlink.nfctsocket import (  # noqa: PLC0415
        FILTER_FLAG_CTA_PROTO_DST_PORT as DST_PORT, FILTER_FLAG_CTA_PROTO_NUM as NUM,
        FILTER_FLAG_CTA_PROTO_SRC_PORT as SRC_PORT)
    proto = socket.getprotobyname(e.protocol)
    return {
        "CTA_TUPLE_ORIG": {"attrs": [["CTA_TUPLE_PROTO", {"attrs": [
            ["CTA_PROTO_NUM", proto], ["CTA_PROTO_DST_PORT", e.exposed_port]]}]]},
        "CTA_TUPLE_REPLY": {"attrs": [["CTA_TUPLE_PROTO", {"attrs": [
            ["CTA_PROTO_NUM", proto], ["CTA_PROTO_SRC_PORT", e.service_port]]}]]},
        "CTA_FILTER": {"attrs": [["CTA_FILTER_ORIG_FLAGS", NUM | DST_PORT],
                                 ["CTA_FILTER_REPLY_FLAGS", NUM | SRC_PORT]]},
        "CTA_STATUS": IPS_DST_NAT, "CTA_STATUS_MASK": IPS_DST_NAT}


def _flow_of(family: str, msg) -> Flow | None:
    """The Flow of one entry of a netlink dump (None: not TCP or UDP, or not DNATed)."""
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # noqa: PLC0415
    if not (msg.get_attr("CTA_STATUS") or 0) & IPS_DST_NAT:
        return None
    af = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    orig = NFCTAttrTuple.from_netlink(af, msg.get_attr("CTA_TUPLE_ORIG"))
    reply = NFCTAttrTuple.from_netlink(af, msg.get_attr("CTA_TUPLE_REPLY"))
    if orig.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    return Flow(family, "tcp" if orig.proto == socket.IPPROTO_TCP else "udp", orig.saddr,
                orig.daddr, orig.sport, orig.dport, reply.saddr, reply.sport, reply.daddr)


def flows_through(exposures: Iterable[Exposure]) -> list[Flow]:
    """The flows DNATed through these exposures: per exposure one dump the kernel filters
    (see `through_filter`), so what reaches Python is only the flows of its ports, of which
    those to its service IP are kept."""
    from pyroute2.netlink.nfnetlink.nfctsocket import (  # noqa: PLC0415
        IPCTNL_MSG_CT_GET, nfct_msg)
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST  # noqa: PLC0415

    flows: list[Flow] = []
    for family, _, ct, group in _by_family(exposures):
        for e in group:
            msg = nfct_msg()
            for name, value in through_filter(e).items():
                msg["attrs"].append([name, value])
            for entry in ct.request(msg, IPCTNL_MSG_CT_GET,
                                    msg_flags=NLM_F_REQUEST | NLM_F_DUMP):
                flow = _flow_of(family, entry)
                if flow is not None and flow.through == (*e.key, *e.target):
                    flows.append(flow)
    return flows


def _by_family(items: Iterable):
    """Each family's items (exposures or flows), with a ctnetlink socket of that family open
    while the caller uses them: (family, address family, socket, items)."""
    from pyroute2 import NFCTSocket  # noqa: PLC0415 - only the daemon needs netlink here

    items = list(items)
    for family, af in (("ipv4", socket.AF_INET), ("ipv6", socket.AF_INET6)):
        group = [i for i in items if i.family == family]
        if group:
            with NFCTSocket(nfgen_family=af) as ct:
                yield family, af, ct, group


def delete_entries(exposures: Iterable[Exposure]) -> int:
    """Remove the entries of the flows DNATed through these exposures now, over netlink;
    returns how many went."""
    return delete_flows(flows_through(exposures))


def delete_snatted_to(addresses: Iterable) -> int:
    """Remove every flow the gateway NATed (teardown): all of them are DNATed and answer to
    one of its internal addresses, so one filtered dump per address covers them all."""
    total = 0
    for ip in addresses:
        family = "ipv6" if ":" in str(ip) else "ipv4"
        proc = _run_idle(["conntrack", "-D", "-f", family, "--dst-nat", "--reply-dst", str(ip)])
        m = DELETED_RE.search(proc.stderr + proc.stdout)
        total += int(m[1]) if m else 0
    return total


@dataclass(frozen=True)
class Flow:
    """One conntrack entry: its original tuple and where its reply comes from and goes to."""

    family: str
    protocol: str
    src: str
    dst: str
    sport: int
    dport: int
    reply_src: str
    reply_sport: int
    reply_dst: str

    @property
    def through(self) -> tuple:
        """The exposure that would explain it: (family, protocol, exposed port, service IP,
        service port), as `explained` sets hold them."""
        return (self.family, self.protocol, self.dport, ipaddress.ip_address(self.reply_src),
                self.reply_sport)


def parse_flows(text: str) -> list[Flow]:
    """Pure: the TCP and UDP entries of `conntrack -L -o extended` output. Each line holds
    the original tuple's src, dst, sport, dport, then the reply tuple's."""
    flows = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 4 or words[0] not in ("ipv4", "ipv6") or words[2] not in ("tcp", "udp"):
            continue
        fields: dict[str, list[str]] = {}
        for word in words:
            name, eq, value = word.partition("=")
            if eq:
                fields.setdefault(name, []).append(value)
        try:
            (src, rsrc), (dst, rdst) = fields["src"][:2], fields["dst"][:2]
            (sport, rsport), dport = fields["sport"][:2], fields["dport"][0]
            flows.append(Flow(words[0], words[2], src, dst, int(sport), int(dport), rsrc,
                              int(rsport), rdst))
        except (KeyError, ValueError):
            continue
    return flows


def dnated_flows() -> list[Flow]:
    """Every DNATed TCP and UDP flow, both families: one dump of the kernel's table."""
    proc = _run_idle(["conntrack", "-L", "--dst-nat", "-o", "extended"])
    return parse_flows(proc.stdout)


def orphans(flows: Iterable[Flow], ours: set[str], explained: set[tuple]) -> list[Flow]:
    """Pure: the flows our table NATed (DNATed, and SNATed to one of our internal addresses
    `ours`, so their replies come back to us) that no exposure in `explained` accounts for."""
    ours = {ipaddress.ip_address(a) for a in ours}
    return [f for f in flows
            if ipaddress.ip_address(f.reply_dst) in ours and f.through not in explained]


def delete_flows(flows: Iterable[Flow]) -> int:
    """Delete each entry by its original tuple: a direct lookup per flow, no dump, and a flow
    opened since (another source port) is never touched. Returns how many went."""
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # noqa: PLC0415

    total = 0
    for _, af, ct, group in _by_family(flows):
        for f in group:
            try:
                ct.entry("del", tuple_orig=NFCTAttrTuple(
                    family=af, saddr=f.src, daddr=f.dst, proto=socket.getprotobyname(
                        f.protocol), sport=f.sport, dport=f.dport))
                total += 1
            except NetlinkError:  # gone meanwhile (timed out, closed)
                pass
    return total


def table_stats() -> dict[str, int]:
    """Entries in use, the table's limit, from procfs (cheap: two small reads)."""
    stats = {}
    for name in ("nf_conntrack_count", "nf_conntrack_max"):
        try:
            stats[name] = int((PROC / name).read_text())
        except (OSError, ValueError):
            pass
    return stats


class Flusher:
    """A worker thread that removes flows, in the order asked: the flushes of deleted
    exposures and the sweeps after a load. One condition guards the queue and the job that
    runs, so a re-add can tell, in one look, that no flush of its exposures is queued or
    running."""

    def __init__(self, delete=delete_entries, dump=dnated_flows, remove=delete_flows):
        self._delete, self._dump, self._remove = delete, dump, remove
        self._cond = threading.Condition()
        self._jobs: collections.deque = collections.deque()
        self._running: tuple | None = None
        self._thread = threading.Thread(target=self._run, name="conntrack-flush", daemon=True)
        self._thread.start()

    def _put(self, job) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()

    def flush(self, exposures: Iterable[Exposure]) -> None:
        self._put(("flush", list(exposures)))

    def sweep(self, ours: set[str], explained: Callable[[], set[tuple]]) -> None:
        """Remove the flows our table NATed (replies to an address in `ours`) that no exposure
        explains. `explained()` is asked after the dump: an exposure deleted since the dump
        explains nothing, one added since has no flow in it."""
        self._put(("sweep", (set(ours), explained)))

    def settle(self, exposures: Iterable[Exposure], timeout: float = 30) -> None:
        """Before these exposures (same port and target) are added again: forget their queued
        flushes and wait for a running one to end, so that no flow opened through them after
        the add is flushed. Call it before the kernel commit of the add."""
        gone = {(e.key, e.target) for e in exposures}

        def running_one() -> bool:
            job = self._running
            return bool(job and job[0] == "flush"
                        and any((e.key, e.target) in gone for e in job[1]))

        with self._cond:
            for kind, batch in (job for job in self._jobs if job is not None):
                if kind == "flush":
                    batch[:] = [e for e in batch if (e.key, e.target) not in gone]
            self._cond.wait_for(lambda: not running_one(), timeout)

    def wait(self, timeout: float = 10.0) -> bool:
        """Whether everything queued so far was done within `timeout` (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and self._running is None,
                                       timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs)
                job = self._running = self._take()
            if job is None:
                return
            kind, payload = job
            try:
                if kind == "flush":
                    n = self._delete(payload)
                    log.info("conntrack: removed %d entries of %d deleted exposure(s)", n,
                             len(payload))
                else:
                    self._sweep(*payload)
            except (OSError, subprocess.SubprocessError, NetlinkError) as exc:
                log.error("conntrack: could not remove entries: %s", exc)
            except Exception:  # noqa: BLE001 - the worker must outlive one bad job
                log.exception("conntrack: the %s failed", kind)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _take(self):
        """Under the condition: the next job; a flush takes every flush queued right behind it
        along (a burst of deletes is one job, each exposure once)."""
        job = self._jobs.popleft()
        if job is None or job[0] != "flush":
            return job
        batch = list(job[1])
        while self._jobs and self._jobs[0] is not None and self._jobs[0][0] == "flush":
            batch += self._jobs.popleft()[1]
        seen: set = set()
        unique = [e for e in batch if (e.key, e.target) not in seen
                  and not seen.add((e.key, e.target))]
        return ("flush", unique)

    def _sweep(self, ours: set[str], explained: Callable[[], set[tuple]]) -> None:
        flows = self._dump()
        if not flows:
            return  # nothing to judge: no need for the set of every exposure's flow shape
        lost = orphans(flows, ours, explained())
        if lost:
            n = self._remove(lost)
            log.warning("conntrack: swept %d flow(s) that no exposure explains (of %d "
                        "DNATed)", n, len(flows))

    def close(self) -> None:
        self._put(None)
        self._thread.join(timeout=5)
