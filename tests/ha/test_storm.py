"""A storm of adds against a real gateway pair (tests/ha/pairlab.py) while, round after round,
the master dies and returns (failover and failback) or one gateway loses its etcd quorum (a
partition). The clients stand where the cluster does, on the internal segment, and send every
add to the floating internal address with retries, as the cluster would: a refused connection,
a reset, a timeout or a 503 is tried again, a 201 or 200 is an acknowledgement. At the end every
acknowledged add is in etcd and in both gateways' kernels, with its target.

Rounds: OAKGW_STORM_ROUNDS (default 20), half failovers and half partitions, alternating
between the gateways for the partitions."""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest

from gw.lab.http import NetnsHttp
from gw.lab.topology import LAB_TOKEN
from tests.helpers import wait_for

from .lab import etcd_exposures, kernel_v4
from .pairlab import INTERNAL_V4, PREFIX, SERVICE_V4, PairLab

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ROUNDS = int(os.environ.get("OAKGW_STORM_ROUNDS", "20"))
CLIENTS = 4
FIRST_PORT = 20000
PORTS_PER_CLIENT = 10000  # more than a client can add in the test: none runs dry
RETRY_AFTER = 0.05
PAUSE = 0.01  # between one client's adds: a storm, not a benchmark


def target(port: int) -> tuple[str, int]:
    """Each port its own target, so a mixed-up element would show."""
    return SERVICE_V4, 1000 + port % 5000


class Client(threading.Thread):
    """One cluster-side client: adds its block of ports one after the other, each until it is
    acknowledged."""

    def __init__(self, lab: PairLab, index: int, stop: threading.Event):
        super().__init__(daemon=True, name=f"storm-{index}")
        self.http = NetnsHttp(lab.worker.name, host=INTERNAL_V4, port=11022, token=LAB_TOKEN,
                              timeout=2)
        self.ports = range(FIRST_PORT + index * PORTS_PER_CLIENT,
                           FIRST_PORT + (index + 1) * PORTS_PER_CLIENT)
        self.stop_ = stop
        self.acked: dict[int, int] = {}   # port -> the status that acknowledged it
        self.retries = 0
        self.waits: list[float] = []      # first try to acknowledgement, per add
        self.error: str | None = None

    def run(self) -> None:
        for port in self.ports:
            ip, service_port = target(port)
            body = {"exposed_port": port, "protocol": "tcp", "service_ip": ip,
                    "service_port": service_port}
            first = time.monotonic()
            while not self.stop_.is_set():
                try:
                    status = self.http.add(body).status
                except OSError:
                    status = None
                if status in (200, 201):
                    self.acked[port] = status
                    self.waits.append(time.monotonic() - first)
                    break
                if status not in (None, 503):
                    self.error = f"port {port}: answered {status}"
                    return
                self.retries += 1
                time.sleep(RETRY_AFTER)
            if self.stop_.is_set():
                return
            time.sleep(PAUSE)


def ready(node) -> bool:
    status, _ = node.daemon.request("GET", "/api/ready", token="", timeout=2)
    return status == 200


def failover_round(lab: PairLab) -> None:
    lab.cut(lab.a)
    wait_for(lambda: lab.b.role() == "master" and lab.b.holds_public_address(), timeout=30,
             what="B master", log=lab.logs)
    time.sleep(0.5)  # the storm goes to B for a while
    lab.heal(lab.a)
    lab.wait_roles("master", "backup")
    wait_for(lambda: ready(lab.a), timeout=30, what="A ready again", log=lab.logs)


def partition_round(lab: PairLab, node) -> None:
    """`node` alone loses its etcd link: its member is a minority, the others keep quorum."""
    hub_port = f"p{node.index}"
    lab.cluster.hub.ip(f"link set {hub_port} down")
    try:
        wait_for(lambda: not ready(node), timeout=30,
                 what=f"{node.name} reports the lost quorum", log=lab.logs)
        time.sleep(0.5)
    finally:
        lab.cluster.hub.ip(f"link set {hub_port} up")
    wait_for(lambda: ready(node), timeout=60, what=f"{node.name} ready again", log=lab.logs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with PairLab(tmp_path_factory.mktemp("storm")) as lab:
        lab.start()
        yield lab


def test_every_acknowledged_add_survives_failovers_and_partitions(pair, record_property):
    lab = pair
    stop = threading.Event()
    clients = [Client(lab, i, stop) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    kinds = []
    try:
        wait_for(lambda: all(c.acked for c in clients), timeout=30,
                 what="every client's first add acknowledged", log=lab.logs)
        for round_ in range(ROUNDS):
            if round_ % 2 == 0:
                failover_round(lab)
                kinds.append("failover")
            else:
                node = lab.a if round_ % 4 == 1 else lab.b
                partition_round(lab, node)
                kinds.append(f"partition {node.name}")
            assert all(c.error is None for c in clients), [c.error for c in clients]
        acked_before = sum(len(c.acked) for c in clients)
        wait_for(lambda: sum(len(c.acked) for c in clients) > acked_before, timeout=30,
                 what="adds acknowledged after the last round", log=lab.logs)
    finally:
        stop.set()
        for c in clients:
            c.join(10)
    assert all(c.error is None for c in clients), [c.error for c in clients]

    acked = {port: status for c in clients for port, status in c.acked.items()}
    wanted = {port: target(port) for port in acked}

    def held(ns) -> dict[int, tuple[str, int]]:
        return {k[2]: (str(t[0]), t[1]) for k, t in kernel_v4(ns).items() if k[2] >= FIRST_PORT}

    def stored() -> dict[int, tuple[str, int]]:
        return {int(p): (v["service_ip"], v["service_port"])
                for p, v in etcd_exposures(lab.cluster, PREFIX).items()}

    # An add whose answer was lost may be stored without an acknowledgement: the kernels must
    # equal etcd, and etcd must hold every acknowledged add.
    wait_for(lambda: held(lab.a.ns) == held(lab.b.ns) == stored(), timeout=60,
             what="both kernels equal etcd", log=lab.logs)
    in_etcd = stored()
    missing = {p: t for p, t in wanted.items() if in_etcd.get(p) != t}
    assert not missing, f"{len(missing)} acknowledged adds not in etcd: {sorted(missing)[:20]}"
    for node in lab.nodes:
        kernel = held(node.ns)
        lost = [p for p, t in wanted.items() if kernel.get(p) != t]
        assert not lost, f"{len(lost)} acknowledged adds not in {node.name}'s kernel: {lost[:20]}"

    waits = sorted(w for c in clients for w in c.waits)
    retries = sum(c.retries for c in clients)
    record_property("storm", {"rounds": kinds, "acked": len(acked), "retries": retries,
                              "unacked_in_etcd": len(set(in_etcd) - set(acked)),
                              "longest_wait_s": round(waits[-1], 3)})
    print(f"\n{len(kinds)} rounds ({kinds.count('failover')} failovers and failbacks, "
          f"{len(kinds) - kinds.count('failover')} partitions): {len(acked)} adds acknowledged "
          f"({sum(1 for s in acked.values() if s == 200)} of them 200 after a lost answer), "
          f"{retries} retries, {len(set(in_etcd) - set(acked))} stored without an answer; "
          f"an add's wait for its acknowledgement: median {statistics.median(waits) * 1000:.0f} "
          f"ms, max {waits[-1] * 1000:.0f} ms")
