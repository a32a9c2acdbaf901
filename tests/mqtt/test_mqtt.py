"""MQTT mode with the real daemon: `oakestra-gw serve` in the lab's gateway namespace, Debian's
mosquitto in the worker namespace (reached through the tunnel, as the cluster's broker is), and
the cluster's messages, in the exact shapes of Oakestra's service manager, sent with
mosquitto_pub and read with mosquitto_sub."""

from __future__ import annotations

import json
import socket

import pytest

from gw import lab as L
from tests import oracle
from tests.helpers import wait_for
from tests.mqtt.broker import NODE_ID, Broker, needs_mosquitto

pytestmark = [pytest.mark.kernel, pytest.mark.slow,
              pytest.mark.skipif(not needs_mosquitto, reason="needs mosquitto (make mqtt-deps)")]

DEPLOY = {"gateway_id": NODE_ID, "job_name": "gateway.gw.gw.prod",
          "instance_ip": L.INTERNAL_V4, "instance_ip_v6": L.INTERNAL_V6,
          "gateway_ipv4": L.GATEWAY_V4, "gateway_ipv6": L.GATEWAY_V6}
DEPLOYED = {"namespace_ip": L.INTERNAL_V4, "namespace_ip_v6": L.INTERNAL_V6}


def expose(ip: str, port: int = 8080, internal_port: int = 80, service_id: str = "web.app.svc"):
    return {"gateway_id": NODE_ID, "service_id": service_id, "exposed_port": port,
            "internal_port": internal_port, "service_ip": ip}


@pytest.fixture
def lab():
    with L.Lab() as lab:
        lab.start_services()
        yield lab


def mqtt_daemon(lab, *brokers: Broker, **oak) -> L.GatewayDaemon:
    urls = [b.url for b in brokers]
    return L.lab_daemon(lab, standalone=False, overrides={"oakestra": {
        "mqtt_url": urls[0] if len(urls) == 1 else urls, "node_id": NODE_ID,
        "backoff_max": 1, **oak}})


def deploy(lab, broker: Broker, daemon: L.GatewayDaemon) -> None:
    """The cluster deploys the gateway: the daemon answers `deployed`, then serves. The
    deploy is sent once the gateway's subscription exists (a first start: no session yet)."""
    wait_for(lambda: f"connected to {broker.url}" in daemon.log_tail(), 20,
             "the gateway connected", log=daemon.log_tail)
    answers = broker.sub("deployed")
    try:
        broker.pub("deploy", DEPLOY)
        assert answers.wait(1, timeout=30) == [DEPLOYED], daemon.log_tail()
    finally:
        answers.close()
    daemon.wait_serving(20)


def deployed_gateway(lab, broker: Broker, **oak) -> L.GatewayDaemon:
    daemon = mqtt_daemon(lab, broker, **oak).start(wait=False)
    deploy(lab, broker, daemon)
    return daemon


def send(broker: Broker, kind: str, doc) -> dict:
    """Publish one message and return the gateway's answer on its result topic."""
    results = broker.sub(f"{kind}/result")
    try:
        broker.pub(kind, doc)
        return results.wait(1)[0]
    finally:
        results.close()


def exposures(daemon: L.GatewayDaemon) -> list[dict]:
    status, body = daemon.request("GET", "/api/service/exposure")
    assert status == 200, body
    return body["exposures"]


def reaches(lab, host: str, port: int = 8080) -> bool:
    try:
        return L.http_get(lab, "client", host, port, "/whoami", timeout=2)[0] == 200
    except OSError:
        return False


def metric(daemon: L.GatewayDaemon, name: str) -> dict[str, float]:
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(name)}


def test_deploy_expose_both_families_then_unexpose_cuts_the_flows(lab):
    broker = Broker(lab).start()
    daemon = mqtt_daemon(lab, broker).start(wait=False)
    # Before the deploy: no bridge, no table, no API (the addresses are not known yet).
    wait_for(lambda: "waiting for the deploy message" in daemon.log_tail(), 15,
             "the daemon waiting", log=daemon.log_tail)
    assert "oakgw0" not in lab.run("gateway", "ip", "-br", "link").stdout
    wait_for(lambda: f"connected to {broker.url}" in daemon.log_tail(), 20,
             "the gateway connected", log=daemon.log_tail)
    early = send(broker, "expose", expose(L.SERVICE_V4))
    assert early["ok"] is False and early["error"] == "not_deployed", early
    deploy(lab, broker, daemon)
    bridge = lab.run("gateway", "ip", "-br", "addr", "show", "oakgw0").stdout
    assert f"{L.INTERNAL_V4}/32" in bridge and f"{L.INTERNAL_V6}/128" in bridge

    results = broker.sub("expose/result")
    broker.pub("expose", expose(L.SERVICE_V4))   # IPv4 round-robin address first,
    broker.pub("expose", expose(L.SERVICE_V6))   # then IPv6, as the service manager sends
    broker.pub("expose", expose(L.SERVICE_V4, 7007, 7))
    got = results.wait(3)
    assert [m["ok"] for m in got] == [True] * 3 and [m["outcome"] for m in got] == ["created"] * 3
    assert got[1]["exposure"] == {"exposed_port": 8080, "protocol": "tcp",
                                  "service_ip": L.SERVICE_V6, "service_port": 80,
                                  "family": "ipv6", "service_id": "web.app.svc"}
    assert len(exposures(daemon)) == 3
    for host in (L.GATEWAY_V4, L.GATEWAY_V6):
        status, body = L.http_get(lab, "client", host, 8080, "/whoami")
        assert status == 200, host
        assert json.loads(body)["peer"] == (L.INTERNAL_V4 if ":" not in host else L.INTERNAL_V6)
    echo = L.tcp_connect(lab, "client", L.GATEWAY_V4, 7007)
    assert L.tcp_echo(echo, b"before") == b"before\n"

    unexposed = broker.sub("unexpose/result")
    broker.pub("unexpose", {"gateway_id": NODE_ID, "service_id": "web.app.svc"})
    answer = unexposed.wait(1)[0]
    assert answer["ok"] and answer["outcome"] == "deleted" and len(answer["deleted"]) == 3
    assert exposures(daemon) == []
    assert oracle.read(lab.argv("gateway")) == set()  # both maps empty, nothing foreign
    assert not reaches(lab, L.GATEWAY_V4) and not reaches(lab, L.GATEWAY_V6)

    def cut():  # the established flow's conntrack entry is gone: its next packet is not DNATed
        try:
            return L.tcp_echo(echo, b"after") != b"after\n"
        except OSError:
            return True
    echo.settimeout(1)
    wait_for(cut, 10, "the established echo flow cut")
    echo.close()
    # A duplicate delivery of the unexpose is a no-op, answered as such.
    broker.pub("unexpose", {"gateway_id": NODE_ID, "service_id": "web.app.svc"})
    assert unexposed.wait(2)[1]["outcome"] == "none"
    counts = metric(daemon, "oakestra_gw_mqtt_messages_total")
    assert counts['oakestra_gw_mqtt_messages_total{kind="expose",result="ok"}'] == 3
    assert counts['oakestra_gw_mqtt_messages_total{kind="expose",result="conflict"}'] == 1
    assert counts['oakestra_gw_mqtt_messages_total{kind="unexpose",result="ok"}'] == 2
    results.close()
    unexposed.close()
    assert daemon.stop() == 0, daemon.log_tail()


def test_messages_sent_while_the_gateway_is_stopped_are_applied_when_it_starts(lab):
    broker = Broker(lab).start()
    daemon = deployed_gateway(lab, broker)
    assert daemon.stop() == 0, daemon.log_tail()
    # The gateway is down; the cluster publishes (and QoS 1 redelivers: the same twice).
    broker.pub("expose", expose(L.SERVICE_V4))
    broker.pub("expose", expose(L.SERVICE_V4))
    broker.pub("expose", expose(L.SERVICE_V6))
    results = broker.sub("expose/result")
    # Restart: the stored deployment serves at once, the queued messages follow.
    daemon.start()
    got = results.wait(3)
    assert [m["outcome"] for m in got] == ["created", "unchanged", "created"], got
    assert sorted(e["family"] for e in exposures(daemon)) == ["ipv4", "ipv6"]
    assert reaches(lab, L.GATEWAY_V4) and reaches(lab, L.GATEWAY_V6)
    assert "session resumed" in daemon.log_tail(60)
    results.close()
    assert daemon.stop() == 0, daemon.log_tail()


def test_a_crash_before_the_acknowledgement_means_a_redelivery(lab, monkeypatch):
    """The message is acknowledged only once applied: the daemon dies (on purpose, like a
    crash) between the store commit and the kernel commit of an expose; the broker delivers
    it again after the restart and the exposure works."""
    broker = Broker(lab).start()
    daemon = deployed_gateway(lab, broker)
    assert daemon.stop() == 0, daemon.log_tail()
    monkeypatch.setenv("OAKESTRA_GW_TEST_CRASH", "before-kernel:1")
    daemon.start()
    monkeypatch.delenv("OAKESTRA_GW_TEST_CRASH")
    broker.pub("expose", expose(L.SERVICE_V4))
    assert daemon.wait_exit(20) == 97, daemon.log_tail()
    assert not reaches(lab, L.GATEWAY_V4)
    results = broker.sub("expose/result")
    daemon.start()
    answer = results.wait(1)[0]
    # The store had it already (the crash came after its commit): the start loaded the
    # kernel from the store, and the redelivery finds it in place.
    assert answer["ok"] and answer["outcome"] == "unchanged", answer
    assert reaches(lab, L.GATEWAY_V4)
    results.close()
    assert daemon.stop() == 0, daemon.log_tail()


def test_broker_restart_traffic_keeps_flowing_and_changes_resume(lab):
    broker = Broker(lab).start()
    daemon = deployed_gateway(lab, broker)
    assert send(broker, "expose", expose(L.SERVICE_V4))["outcome"] == "created"
    status, ready = daemon.request("GET", "/api/ready")
    assert status == 200 and ready["cluster"] == {
        "mode": "mqtt", "active": broker.url, "configured": [broker.url], "connected": True}

    broker.stop()
    # The data plane does not need the broker; ready and metrics say it is gone.
    status, ready = wait_for(lambda: (r := daemon.request("GET", "/api/ready"))[0] == 503 and r,
                             15, "ready 503 without the broker")
    assert "mqtt" in ready["reasons"] and ready["cluster"]["connected"] is False
    assert metric(daemon, "oakestra_gw_cluster_connected") == {"oakestra_gw_cluster_connected": 0.0}
    assert reaches(lab, L.GATEWAY_V4)

    broker.start()
    wait_for(lambda: daemon.request("GET", "/api/ready")[0] == 200, 20,
             "reconnected to the restarted broker", log=daemon.log_tail)
    assert send(broker, "expose", expose(L.SERVICE_V6))["outcome"] == "created"
    assert reaches(lab, L.GATEWAY_V6)
    assert metric(daemon, "oakestra_gw_cluster_connected") == {"oakestra_gw_cluster_connected": 1.0}
    assert daemon.stop() == 0, daemon.log_tail()


BAD = [
    ("malformed", "{\"gateway_id\": \"" + NODE_ID + "\", \"exposed_port\": 80", "invalid",
     None, "not valid JSON"),
    ("outside the service ranges", expose("192.0.2.10"), "invalid", "service_ip",
     "outside the service ranges"),
    ("reserved port", expose(L.SERVICE_V4, port=22), "invalid", "exposed_port", "reserved"),
    ("another gateway's", {**expose(L.SERVICE_V4), "gateway_id": "node-other"}, "invalid",
     "gateway_id", "not this gateway's id"),
    ("a protocol field upstream does not have", {**expose(L.SERVICE_V4), "protocol": "udp"},
     "invalid", "protocol", "unknown field protocol"),
]


def test_invalid_messages_change_nothing_and_say_why(lab):
    broker = Broker(lab).start()
    daemon = deployed_gateway(lab, broker)
    results = broker.sub("expose/result")
    broker.pub("expose", expose(L.SERVICE_V4, port=9000))
    results.wait(1)
    before = (exposures(daemon), lab.run("gateway", "nft", "list", "table", "inet",
                                         "oakestra_gw").stdout)
    for _name, payload, _code, _field, _words in BAD:
        broker.pub("expose", payload)
    got = results.wait(1 + len(BAD))[1:]
    for (name, _payload, code, field, words), answer in zip(BAD, got):
        assert answer["ok"] is False and answer["error"] == code, (name, answer)
        assert answer.get("field") == field and words in answer["message"], (name, answer)
        assert words in daemon.log_tail(80), name
    assert got[1]["about"] == {"service_id": "web.app.svc", "exposed_port": 8080,
                               "service_ip": "192.0.2.10"}
    after = (exposures(daemon), lab.run("gateway", "nft", "list", "table", "inet",
                                        "oakestra_gw").stdout)
    assert after == before
    counts = metric(daemon, "oakestra_gw_mqtt_messages_total")
    assert counts['oakestra_gw_mqtt_messages_total{kind="expose",result="invalid"}'] == len(BAD)
    assert counts['oakestra_gw_mqtt_messages_total{kind="expose",result="ok"}'] == 1
    # A deploy for another node changes nothing either, and says so.
    answer = send(broker, "deploy", {**DEPLOY, "gateway_id": "node-other"})
    assert answer["ok"] is False and answer["field"] == "gateway_id"
    results.close()
    assert daemon.stop() == 0, daemon.log_tail()


def test_username_and_password_against_a_password_file(lab, tmp_path):
    broker = Broker(lab, users={"cluster": "c-secret", "gateway": "g-secret"}).start()
    # Anonymous clients are refused by this broker (the control).
    refused = broker.pub("deploy", DEPLOY, check=False)
    assert refused.returncode != 0 and "not authorised" in (refused.stderr + refused.stdout).lower()
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    daemon = mqtt_daemon(lab, broker, mqtt_username="gateway",
                         mqtt_password_file=str(wrong)).start(wait=False)
    wait_for(lambda: "refused the connection" in daemon.log_tail(), 15,
             "the wrong password refused", log=daemon.log_tail)
    assert daemon.stop() == 0
    good = tmp_path / "good"
    good.write_text("g-secret\n")
    daemon = mqtt_daemon(lab, broker, mqtt_username="gateway",
                         mqtt_password_file=str(good)).start(wait=False)
    wait_for(lambda: f"connected to {broker.url} as oakestra-gw-{NODE_ID}" in daemon.log_tail(),
             20, "the gateway connected", log=daemon.log_tail)
    answers = broker.sub("deployed", user="cluster")
    broker.pub("deploy", DEPLOY, user="cluster")
    assert answers.wait(1, timeout=30) == [DEPLOYED], daemon.log_tail()
    daemon.wait_serving(20)
    results = broker.sub("expose/result", user="cluster")
    broker.pub("expose", expose(L.SERVICE_V4), user="cluster")
    assert results.wait(1)[0]["outcome"] == "created"
    assert reaches(lab, L.GATEWAY_V4)
    answers.close()
    results.close()
    assert daemon.stop() == 0, daemon.log_tail()


def test_mqtts_with_the_clusters_ca(lab):
    broker = Broker(lab, 8883, tls=True).start()
    # Without the cluster's CA the broker's certificate is not trusted: no connection.
    untrusted = mqtt_daemon(lab, broker).start(wait=False)
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in untrusted.log_tail(), 15,
             "the certificate refused", log=untrusted.log_tail)
    assert untrusted.stop() == 0
    daemon = deployed_gateway(lab, broker, mqtt_ca_file=str(broker.ca))
    assert send(broker, "expose", expose(L.SERVICE_V4))["outcome"] == "created"
    assert reaches(lab, L.GATEWAY_V4)
    assert daemon.stop() == 0, daemon.log_tail()


def test_failover_between_two_brokers_reannounces_and_keeps_applying(lab):
    first, second = Broker(lab, 10003).start(), Broker(lab, 10004).start()
    daemon = mqtt_daemon(lab, first, second).start(wait=False)
    deploy(lab, first, daemon)
    status, ready = daemon.request("GET", "/api/ready")
    assert ready["cluster"]["active"] == first.url
    announced = second.sub("deployed")
    first.stop()
    # The gateway moves to the replica and announces itself there.
    assert announced.wait(1, timeout=30) == [DEPLOYED], daemon.log_tail()
    assert daemon.request("GET", "/api/ready")[1]["cluster"]["active"] == second.url
    endpoints = metric(daemon, "oakestra_gw_cluster_endpoint")
    assert endpoints[f'oakestra_gw_cluster_endpoint{{mode="mqtt",url="{second.url}"}}'] == 1
    assert endpoints[f'oakestra_gw_cluster_endpoint{{mode="mqtt",url="{first.url}"}}'] == 0
    assert send(second, "expose", expose(L.SERVICE_V4))["outcome"] == "created"
    assert reaches(lab, L.GATEWAY_V4)
    status = lab.run("gateway", *L.gateway_command(), "status", "--config",
                     str(daemon.config_path)).stdout
    assert f"cluster:   mqtt {second.url}, connected (replicas: {first.url})" in status, status
    announced.close()
    assert daemon.stop() == 0, daemon.log_tail()
