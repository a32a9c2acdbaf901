"""Concurrency (issue 8): 32 concurrent clients send mixed add (single and batch), delete and
list requests. Each client owns a disjoint range of exposed ports, so every answer is
predictable from its own earlier answers: the test asserts each status (201, 200, 409, 404:
never a 5xx), that every listing shows exactly the client's model for its ports (no lost and no
duplicated exposure at any moment), and afterwards kernel == store == the union of the models,
also after a restart. CI sends 1,500 requests, OAKGW_SOAK=1 5,000."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from gw.lab.http import KeepAliveHttp
from tests.reliability.common import Worker, enter_netns, metric, report, scaled, storm
from tests.reliability.daemon import API_PORT, HOST, TOKEN, docs_set, gateway, stored_docs
from tests.reliability.daemon import store_path

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CLIENTS = 32


def test_32_concurrent_clients_lose_and_duplicate_nothing(tmp_path):
    total = scaled(1500, 5000)
    per_client = -(-total // CLIENTS)
    ws = [Worker(i, range(30000 + 50 * i, 30000 + 50 * i + 10), seed=i) for i in range(CLIENTS)]
    with gateway(tmp_path / "gw", config={"api": {"threads": 8}}) as gw:
        gw.start()
        started = time.monotonic()
        threads = storm(gw.ns.name, ws, per_client, HOST, API_PORT, TOKEN, timeout=60)
        for t in threads:
            t.join(timeout=600)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), "a client hangs"
        lost = [w.index for w in ws if w.in_flight is not None]
        assert not lost, f"clients {lost} lost their connection: {gw.log()[-3000:]}"
        problems = [p for w in ws for p in w.unexpected]
        assert not problems, f"{len(problems)} unexpected answers:\n" + "\n".join(problems[:10])
        statuses = collections.Counter()
        for w in ws:
            statuses.update(w.answers)
        assert not [s for s in statuses if s >= 500], statuses
        model = {doc for w in ws for doc in w.model.values()}
        listed = gw.http().list()
        assert len(listed) == len(docs_set(listed)) == len(model), "a key listed twice?"
        assert docs_set(listed) == model
        assert gw.kernel_docs() == model
        assert gw.http().get("/api/ready").status == 200
        assert gw.stop() == 0
        assert stored_docs(store_path(gw)) == model
        gw.start()
        assert docs_set(gw.http().list()) == gw.kernel_docs() == model
        assert "Traceback" not in gw.log()
    sent = sum(w.sent for w in ws)
    report("concurrency", clients=CLIENTS, requests=sent, seconds=f"{elapsed:.1f}",
           per_second=f"{sent / elapsed:.0f}", statuses=dict(sorted(statuses.items())),
           exposures_at_end=len(model))
    assert sent >= total
    for status in (200, 201, 404, 409):
        assert statuses[status] > 0, f"the workload never produced a {status}: {statuses}"


# -- group commit: concurrent single adds share fdatasyncs and kernel transactions ------------

GROUP_CLIENTS, GROUP_ADDS = 32, 10


def single_adds(ns_name: str, ports_of: list, target: str) -> list[list[int]]:
    """One thread per client, each adding its ports one request at a time (keep-alive);
    returns each client's statuses in order."""
    answers: list[list[int]] = [[] for _ in ports_of]

    def client(i):
        enter_netns(ns_name)
        http = KeepAliveHttp(HOST, API_PORT, TOKEN, timeout=60)
        try:
            for port in ports_of[i]:
                status, _, _ = http.timed("POST", "/api/service/exposure/add", {
                    "exposed_port": port, "service_ip": target, "service_port": 80})
                answers[i].append(status)
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(len(ports_of))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client hangs"
    return answers


def grouping(gw) -> tuple[float, float, float]:
    """(journal fdatasyncs, groups committed, requests in them) from /metrics."""
    text = gw.http().get("/metrics").body.decode()
    return (metric(text, "oakestra_gw_store_syncs_total"),
            metric(text, "oakestra_gw_commit_group_requests_count"),
            metric(text, "oakestra_gw_commit_group_requests_sum"))


def test_concurrent_single_adds_are_grouped_and_every_answer_is_durable(tmp_path):
    """32 clients of single adds: every 201 is in the kernel and, after a stop, in the store;
    the daemon made fewer journal fdatasyncs (and groups) than it answered requests."""
    ports_of = [range(20000 + 100 * i, 20000 + 100 * i + GROUP_ADDS)
                for i in range(GROUP_CLIENTS)]
    with gateway(tmp_path / "gw", config={"api": {"threads": GROUP_CLIENTS}}) as gw:
        gw.start()
        syncs0, groups0, grouped0 = grouping(gw)
        answers = single_adds(gw.ns.name, ports_of, "10.30.0.1")
        syncs, groups, grouped = (b - a for a, b in zip((syncs0, groups0, grouped0),
                                                       grouping(gw)))
        requests = GROUP_CLIENTS * GROUP_ADDS
        assert [s for a in answers for s in a] == [201] * requests
        model = {("ipv4", "tcp", p, "10.30.0.1", 80) for ports in ports_of for p in ports}
        assert gw.kernel_docs() == model
        assert grouped == requests
        assert syncs <= groups < requests, (syncs, groups, requests)
        assert gw.stop() == 0
        assert stored_docs(store_path(gw)) == model
    report("group commit", clients=GROUP_CLIENTS, requests=requests, groups=int(groups),
           fdatasyncs=int(syncs), requests_per_group=f"{requests / groups:.1f}")


def test_a_refused_element_fails_only_its_own_request_among_concurrent_ones(tmp_path):
    """The kernel refuses port 20500 (a fault of the test): while 15 clients add, the client
    that adds that port again and again gets 503 each time and every other request 201,
    durable and in the kernel."""
    refused_port = 20500
    ports_of = [range(20000 + 10 * i, 20000 + 10 * i + GROUP_ADDS) for i in range(15)]
    ports_of.append([refused_port] * GROUP_ADDS)
    with gateway(tmp_path / "gw", config={"api": {"threads": 16}}) as gw:
        gw.start(env={"OAKESTRA_GW_TEST_CRASH": f"refuse-port:{refused_port}"})
        answers = single_adds(gw.ns.name, ports_of, "10.30.0.2")
        assert answers[-1] == [503] * GROUP_ADDS
        assert [s for a in answers[:-1] for s in a] == [201] * 15 * GROUP_ADDS
        model = {("ipv4", "tcp", p, "10.30.0.2", 80) for ports in ports_of[:-1] for p in ports}
        assert gw.kernel_docs() == model
        text = gw.http().get("/metrics").body.decode()
        assert gw.stop() == 0
        assert stored_docs(store_path(gw)) == model
    # More refused transactions than refused requests: a group with the refused one in it
    # was bisected (the in-process tests make that certain; here it is only likely).
    report("refused in a group", refused_requests=GROUP_ADDS,
           refused_transactions=int(metric(text, "oakestra_gw_kernel_commits_total",
                                           'kind="change",result="failed"')))
