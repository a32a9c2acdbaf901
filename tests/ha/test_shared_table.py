"""Two gateway daemons share one exposure table on a real three-member etcd cluster (a member
in each gateway's namespace and one in a witness namespace): each follows the other's changes
in its own kernel; etcd decides conflicting adds; a gateway cut off from the quorum keeps its
table, refuses changes with 503 naming etcd, and converges when it rejoins."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import threading
import time

import pytest

from gw.lab.netns import Netns, stop_process
from gw.lab.probes import http_get
from gw.daemon.admission import BUSY_AFTER
from gw.lab.daemon import GatewayDaemon
from gw.lab.topology import LAB_TOKEN, Lab, lab_daemon
from gw.store import etcd_client as ec
from gw.lab.http import in_netns
from tests.helpers import wait_for

from .lab import cluster_in, etcd_exposures, kernel_v4

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PREFIX = "/oakgw-test"


@pytest.fixture(scope="module")
def pair():
    with Lab() as a, Lab() as b:
        witness = Netns.create("oakw")
        try:
            spaces = [a.netns["gateway"], b.netns["gateway"], witness]
            with cluster_in(spaces) as cluster:
                daemons = []
                for lab, own in ((a, "m1"), (b, "m2")):
                    mine = cluster.members[own].client_url
                    d = lab_daemon(lab, overrides={"store": {
                        "backend": "etcd", "prefix": PREFIX,
                        "endpoints": [mine] + [u for u in cluster.endpoints if u != mine]}})
                    d.lab = lab
                    daemons.append(d.start())
                try:
                    yield cluster, daemons
                finally:
                    for d in daemons:
                        d.stop()
        finally:
            witness.delete()


def kernel(daemon) -> dict:
    return kernel_v4(daemon.ns)


def in_etcd(cluster) -> dict:
    return etcd_exposures(cluster, PREFIX)


def body(port, ip="10.30.0.1", service_port=80):
    return {"exposed_port": port, "service_ip": ip, "service_port": service_port}


def test_adds_on_a_reach_b_and_both_kernels_equal_etcd(pair, record_property):
    cluster, (a, b) = pair
    monitor = b.ns.popen("nft", "monitor", "elements", stdout=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}

    def read():
        for line in monitor.stdout:
            m = re.search(r"add element .* \{ tcp \. (\d+) :", line)
            if m:
                seen.setdefault(int(m.group(1)), time.monotonic())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)  # the monitor is listening
    acked = {}
    try:
        http = a.http()
        for port in range(20000, 21000):
            r = http.add(body(port))
            assert r.status == 201, r
            acked[port] = time.monotonic()
        wait_for(lambda: len(seen) >= 1000, timeout=60, what="B's kernel has all 1000")
    finally:
        stop_process(monitor)
    lags = sorted((seen[p] - t) * 1000 for p, t in acked.items())
    p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99)]
    record_property("lag_ms", {"p50": round(p50, 1), "p99": round(p99, 1),
                               "max": round(lags[-1], 1), "mean": round(statistics.mean(lags), 1)})
    print(f"replication lag A ack -> B kernel, ms: p50 {p50:.1f} p99 {p99:.1f} "
          f"max {lags[-1]:.1f}")
    stored = in_etcd(cluster)
    wanted = {("ipv4", "tcp", int(p)): (v["service_ip"], v["service_port"])
              for p, v in stored.items()}
    assert len(wanted) == 1000
    for d in (a, b):
        assert {k: (str(t[0]), t[1]) for k, t in kernel(d).items()} == wanted


def test_conflicting_adds_one_created_one_conflict(pair):
    cluster, (a, b) = pair
    outcomes = []
    for i in range(100):
        port = 30000 + i
        got = {}
        go = threading.Barrier(2)

        def send(name, d, ip):
            http = d.http()
            go.wait()
            got[name] = http.add(body(port, ip)).status
        ts = [threading.Thread(target=send, args=("a", a, "10.30.0.1")),
              threading.Thread(target=send, args=("b", b, "10.30.0.2"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        outcomes.append(sorted(got.values()))
        # An identical re-add stays 200, on either gateway.
        winner = "10.30.0.1" if got["a"] == 201 else "10.30.0.2"
        assert b.http().add(body(port, winner)).status == 200
    assert all(o == [201, 409] for o in outcomes), outcomes
    stored = in_etcd(cluster)
    wait_for(lambda: all(len({k: v for k, v in kernel(d).items() if k[2] >= 30000}) == 100
                         for d in (a, b)), timeout=30, what="both kernels hold the 100")
    for d in (a, b):
        held = {k[2]: str(t[0]) for k, t in kernel(d).items() if k[2] >= 30000}
        assert held == {int(p): v["service_ip"] for p, v in stored.items() if int(p) >= 30000}


def test_partitioned_gateway_refuses_changes_and_converges(pair):
    cluster, (a, b) = pair
    assert a.http().add(body(40000)).status == 201
    wait_for(lambda: ("ipv4", "tcp", 40000) in kernel(b), what="B has 40000")
    cluster.cut("m1")
    try:
        r = a.http().add(body(40001))
        assert r.status == 503, r
        assert "etcd" in r.json["message"], r
        wait_for(lambda: "etcd" in json.dumps(a.http().get("/api/ready").json), timeout=30,
                 what="A's /api/ready names etcd")
        assert a.http().get("/api/ready").status == 503
        metrics = a.http().get("/metrics").body.decode()
        assert re.search(r'oakestra_gw_problems\{cause="etcd"\} 1', metrics), metrics[-2000:]
        # A keeps its table in the kernel; B, on the quorum's side, takes changes.
        assert ("ipv4", "tcp", 40000) in kernel(a)
        assert b.http().add(body(40002)).status == 201
        assert b.http().delete({"exposed_port": 40000, "protocol": "tcp"}).status == 200
    finally:
        cluster.heal("m1")
    wait_for(lambda: ("ipv4", "tcp", 40002) in kernel(a)
             and ("ipv4", "tcp", 40000) not in kernel(a), timeout=30, what="A converges")
    wait_for(lambda: a.http().get("/api/ready").status == 200, timeout=30, what="A ready")
    assert ("ipv4", "tcp", 40001) not in kernel(a)


def test_changes_waiting_for_a_lost_quorum_leave_a_worker_for_health_and_readiness(pair):
    """Every change sent to a gateway cut off from its quorum waits for etcd (each endpoint in
    turn, up to store.timeout each) before its 503. Once changes are stuck, those beyond
    api.threads - 1 are answered 503 "busy" at once, so /api/health (the systemd watchdog's
    probe) and /api/ready still find a worker and answer while the others wait; nothing is
    changed."""
    cluster, (a, b) = pair
    threads = 8  # api.threads' default, which the lab keeps
    cluster.cut("m1")
    answers: dict[int, tuple[float, int, str]] = {}

    def add(port: int) -> None:
        r = a.http(timeout=60).add(body(port))
        answers[port] = (time.monotonic(), r.status, r.json.get("error", ""))

    def send(ports) -> list[threading.Thread]:
        workers = [threading.Thread(target=add, args=(p,), daemon=True) for p in ports]
        for w in workers:
            w.start()
        return workers

    stuck, more = range(40100, 40104), range(40104, 40104 + threads)
    try:
        workers = send(stuck)
        time.sleep(BUSY_AFTER * 1.5)  # the first changes have been waiting a while
        workers += send(more)
        wait_for(lambda: any(e == "busy" for _, _, e in list(answers.values())), timeout=30,
                 what="a busy answer")
        health = a.http(timeout=60).get("/api/health")
        ready = a.http(timeout=60).get("/api/ready")
        probed_at = time.monotonic()
        for w in workers:
            w.join(60)
    finally:
        cluster.heal("m1")
    assert health.status == 200 and ready.status in (200, 503), (health, ready)
    assert len(answers) == len(stuck) + len(more), answers
    assert all(status == 503 for _, status, _ in answers.values()), answers
    waited = [t for t, _, error in answers.values() if error != "busy"]
    assert all(answers[p][2] != "busy" for p in stuck), answers
    assert probed_at < min(waited), (probed_at, answers)
    busy = [p for p, (_, _, error) in answers.items() if error == "busy"]
    assert len(busy) == len(stuck) + len(more) - (threads - 1), answers
    wait_for(lambda: a.http().get("/api/ready").status == 200, timeout=30, what="A ready")
    assert not set(map(str, [*stuck, *more])) & set(in_etcd(cluster))
    # Refused at once for store.timeout after a failure (no change queues behind a dead
    # etcd), then tried again: A takes changes once more.
    wait_for(lambda: a.http().add(body(40199)).status == 201, timeout=30,
             what="A takes changes again")


def test_a_batch_is_all_or_nothing(pair):
    cluster, (a, b) = pair
    assert a.http().add(body(50000)).status == 201
    wait_for(lambda: ("ipv4", "tcp", 50000) in kernel(b), what="B has 50000")
    r = b.http().add({"exposures": [body(50001), body(50000, "10.30.0.2"), body(50002)]})
    assert r.status == 409, r
    stored = in_etcd(cluster)
    assert "50001" not in stored and "50002" not in stored
    assert b.http().add({"exposures": [body(p) for p in (50001, 50002, 50003)]}).status == 201
    stored = in_etcd(cluster)
    assert {"50001", "50002", "50003"} <= set(stored)


def test_lost_watch_and_compaction_read_again(pair):
    """B's member is cut off while A changes the table and etcd compacts past B's revision:
    on rejoin B cannot resume its watch from where it was and reads the table again."""
    cluster, (a, b) = pair
    cluster.cut("m2")
    try:
        wait_for(lambda: "etcd" in json.dumps(b.http().get("/api/ready").json), timeout=30,
                 what="B notices")
        assert a.http().add(body(51000)).status == 201
        assert a.http().delete({"exposed_port": 50003, "protocol": "tcp"}).status == 200
        c = ec.EtcdClient([cluster.members["m1"].client_url])
        rev, _ = in_netns(cluster.members["m1"].ns.name, c.range, b"/")
        in_netns(cluster.members["m1"].ns.name, c.compact, rev)
        b.mark_log()
    finally:
        cluster.heal("m2")
    wait_for(lambda: ("ipv4", "tcp", 51000) in kernel(b)
             and ("ipv4", "tcp", 50003) not in kernel(b), timeout=30, what="B converges")
    assert "read the shared table at revision" in b.log()
    stored = in_etcd(cluster)
    for d in (a, b):
        assert {k[2] for k in kernel(d)} == {int(p) for p in stored}


def witness_store(cluster, state) -> dict:
    """[store] of a gateway in the witness's namespace: its own member first."""
    own = cluster.members["m3"].client_url
    return {"path": str(state / "exposures.json"), "backend": "etcd", "prefix": PREFIX,
            "endpoints": [own] + [u for u in cluster.endpoints if u != own]}


def witness_gateway(cluster, state, store: dict | None = None) -> GatewayDaemon:
    """A gateway daemon in the witness's namespace, beside its etcd member."""
    return GatewayDaemon(cluster.members["m3"].ns, state, {
        "api": {"host": "127.0.0.1", "port": 11022},
        "store": store or witness_store(cluster, state),
        "network": {"internal_ipv4": "10.30.255.3", "internal_ipv6": "fdff::ff:3",
                    "public_interfaces": ["etcd0"]}}, token=LAB_TOKEN)


def test_a_third_gateway_joins_with_the_whole_table_and_shares_it(pair, tmp_path):
    """More than two: a gateway that joins (here in the witness's namespace, beside its etcd
    member) loads the whole table before it answers, then changes flow both ways."""
    cluster, (a, b) = pair
    stored = in_etcd(cluster)
    assert len(stored) > 1000
    c = witness_gateway(cluster, tmp_path / "c")
    c.start()
    try:
        assert {k[2] for k in kernel(c)} == {int(p) for p in stored}
        assert f"loaded table inet oakestra_gw with {len(stored)} exposure(s)" in c.log()
        assert c.http().add(body(53000)).status == 201
        wait_for(lambda: all(("ipv4", "tcp", 53000) in kernel(d) for d in (a, b)),
                 what="A and B follow C")
        assert a.http().delete({"exposed_port": 53000, "protocol": "tcp"}).status == 200
        wait_for(lambda: ("ipv4", "tcp", 53000) not in kernel(c), what="C follows A")
    finally:
        c.stop()


def test_a_single_gateway_joins_with_its_own_table(pair, tmp_path):
    """A single gateway (the local store) restarted as one of the pair keeps its exposures:
    they join the shared table. One of its ports held by the table with another target
    first: nothing is imported, it forwards its own table, refuses changes and names the
    port until that conflict is settled on the pair, then it imports and follows."""
    cluster, (a, b) = pair
    state = tmp_path / "c"
    c = witness_gateway(cluster, state, {"path": str(state / "exposures.json")})
    c.start()
    own = {53100: ("10.30.0.7", 80), 53101: ("10.30.0.7", 81)}
    try:
        for port, (ip, service_port) in own.items():
            assert c.http().add(body(port, ip, service_port)).status == 201
        c.stop()
        assert a.http().add(body(53101)).status == 201
        before = in_etcd(cluster)
        c.config["store"] = witness_store(cluster, state)
        c.write_config()
        c.start()
        ready = c.http().get("/api/ready")
        assert "ipv4/tcp/53101" in ready.json["reasons"]["etcd"]
        assert {k[2]: (str(ip), sp) for k, (ip, sp) in kernel(c).items()} == own
        assert c.http().add(body(53102)).status == 503
        assert in_etcd(cluster) == before
        assert ("ipv4", "tcp", 53100) not in kernel(a)

        assert a.http().delete({"exposed_port": 53101, "protocol": "tcp"}).status == 200
        # (The witness's namespace has no tunnel: C is never ready, but etcd is no reason.)
        wait_for(lambda: "etcd" not in c.http().get("/api/ready").json["reasons"], timeout=30,
                 what="C follows once the conflict is settled", log=c.log_tail)
        stored = in_etcd(cluster)
        for port, (ip, service_port) in own.items():
            assert (stored[str(port)]["service_ip"], stored[str(port)]["service_port"]) == \
                (ip, service_port)
        assert {k[2] for k in kernel(c)} == {int(p) for p in stored}
        wait_for(lambda: {53100, 53101} <= {k[2] for k in kernel(a)}, what="A follows C")
    finally:
        c.stop()
        for port in own:
            a.http().delete({"exposed_port": port, "protocol": "tcp"})


def test_cold_start_while_etcd_is_down_forwards_from_the_local_copy(pair):
    cluster, (a, b) = pair
    services = b.lab.start_services()
    try:
        assert http_get(b.lab, "client", "198.18.0.1", 20000)[0] == 200
        before = kernel(b)
        b.stop()
        for name in cluster.members:
            cluster.stop_member(name)
        b.ns.run("nft", "delete", "table", "inet", "oakestra_gw")  # a reboot's empty kernel
        b.start()
        assert kernel(b) == before
        assert http_get(b.lab, "client", "198.18.0.1", 20000)[0] == 200
        ready = b.http().get("/api/ready")
        assert ready.status == 503 and "etcd" in json.dumps(ready.json)
        assert b.http().add(body(52000)).status == 503
        for name in cluster.members:
            cluster.start_member(name, wait=False)
        for name in cluster.members:
            cluster.wait_healthy(name)
        wait_for(lambda: b.http().get("/api/ready").status == 200, timeout=30,
                 what="B ready once etcd is back")
        assert b.http().add(body(52000)).status == 201
        wait_for(lambda: ("ipv4", "tcp", 52000) in kernel(a), what="A follows B again")
    finally:
        stop_process(services)
