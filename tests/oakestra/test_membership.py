"""The Oakestra client (gw.cluster.oakestra) against the stand-in orchestrator served over real HTTP on
loopback; the kernel side (bridge, public addresses) is replaced by recorders, so these run
without root. The daemon-level flows (real bridge, real exit codes) are in test_daemon.py."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from gw.kernel import netlink

from gw.cluster import oakestra
from gw.core.config import parse_config
from gw.core.errors import ConfigError
from tests.oakestra.orchestrator import Orchestrator


class FakeStore:
    path = "/fake/exposures.json"

    def __init__(self, meta=None):
        self._meta = dict(meta or {})
        self.commits = []

    def meta(self):
        return dict(self._meta)

    def commit(self, put=(), delete=(), meta=None):
        self.commits.append(dict(meta or {}))
        for k, v in (meta or {}).items():
            if v is None:
                self._meta.pop(k, None)
            else:
                self._meta[k] = v


@pytest.fixture
def bridges(monkeypatch):
    """Records ensure_bridge calls; public addresses come from 'the default interface'."""
    calls = []
    monkeypatch.setattr(netlink, "ensure_bridge", lambda s: calls.append(
        (str(s.network.internal_ipv4), str(s.network.internal_ipv6))))
    monkeypatch.setattr(netlink, "public_addresses",
                        lambda s: {"ipv4": "198.18.0.1", "ipv6": "2001:db8::1"})
    return calls


@pytest.fixture
def cluster():
    orch = Orchestrator(port=0).start()
    yield orch
    orch.stop()


def settings(url, **oak):
    return parse_config({"oakestra": {"cluster_url": url, "give_up_after": 1.5,
                                      "backoff_max": 0.2, **oak}})


def membership(url, store, **oak):
    return oakestra.Membership(settings(url, **oak), store)


def test_first_start_follows_the_contract(cluster, bridges):
    store = FakeStore()
    m = membership(cluster.url, store)
    live = m.bring_up()
    state = cluster.state
    assert state.steps() == ["POST /api/gateway/register", "GET /api/gateway/gw-1/ip"]
    assert state.calls[0][2] == {"gateway_id": "", "gateway_ipv4": "198.18.0.1",
                                 "gateway_ipv6": "2001:db8::1"}
    assert (str(live.network.internal_ipv4), str(live.network.internal_ipv6)) == \
        ("10.30.255.1", "fdff:ffff::1")
    assert bridges == [("10.30.255.1", "fdff:ffff::1")]
    assert store.meta() == {"gateway_id": "gw-1", "internal_ipv4": "10.30.255.1",
                            "internal_ipv6": "fdff:ffff::1", "cluster_url": cluster.url}
    # Step 4 only after the API listens, in the background.
    assert state.ready == []
    m.announce_ready("t0ken-t0ken-t0ken-t0ken")
    assert state.ready_event.wait(5)
    assert state.ready == [("gw-1", {"oakestra_gateway_ipv4": "10.30.255.1",
                                     "oakestra_gateway_ipv6": "fdff:ffff::1",
                                     "api_port": 11022,
                                     "api_token": "t0ken-t0ken-t0ken-t0ken"})]
    m.stop()


def test_public_addresses_from_the_config_and_a_configured_id(cluster, bridges):
    store = FakeStore()
    membership(cluster.url, store, public_ipv4="198.19.7.7", public_ipv6="2001:db8:7::7",
               gateway_id="edge-gw").bring_up()
    assert cluster.state.calls[0][2] == {"gateway_id": "edge-gw", "gateway_ipv4": "198.19.7.7",
                                         "gateway_ipv6": "2001:db8:7::7"}
    assert store.meta()["gateway_id"] == "edge-gw"


def test_a_bad_public_address_in_the_config_is_a_config_error(cluster, bridges):
    with pytest.raises(ConfigError) as err:
        membership(cluster.url, FakeStore(), public_ipv4="2001:db8::1").bring_up()
    assert err.value.field == "oakestra.public_ipv4"
    assert cluster.state.calls == []


@pytest.mark.parametrize("step,canned,words", [
    ("register", "not-json", "not JSON"),
    ("register", "empty", "not JSON"),
    ("register", "list", "not a JSON object"),
    ("register", "no-id", "has no 'gateway_id'"),
    ("register", "bad-id", "not an id"),
    ("register", "null-id", "not an id"),
    ("ip", "bad-ipv4", "not an IPv4 address"),
    ("ip", "swapped", "not an IPv4 address"),
    ("ip", "loopback", "cannot be the gateway's internal address"),
])
def test_garbage_ends_a_first_start_at_once_and_changes_nothing(cluster, bridges, step,
                                                                canned, words):
    cluster.state.fail(step, canned)
    store = FakeStore()
    with pytest.raises(oakestra.ClusterGarbage) as err:
        membership(cluster.url, store).bring_up()
    steps = cluster.state.steps()
    assert len(steps) == len(set(steps)), f"retried: {steps}"
    assert words in err.value.message and "nothing was changed" in err.value.message
    # Only the id a register answered is kept, so the next start does not register anew.
    kept = [] if step == "register" else [{"gateway_id": "gw-1", "cluster_url": cluster.url}]
    assert bridges == [] and store.commits == kept


@pytest.mark.parametrize("canned,status", [("error-404", "404"), ("error-403", "403")])
def test_a_client_error_ends_a_first_start_at_once(cluster, bridges, canned, status):
    cluster.state.fail("register", canned)
    store = FakeStore()
    with pytest.raises(oakestra.ClusterRefused) as err:
        membership(cluster.url, store).bring_up()
    assert f"refused POST /api/gateway/register: {status}" in err.value.message
    assert bridges == [] and store.commits == []


def test_server_errors_are_retried_then_given_up(cluster, bridges, caplog):
    cluster.state.fail("register", "error-500")
    store = FakeStore()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gw.cluster.oakestra"), \
            pytest.raises(oakestra.ClusterUnreachable) as err:
        membership(cluster.url, store).bring_up()
    elapsed = time.monotonic() - start
    # It kept trying until give_up_after (1.5 s); how soon after is not its promise.
    assert elapsed >= 1.5
    tries = len(cluster.state.calls)
    assert tries >= 4
    assert "gave up joining the Oakestra cluster" in err.value.message
    assert "500" in err.value.message and "database down" in err.value.message
    # One log line per failed try (the last one is the error itself).
    lines = [r.getMessage() for r in caplog.records if "try " in r.getMessage()]
    assert len(lines) == tries - 1
    assert bridges == [] and store.commits == []


def test_a_cluster_that_is_down_at_first_is_waited_for(bridges, caplog):
    orch = Orchestrator(port=0).start()
    url = orch.url
    orch.stop()  # the port is known, nothing listens on it
    store = FakeStore()
    m = membership(url, store, give_up_after=20)
    timer = threading.Timer(1.2, lambda: Orchestrator(orch.state, port=orch.port).start())
    timer.start()
    with caplog.at_level(logging.WARNING, logger="gw.cluster.oakestra"):
        live = m.bring_up()
    assert str(live.network.internal_ipv4) == "10.30.255.1"
    fails = [r.getMessage() for r in caplog.records if "try " in r.getMessage()]
    assert fails and "connection refused" in fails[0].lower()
    assert store.meta()["gateway_id"] == "gw-1"


def test_unreachable_until_given_up(bridges):
    orch = Orchestrator(port=0).start()
    orch.stop()
    with pytest.raises(oakestra.ClusterUnreachable) as err:
        membership(orch.url, FakeStore(), give_up_after=0.8).bring_up()
    assert "cannot connect" in err.value.message


STORED = {"gateway_id": "gw-7", "internal_ipv4": "10.30.255.1",
          "internal_ipv6": "fdff:ffff::1"}


def test_a_restart_uses_the_store_at_once_and_rejoins_in_the_background(bridges):
    orch = Orchestrator(port=0).start()
    orch.stop()  # the cluster is down while the gateway restarts
    store = FakeStore({**STORED, "cluster_url": orch.url})
    # Had it waited for the cluster, it would give up after 60 s and raise here.
    m = membership(orch.url, store, give_up_after=60)
    live = m.bring_up()
    assert str(live.network.internal_ipv4) == "10.30.255.1"
    assert bridges == [("10.30.255.1", "fdff:ffff::1")]
    m.announce_ready("t0ken-t0ken-t0ken-t0ken")
    time.sleep(0.8)
    orch = Orchestrator(orch.state, port=orch.port).start()
    try:
        assert orch.state.ready_event.wait(5)
        assert orch.state.steps() == ["POST /api/gateway/register",
                                      "POST /api/gateway/gw-7/ready"]
        assert orch.state.calls[0][2]["gateway_id"] == "gw-7"
        assert m.gateway_id == "gw-7" and store.commits == []
    finally:
        m.stop()
        orch.stop()


def test_a_rejoin_under_the_same_id_keeps_the_stored_addresses(cluster, bridges, caplog):
    cluster.state.internal_ipv4 = "10.30.255.9"  # what a GET .../ip would hand out now
    store = FakeStore({**STORED, "cluster_url": cluster.url})
    m = membership(cluster.url, store)
    live = m.bring_up()
    m.announce_ready("t0ken-t0ken-t0ken-t0ken")
    assert cluster.state.ready_event.wait(5)
    assert str(live.network.internal_ipv4) == "10.30.255.1"
    assert "GET /api/gateway/gw-7/ip" not in cluster.state.steps()
    assert store.commits == [] and store.meta()["internal_ipv4"] == "10.30.255.1"
    assert cluster.state.ready[0][1]["oakestra_gateway_ipv4"] == "10.30.255.1"
    m.stop()


def test_a_registration_of_another_cluster_is_not_reused(cluster, bridges):
    store = FakeStore({**STORED, "cluster_url": "http://elsewhere:1"})
    membership(cluster.url, store).bring_up()
    assert cluster.state.calls[0][2]["gateway_id"] == ""
    assert store.meta()["gateway_id"] == "gw-1"


def test_the_ready_callback_is_retried(cluster, bridges):
    cluster.state.fail("ready", "error-503", times=2)
    m = membership(cluster.url, FakeStore())
    m.bring_up()
    m.announce_ready("t0ken-t0ken-t0ken-t0ken")
    assert cluster.state.ready_event.wait(5)
    assert cluster.state.steps().count("POST /api/gateway/gw-1/ready") == 3
    m.stop()


def test_standalone_takes_the_config_and_never_calls_out(bridges):
    s = parse_config({"network": {"internal_ipv4": "10.30.255.3", "internal_ipv6": "fdff::3"}})
    m = oakestra.Membership(s, FakeStore())
    assert m.bring_up() is s
    m.announce_ready(None)
    assert bridges == [("10.30.255.3", "fdff::3")]


def test_standalone_without_internal_ips_is_a_config_error(bridges):
    with pytest.raises(ConfigError):
        oakestra.Membership(parse_config({}), FakeStore()).bring_up()


class Waits:
    def __init__(self):
        self.waits = []

    def wait(self, seconds):
        self.waits.append(seconds)
        return False


def test_backoff_doubles_up_to_the_cap():
    waits, n = Waits(), iter(range(9))

    def attempt():
        if next(n) < 8:
            raise oakestra.Retryable("down")
        return "ok"

    assert oakestra.retry("x", attempt, give_up_after=None, backoff_max=3, stop=waits) == "ok"
    assert waits.waits == [0.5, 1, 2, 3, 3, 3, 3, 3]


def test_backoff_never_sleeps_past_the_give_up_time():
    now = [0.0]
    waits = Waits()
    waits.wait = lambda s: (waits.waits.append(s), now.__setitem__(0, now[0] + s))[-1] and False

    def attempt():
        raise oakestra.Retryable("down")

    with pytest.raises(oakestra.ClusterUnreachable) as err:
        oakestra.retry("x", attempt, give_up_after=2.2, backoff_max=30, stop=waits,
                       clock=lambda: now[0])
    assert waits.waits == [0.5, 1, pytest.approx(0.7)]
    assert "after 4 tries in 2.2 s" in err.value.message


def test_internal_addresses_equal_to_a_public_one_are_refused(cluster, bridges):
    cluster.state.internal_ipv4 = "198.18.0.1"  # the gateway's public address
    store = FakeStore()
    with pytest.raises(oakestra.ClusterGarbage) as err:
        membership(cluster.url, store).bring_up()
    assert "public address" in err.value.message and "nothing was changed" in err.value.message
    assert bridges == [] and store.commits == [{"gateway_id": "gw-1", "cluster_url": cluster.url}]
