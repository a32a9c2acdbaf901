"""A gateway pair (ha.enabled) in Oakestra mode is one gateway to the cluster, and only its
master speaks for it: the real daemon in the lab's gateway namespace, its role written to the
role file by `ha notify`'s own writer (as keepalived's notify does), the stand-in orchestrator
(HTTP) or Debian's mosquitto (MQTT). A backup says nothing, also when it starts as one; each
promotion announces the pair again (HTTP: register once, then ready; MQTT: deployed)."""

from __future__ import annotations

import time

import pytest

from gw import lab as L
from gw.core.ha_events import role_record
from gw.lab.daemon import gateway_command
from gw.service.ha_notify import write_role
from gw.store.local import LocalStore
from tests.helpers import wait_for
from tests.mqtt.broker import Broker, needs_mosquitto
from tests.mqtt.test_mqtt import DEPLOY, DEPLOYED, expose, exposures, metric, mqtt_daemon
from tests.oakestra.test_daemon import generated_token, lab, oakestra_daemon, orchestrator  # noqa: F401

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PAIR_ID = "pair-1"


def pair_overrides(lab) -> dict:
    """What makes the lab's gateway one node of a pair: the floating addresses are the lab's
    (public on pub0, internal in the config), the API on loopback (the internal address is
    keepalived's to add, and nothing adds it here)."""
    return {"api": {"host": "127.0.0.1"},
            "network": {"internal_ipv4": lab.internal_v4, "internal_ipv6": lab.internal_v6},
            "ha": {"enabled": True, "public_interface": "pub0",
                   "public_addresses": [f"{L.GATEWAY_V4}/24", f"{L.GATEWAY_V6}/64"],
                   "sync_interface": "sync0", "sync_address": "192.168.100.1",
                   "sync_peer": "192.168.100.2", "state_dir": str(lab.dir / "ha")}}


def as_pair(daemon: L.GatewayDaemon, lab) -> L.GatewayDaemon:
    for section, table in pair_overrides(lab).items():
        daemon.config.setdefault(section, {}).update(table)
    daemon.write_config()
    return daemon


def set_role(lab, role: str) -> None:
    """As `ha notify` tells the daemon: the role file replaced in one step."""
    write_role(str(lab.dir / "ha" / "role"),
               role_record(role, time.time(), f'GROUP "oakestra_gw" {role.upper()} 0'))


def noticed(daemon: L.GatewayDaemon, change: str) -> None:
    """The daemon's role watcher has seen `change` (e.g. "backup -> master")."""
    daemon.wait_log(f"({change})")


def dropped(daemon: L.GatewayDaemon) -> int:
    """Ready announcements the daemon dropped because it was not (or no longer) the master."""
    return daemon.log(since_start=True).count("the ready announcement is dropped")


def test_only_the_master_registers_and_reports_ready_and_again_on_each_promotion(lab):
    cluster = orchestrator(lab).start()
    state = cluster.state
    set_role(lab, "backup")  # the daemon starts as the backup
    daemon = as_pair(oakestra_daemon(lab, gateway_id=PAIR_ID), lab)
    # The node was a gateway of its own before: its store holds that registration.
    store = LocalStore(daemon.dir / "exposures.json")
    store.commit(meta={"gateway_id": "gw-9", "internal_ipv4": "10.30.255.9",
                       "internal_ipv6": "fdff:ffff::9", "cluster_url": cluster.url})
    store.close()
    try:
        daemon.start()  # serves at once: a pair's id and addresses are its config's
        token = generated_token(daemon)
        assert "the store holds the registration of gateway gw-9" in daemon.log(since_start=True)
        noticed(daemon, "at start")
        assert "role backup (at start): not announcing" in daemon.log(since_start=True)
        assert state.calls == []  # a backup neither registers nor reports ready

        set_role(lab, "master")
        assert state.ready_event.wait(10), daemon.log_tail()
        # Registered under the pair's id with the floating public addresses; the internal
        # ones are not asked for (GET .../ip hands out new ones), they are announced.
        assert state.steps() == ["POST /api/gateway/register",
                                 f"POST /api/gateway/{PAIR_ID}/ready"]
        assert state.calls[0][2] == {"gateway_id": PAIR_ID, "gateway_ipv4": L.GATEWAY_V4,
                                     "gateway_ipv6": L.GATEWAY_V6}
        assert state.ready == [(PAIR_ID, {"oakestra_gateway_ipv4": lab.internal_v4,
                                          "oakestra_gateway_ipv6": lab.internal_v6,
                                          "api_port": daemon.api_port, "api_token": token})]
        daemon.token = token  # the generated one, for the requests below
        wait_for(lambda: daemon.request("GET", "/api/status")[1]["cluster"].get("announced") == 1,
                 what="the announcement counted", log=daemon.log_tail)
        assert metric(daemon, "oakestra_gw_ha_announcements_total") == {
            "oakestra_gw_ha_announcements_total": 1.0}
        cli = daemon.ns.run(*gateway_command(), "status", "--config", str(daemon.config_path),
                            "--api", f"http://127.0.0.1:{daemon.api_port}", check=False)
        assert "announced as the pair's master 1 time(s)" in cli.stdout, cli.stdout + cli.stderr
        assert "now on this node, the pair's master" in daemon.log(since_start=True)

        # Demoted, the token rotated (a reload): the backup tells the cluster nothing.
        set_role(lab, "backup")
        noticed(daemon, "master -> backup")
        rotated = daemon.dir / "rotated-token"
        rotated.write_text("rotated-token-0123456789abcdef\n")
        rotated.chmod(0o600)
        daemon.reconfigure({"api": {"token_file": str(rotated)}})
        wait_for(lambda: dropped(daemon) == 1, what="the rotated token's ready dropped",
                 log=daemon.log_tail)
        assert len(state.calls) == 2
        # Promoted again: a ready with the newest token, no second registration.
        state.ready_event.clear()
        set_role(lab, "master")
        assert state.ready_event.wait(10), daemon.log_tail()
        assert state.steps()[2:] == [f"POST /api/gateway/{PAIR_ID}/ready"]
        assert state.ready[-1][1]["api_token"] == "rotated-token-0123456789abcdef"

        # A ready the cluster does not take yet is dropped once the node is demoted: the
        # backup goes on saying nothing; the next promotion announces the pair again.
        state.fail("ready", "error-503")
        set_role(lab, "backup")
        noticed(daemon, "master -> backup")
        state.ready_event.clear()
        set_role(lab, "master")
        wait_for(lambda: "report ready to the cluster: try 1 failed" in
                 daemon.log(since_start=True).split("(backup -> master)")[-1],
                 what="a failed ready", log=daemon.log_tail)
        set_role(lab, "backup")
        wait_for(lambda: dropped(daemon) == 2, what="the refused ready dropped",
                 log=daemon.log_tail)
        state.faults.clear()
        tried = len(state.calls)
        set_role(lab, "master")
        assert state.ready_event.wait(10), daemon.log_tail()
        assert [s for s in state.steps()[tried:]] == [f"POST /api/gateway/{PAIR_ID}/ready"]
        assert len(state.ready) == 3 and len(state.gateways) == 1
    finally:
        cluster.stop()
        assert daemon.stop() == 0, daemon.log_tail()


@pytest.mark.skipif(not needs_mosquitto, reason="needs mosquitto (make mqtt-deps)")
def test_only_the_master_answers_deployed_and_again_on_each_promotion(lab):
    broker = Broker(lab).start()
    deployed = broker.sub("deployed")
    results = broker.sub("expose/result")
    set_role(lab, "backup")
    daemon = as_pair(mqtt_daemon(lab, broker, mqtt_client_id="oakestra-gw-node-7f3a-a"), lab)
    try:
        daemon.start()  # no deploy waited for: the floating addresses are the config's
        noticed(daemon, "at start")
        wait_for(lambda: f"connected to {broker.url}" in daemon.log_tail(), 20,
                 "the gateway connected", log=daemon.log_tail)
        # A backup applies the cluster's messages (its table is ready for a takeover) and
        # answers none of them.
        broker.pub("expose", expose(L.SERVICE_V4))
        wait_for(lambda: exposures(daemon), what="the exposure applied", log=daemon.log_tail)
        assert deployed.messages == [] and results.messages == []

        set_role(lab, "master")
        assert deployed.wait(1) == [DEPLOYED], daemon.log_tail()
        assert "answered deployed" in daemon.log(since_start=True)
        set_role(lab, "backup")
        noticed(daemon, "master -> backup")
        set_role(lab, "master")
        assert deployed.wait(2) == [DEPLOYED, DEPLOYED], daemon.log_tail()
        assert metric(daemon, "oakestra_gw_ha_announcements_total") == {
            "oakestra_gw_ha_announcements_total": 2.0}
        # The master answers; a deploy naming other addresses than the pair's is refused.
        answers = broker.sub("deploy/result")
        try:
            broker.pub("deploy", {**DEPLOY, "instance_ip": "10.30.255.7"})
            refused = answers.wait(1)[0]
        finally:
            answers.close()
        assert refused["ok"] is False and refused["field"] == "instance_ip", refused
        assert "not the pair's floating internal address" in refused["message"]
        assert len(deployed.messages) == 2
    finally:
        deployed.close()
        results.close()
        assert daemon.stop() == 0, daemon.log_tail()
        broker.stop()
