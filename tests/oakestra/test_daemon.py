"""Oakestra mode with the real daemon: `oakestra-gw serve` in the lab's gateway namespace talks
to the stand-in orchestrator (a real HTTP server on the loopback of that namespace)."""

from __future__ import annotations

import json
import time

import pytest

from gw.core.exposure import Exposure
from gw import lab as L
from gw.store.local import LocalStore
from tests.helpers import wait_for
from tests.oakestra.orchestrator import ClusterState, Orchestrator

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PORT = 18080


@pytest.fixture
def lab():
    with L.Lab() as lab:
        lab.start_services()
        yield lab


def orchestrator(lab, state=None) -> Orchestrator:
    return Orchestrator(state or ClusterState(internal_ipv4=lab.internal_v4,
                                              internal_ipv6=lab.internal_v6),
                        port=PORT, enter=lambda: lab.inside("gateway"))


def oakestra_daemon(lab, **oak) -> L.GatewayDaemon:
    return L.lab_daemon(lab, standalone=False, token=False, overrides={"oakestra": {
        "cluster_url": f"http://127.0.0.1:{PORT}", "give_up_after": 20, "backoff_max": 0.5,
        **oak}})


def generated_token(daemon: L.GatewayDaemon) -> str:
    return (daemon.dir / "api-token").read_text().strip()


def kernel_state(lab) -> dict:
    return {"links": lab.run("gateway", "ip", "-br", "link").stdout,
            "addresses": lab.run("gateway", "ip", "-br", "addr").stdout,
            "ruleset": lab.run("gateway", "nft", "list", "ruleset").stdout}


def store_state(daemon: L.GatewayDaemon) -> tuple:
    store = LocalStore(daemon.dir / "exposures.json", shared=True)
    try:
        return store.exposures(), store.meta()
    finally:
        store.close()


def test_register_ip_ready_then_a_restart_keeps_the_id_while_the_cluster_is_down(lab):
    cluster = orchestrator(lab).start()
    state = cluster.state
    daemon = oakestra_daemon(lab).start()
    try:
        assert state.ready_event.wait(10), daemon.log_tail()
        token = generated_token(daemon)
        assert state.steps() == ["POST /api/gateway/register", "GET /api/gateway/gw-1/ip",
                                 "POST /api/gateway/gw-1/ready"]
        assert state.calls[0][2] == {"gateway_id": "", "gateway_ipv4": L.GATEWAY_V4,
                                     "gateway_ipv6": L.GATEWAY_V6}
        assert state.ready == [("gw-1", {"oakestra_gateway_ipv4": L.INTERNAL_V4,
                                         "oakestra_gateway_ipv6": L.INTERNAL_V6,
                                         "api_port": 11022, "api_token": token})]
        # The token handed over is the one the API requires.
        assert daemon.request("GET", "/api/service/exposure", token=None)[0] == 401
        status, _ = daemon.request("POST", "/api/service/exposure/add", {
            "exposed_port": 8080, "service_ip": L.SERVICE_V4, "service_port": 80},
            token=token)
        assert status == 201
        assert json.loads(L.http_get(lab, "client", L.GATEWAY_V4, 8080, "/whoami")[1])[
            "peer"] == L.INTERNAL_V4
        assert store_state_after_stop(daemon)[1]["gateway_id"] == "gw-1"
    finally:
        cluster.stop()

    # Restart while the cluster is down: the stored id and addresses serve at once.
    daemon.start()  # waits for the API; one that waited for the cluster would give up and exit
    assert L.http_get(lab, "client", L.GATEWAY_V4, 8080, "/whoami")[0] == 200
    assert daemon.request("GET", "/api/service/exposure", token=token)[0] == 200
    wait_for(lambda: "re-register gateway gw-1" in daemon.log_tail(50),
             what="a try to re-register", log=daemon.log_tail)
    # The cluster comes back: the same id re-registers, then reports ready again.
    state.ready_event.clear()
    cluster = orchestrator(lab, state).start()
    try:
        assert state.ready_event.wait(10), daemon.log_tail()
        # The same id: the stored addresses stand, so they are not asked for again.
        assert state.steps()[3:] == ["POST /api/gateway/register", "POST /api/gateway/gw-1/ready"]
        assert state.calls[3][2]["gateway_id"] == "gw-1"
        assert state.ready[-1][1]["api_token"] == token
        assert len(state.gateways) == 1
    finally:
        cluster.stop()
    assert store_state_after_stop(daemon)[1]["gateway_id"] == "gw-1"


def store_state_after_stop(daemon: L.GatewayDaemon) -> tuple:
    assert daemon.stop() == 0, daemon.log_tail()
    return store_state(daemon)


def test_a_cluster_that_is_down_at_first_is_waited_for(lab):
    daemon = oakestra_daemon(lab).start(wait=False)
    wait_for(lambda: "try 1 failed" in daemon.log_tail(), what="the first failed try",
             log=daemon.log_tail)
    log = daemon.log_tail()
    assert daemon.proc.poll() is None
    assert "register with http://127.0.0.1:18080: try 1 failed" in log, log
    assert "Connection refused" in log
    with orchestrator(lab).running() as cluster:
        daemon.wait_serving(15)
        assert cluster.state.ready_event.wait(10), daemon.log_tail()
    assert daemon.stop() == 0


GARBAGE = [("register", "not-json", "answer to POST /api/gateway/register is not JSON"),
           ("register", "bad-id", "not an id"),
           ("ip", "swapped", "oakestra_gateway_ipv4 'fdff:ffff::1', not an IPv4 address"),
           ("register", "error-403", "refused POST /api/gateway/register: 403"),
           ("ip", "error-404", "refused GET /api/gateway/gw-1/ip: 404")]


@pytest.mark.parametrize("step,canned,words", GARBAGE, ids=[g[1] for g in GARBAGE])
def test_errors_and_garbage_end_a_first_start_and_change_nothing(lab, step, canned, words):
    daemon = oakestra_daemon(lab)
    # The store already holds an exposure (a gateway switched from standalone mode, say).
    store = LocalStore(daemon.dir / "exposures.json")
    store.commit(put=[Exposure.from_dict({"exposed_port": 9000, "protocol": "tcp",
                                          "service_ip": L.SERVICE_V4, "service_port": 80})])
    store.close()
    before = kernel_state(lab), store_state(daemon)
    cluster = orchestrator(lab)
    cluster.state.fail(step, canned)
    with cluster.running():
        daemon.start(wait=False)
        assert daemon.wait_exit(15) == 1
    log = daemon.log_tail()
    assert "oakestra-gw: cannot start:" in log and words in log, log
    assert "nothing was changed" in log
    exposures, meta = before[1]
    if step != "register":  # the id the cluster answered is kept for the next start
        meta = {**meta, "gateway_id": "gw-1", "cluster_url": f"http://127.0.0.1:{PORT}"}
    assert (kernel_state(lab), store_state(daemon)) == (before[0], (exposures, meta))


def test_server_errors_are_retried_until_the_give_up_time(lab):
    daemon = oakestra_daemon(lab, give_up_after=2)
    before = kernel_state(lab)
    cluster = orchestrator(lab)
    cluster.state.fail("register", "error-500")
    with cluster.running():
        started = time.monotonic()
        daemon.start(wait=False)
        assert daemon.wait_exit(15) == 1
        elapsed = time.monotonic() - started
    log = daemon.log_tail()
    assert elapsed >= 2  # it kept trying until give_up_after; how soon after is no promise
    assert "gave up joining the Oakestra cluster after" in log
    assert "the cluster answered 500" in log and "database down" in log
    assert log.count("try ") >= 3  # a line per failed try
    assert kernel_state(lab) == before


def test_the_clusters_add_payload_with_its_gateway_id(lab):
    """The cluster's own add body (as its MQTT expose message) names the gateway: accepted
    for this gateway's id, refused naming the field for another's, and nothing changes."""
    with orchestrator(lab).running() as cluster:
        daemon = oakestra_daemon(lab).start()
        assert cluster.state.ready_event.wait(10), daemon.log_tail()
        token = generated_token(daemon)
        body = {"gateway_id": "gw-1", "service_id": "web.app.svc", "exposed_port": 8080,
                "internal_port": 80, "service_ip": L.SERVICE_V4}
        status, answer = daemon.request("POST", "/api/service/exposure/add", body, token=token)
        assert status == 201, answer
        assert L.http_get(lab, "client", L.GATEWAY_V4, 8080, "/whoami")[0] == 200
        before = kernel_state(lab)
        status, answer = daemon.request("POST", "/api/service/exposure/add",
                                        {**body, "gateway_id": "gw-2", "exposed_port": 8081},
                                        token=token)
        assert status == 400 and answer["field"] == "gateway_id", answer
        assert "not this gateway's id (gw-1)" in answer["message"]
        assert kernel_state(lab) == before
        listing = daemon.request("GET", "/api/service/exposure", token=token)[1]["exposures"]
        assert [e["exposed_port"] for e in listing] == [8080]
        assert daemon.stop() == 0, daemon.log_tail()


def test_replicated_orchestrators_the_active_one_stops_and_the_next_takes_over(lab):
    """Two stand-ins that replicate one cluster (the same gateways known to both): the
    gateway uses the first, moves to the second when the first stops, announces itself there
    again, and the second one's changes (with the token it was handed) are applied."""
    first = ClusterState(internal_ipv4=lab.internal_v4, internal_ipv6=lab.internal_v6)
    second = ClusterState(internal_ipv4=lab.internal_v4, internal_ipv6=lab.internal_v6,
                          gateways=first.gateways, _ids=first._ids)
    active = orchestrator(lab, first).start()
    replica = Orchestrator(second, port=PORT + 1, enter=lambda: lab.inside("gateway")).start()
    urls = [active.url, replica.url]
    daemon = L.lab_daemon(lab, standalone=False, token=False, overrides={"oakestra": {
        "cluster_url": urls, "give_up_after": 20, "backoff_max": 0.5,
        "probe_interval": 0.5}}).start()
    try:
        assert first.ready_event.wait(10), daemon.log_tail()
        assert second.ready == []
        token = generated_token(daemon)
        status, ready = daemon.request("GET", "/api/ready", token=token)
        assert ready["cluster"] == {"mode": "http", "active": urls[0], "configured": urls}
        active.stop()
        assert second.ready_event.wait(15), daemon.log_tail()
        assert second.steps() == ["POST /api/gateway/register", "POST /api/gateway/gw-1/ready"]
        assert second.calls[0][2]["gateway_id"] == "gw-1"
        assert second.ready[0][1]["api_token"] == token
        assert daemon.request("GET", "/api/ready", token=token)[1]["cluster"]["active"] == \
            urls[1]
        metrics = daemon.request("GET", "/metrics", token=token)[1]
        assert f'oakestra_gw_cluster_endpoint{{mode="http",url="{urls[1]}"}} 1.0' in metrics
        assert f'oakestra_gw_cluster_endpoint{{mode="http",url="{urls[0]}"}} 0.0' in metrics
        # The replica now drives the gateway.
        status, answer = daemon.request("POST", "/api/service/exposure/add", {
            "gateway_id": "gw-1", "exposed_port": 8080, "service_ip": L.SERVICE_V4,
            "internal_port": 80}, token=second.ready[0][1]["api_token"])
        assert status == 201, answer
        assert L.http_get(lab, "client", L.GATEWAY_V4, 8080, "/whoami")[0] == 200
        assert "switching to " + urls[1] in daemon.log_tail(80)
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        active.stop()
        replica.stop()
