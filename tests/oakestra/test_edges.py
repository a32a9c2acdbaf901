"""Oakestra mode at its edges (issue 12), with the real daemon in the lab against the stand-in
orchestrator: a failed first start keeps the registration id it was given, and a rotated token
is the last one the cluster is handed."""

from __future__ import annotations

import signal
import time

import pytest

from tests.oakestra.test_daemon import (generated_token, lab, oakestra_daemon,  # noqa: F401
                                        orchestrator, store_state)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def wait_for(condition, timeout: float, what: str, daemon) -> None:
    """Poll until `condition()`; the deadline only catches a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n{daemon.log_tail()}"
        time.sleep(0.05)


def test_a_failed_first_start_keeps_its_registration_id(lab):
    cluster = orchestrator(lab)
    state = cluster.state
    # register answers; the next step is refused, so the start fails (systemd would restart).
    state.fail("ip", "error-404", times=1)
    daemon = oakestra_daemon(lab)
    with cluster.running():
        daemon.start(wait=False)
        assert daemon.wait_exit(15) == 1
        assert "refused GET /api/gateway/gw-1/ip: 404" in daemon.log_tail()
        assert store_state(daemon) == ([], {"gateway_id": "gw-1",
                                            "cluster_url": "http://127.0.0.1:18080"})
        # The next start registers under the id the cluster gave, not as a new gateway.
        daemon.start()
        assert state.ready_event.wait(10), daemon.log_tail()
    assert daemon.stop() == 0
    registers = [body for method, path, body in state.calls if path == "/api/gateway/register"]
    assert [r["gateway_id"] for r in registers] == ["", "gw-1"]
    assert list(state.gateways) == ["gw-1"]
    assert store_state(daemon)[1]["gateway_id"] == "gw-1"


def rotate(daemon, token: str) -> None:
    path = daemon.dir / "api-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    applied = daemon.log_tail(400).count("reload: applied")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.log_tail(400).count("reload: applied") > applied, 15,
             "the reload did not finish", daemon)


def test_the_newest_token_is_the_last_one_announced(lab):
    cluster = orchestrator(lab)
    state = cluster.state
    state.fail("ready", "error-503")          # every ready callback fails for now
    daemon = oakestra_daemon(lab)
    newest = "rotated-token-number-2-abcdefghij"
    with cluster.running():
        daemon.start()
        first = generated_token(daemon)
        ready_tries = lambda: sum(p.endswith("/ready") for _, p, _ in state.calls)  # noqa: E731
        wait_for(lambda: ready_tries() >= 1, 10, "no ready callback", daemon)
        rotate(daemon, "rotated-token-number-1-abcdefghij")
        rotate(daemon, newest)
        tries = ready_tries()
        wait_for(lambda: ready_tries() >= tries + 3, 15, "the ready callback stopped", daemon)
        with state.lock:
            state.faults.clear()              # the cluster recovers
        wait_for(lambda: any(doc["api_token"] == newest for _, doc in state.ready), 15,
                 "the newest token was never announced", daemon)
        # Any announcer still in backoff would try again within backoff_max (0.5 s): give
        # stragglers several periods.
        time.sleep(3)
        tokens = [doc["api_token"] for _, doc in state.ready]
    assert daemon.request("GET", "/api/service/exposure", token=newest)[0] == 200
    assert daemon.stop() == 0
    assert first not in tokens and tokens[-1] == newest, tokens
    assert set(tokens) == {newest}, tokens


def test_a_restart_with_stored_addresses_does_not_ask_for_new_ones(lab):
    """Oakestra's root service manager hands out a new address on every GET .../ip: a restart
    that asked again would churn the gateway's addresses. Stored addresses are kept unless
    the cluster says they changed (it answers another id)."""
    cluster = orchestrator(lab)
    state = cluster.state
    state.churn = True
    daemon = oakestra_daemon(lab)
    with cluster.running():
        daemon.start()
        assert state.ready_event.wait(10), daemon.log_tail()
        assert daemon.stop() == 0
        meta = store_state(daemon)[1]
        state.ready_event.clear()
        daemon.start()
        assert state.ready_event.wait(10), daemon.log_tail()
        assert daemon.stop() == 0
    steps = state.steps()
    assert steps.count("GET /api/gateway/gw-1/ip") == 1, steps
    assert steps[-2:] == ["POST /api/gateway/register", "POST /api/gateway/gw-1/ready"], steps
    assert store_state(daemon)[1] == meta
    assert (state.ready[-1][1]["oakestra_gateway_ipv4"],
            state.ready[-1][1]["oakestra_gateway_ipv6"]) == (meta["internal_ipv4"],
                                                             meta["internal_ipv6"])
    assert "now assigns the internal addresses" not in daemon.log_tail(200)
