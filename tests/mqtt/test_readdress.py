"""Issue 12 item 6 and issue 15: a deploy message with other internal addresses re-addresses
the running gateway live (bridge, SNAT, API bind, stored exposures re-checked), without a
restart. The real daemon in the lab, mosquitto in the worker namespace."""

from __future__ import annotations

import json

import pytest

from gw import lab as L
from tests import oracle
from tests.mqtt.broker import Broker, needs_mosquitto
from tests.oakestra.test_daemon import store_state
from tests.oakestra.test_readdress import NEW_V4, NEW_V6, whoami
from tests.mqtt.test_mqtt import DEPLOY, deployed_gateway, expose, lab, send  # noqa: F401

pytestmark = [pytest.mark.kernel, pytest.mark.slow,
              pytest.mark.skipif(not needs_mosquitto, reason="needs mosquitto (make mqtt-deps)")]


def test_a_deploy_with_other_addresses_readdresses_the_gateway_live(lab):
    broker = Broker(lab).start()
    daemon = deployed_gateway(lab, broker)
    pid = daemon.proc.pid
    for doc in (expose(L.SERVICE_V4), expose(L.SERVICE_V6),
                # Fine today; once NEW_V4 is the gateway's own address it points at itself.
                expose(NEW_V4, 9090, 80, service_id="soon.itself")):
        assert send(broker, "expose", doc)["ok"], daemon.log_tail()
    assert whoami(lab, L.GATEWAY_V4) == L.INTERNAL_V4

    deployed = broker.sub("deployed")
    answer = send(broker, "deploy", {**DEPLOY, "instance_ip": NEW_V4, "instance_ip_v6": NEW_V6})
    assert answer["ok"] and answer["outcome"] == "readdressed", (answer, daemon.log_tail())
    assert (answer["namespace_ip"], answer["namespace_ip_v6"]) == (NEW_V4, NEW_V6)
    assert deployed.wait(1)[-1] == {"namespace_ip": NEW_V4, "namespace_ip_v6": NEW_V6}
    deployed.close()

    # The bridge carries the new addresses only.
    bridge = json.loads(lab.run("gateway", "ip", "-j", "addr", "show", "oakgw0").stdout)
    assert {(a["local"], a["prefixlen"]) for a in bridge[0]["addr_info"]
            if a.get("scope") == "global"} == {(NEW_V4, 32), (NEW_V6, 128)}
    # The SNAT of the table uses them.
    table = lab.run("gateway", "nft", "list", "table", "inet", "oakestra_gw").stdout
    assert f"snat ip to {NEW_V4}" in table and f"snat ip6 to {NEW_V6}" in table, table
    assert L.INTERNAL_V4 not in table and L.INTERNAL_V6 not in table, table
    # Traffic through the exposures: the service sees the new source address.
    assert whoami(lab, L.GATEWAY_V4) == NEW_V4
    assert whoami(lab, L.GATEWAY_V6) == NEW_V6
    # The exposure to the new own address left the kernel; the store keeps it, reported.
    elements = oracle.read(lab.argv("gateway"))
    assert ("ipv4", "tcp", 9090, NEW_V4, 80) not in elements, elements
    assert ("ipv4", "tcp", 8080, L.SERVICE_V4, 80) in elements, elements
    assert f"9090/tcp -> {NEW_V4}:80 points at the gateway's own internal address {NEW_V4}" \
        in daemon.log_tail(200), daemon.log_tail(200)
    # The API moved to the new internal address; the old one is gone.
    status, text = daemon.request("GET", "/metrics", host=NEW_V4)
    assert status == 200
    assert "oakestra_gw_exposures_refused_own 1.0" in text, text
    with pytest.raises(OSError):
        L.http_get(lab, "gateway", L.INTERNAL_V4, daemon.api_port, "/api/health", timeout=2)
    status, ready = daemon.request("GET", "/api/ready", host=NEW_V4)
    assert status == 200, ready
    # A new expose is checked against the new own address.
    refused = send(broker, "expose", expose(NEW_V6, 9091))
    assert refused["ok"] is False, refused
    # No restart happened.
    assert daemon.proc.poll() is None and daemon.proc.pid == pid
    assert daemon.log_tail(400).count("serving the API on") == 1
    assert daemon.stop() == 0, daemon.log_tail()
    stored, meta = store_state(daemon)
    assert any(e.service_id == "soon.itself" for e in stored), stored
    assert (meta["internal_ipv4"], meta["internal_ipv6"]) == (NEW_V4, NEW_V6)
