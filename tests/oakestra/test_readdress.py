"""Issue 12 item 6: the cluster hands the running gateway new internal addresses (its
re-registration is answered with another id, and GET .../ip with other addresses): they are
applied live (bridge, SNAT, API bind, stored exposures re-checked) and announced, without a
restart. The real daemon in the lab against the stand-in orchestrator."""

from __future__ import annotations

import json

import pytest

from gw import lab as L
from tests import oracle
from tests.helpers import wait_for
from tests.oakestra.test_daemon import (generated_token, lab, oakestra_daemon,  # noqa: F401
                                        orchestrator, store_state)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NEW_V4, NEW_V6 = "10.30.255.2", "fdff:ffff::2"


def whoami(lab, host: str, port: int = 8080) -> str:
    status, body = L.http_get(lab, "client", host, port, "/whoami")
    assert status == 200, host
    return json.loads(body)["peer"]


def test_new_addresses_from_the_cluster_are_applied_live_and_announced(lab):
    cluster = orchestrator(lab)
    state = cluster.state
    daemon = oakestra_daemon(lab)
    with cluster.running():
        daemon.start()
        assert state.ready_event.wait(10), daemon.log_tail()
        token = generated_token(daemon)
        for port, ip, sid in ((8080, L.SERVICE_V4, "web"), (8080, L.SERVICE_V6, "web"),
                              (9090, NEW_V4, "soon.itself")):
            status, answer = daemon.request("POST", "/api/service/exposure/add",
                                            {"exposed_port": port, "service_ip": ip,
                                             "service_port": 80, "service_id": sid},
                                            token=token)
            assert status == 201, answer
        assert whoami(lab, L.GATEWAY_V4) == L.INTERNAL_V4
        assert daemon.stop() == 0
        # The cluster lost the registration: the re-registration at the next start is
        # answered with another id, and that id's addresses are other ones.
        state.reissue_ids = True
        state.internal_ipv4, state.internal_ipv6 = NEW_V4, NEW_V6
        state.ready_event.clear()
        daemon.start(wait=False)  # it serves on the old address only for a moment
        pid = daemon.proc.pid
        wait_for(lambda: any(doc["oakestra_gateway_ipv4"] == NEW_V4 for _, doc in state.ready),
                 20, "the new addresses announced", log=daemon.log_tail)
        gid, doc = state.ready[-1]
        assert gid == "gw-2" and doc["oakestra_gateway_ipv6"] == NEW_V6, state.ready

        bridge = json.loads(lab.run("gateway", "ip", "-j", "addr", "show", "oakgw0").stdout)
        assert {(a["local"], a["prefixlen"]) for a in bridge[0]["addr_info"]
                if a.get("scope") == "global"} == {(NEW_V4, 32), (NEW_V6, 128)}
        table = lab.run("gateway", "nft", "list", "table", "inet", "oakestra_gw").stdout
        assert f"snat ip to {NEW_V4}" in table and f"snat ip6 to {NEW_V6}" in table, table
        assert whoami(lab, L.GATEWAY_V4) == NEW_V4
        assert whoami(lab, L.GATEWAY_V6) == NEW_V6
        elements = oracle.read(lab.argv("gateway"))
        assert ("ipv4", "tcp", 9090, NEW_V4, 80) not in elements, elements
        assert f"9090/tcp -> {NEW_V4}:80 points at the gateway's own internal address " \
            f"{NEW_V4}" in daemon.log_tail(200), daemon.log_tail(200)
        # The API listens on the new internal address (the one announced to the cluster).
        status, text = daemon.request("GET", "/metrics", token=generated_token(daemon),
                                      host=NEW_V4)
        assert status == 200
        assert "oakestra_gw_exposures_refused_own 1.0" in text, text
        with pytest.raises(OSError):
            L.http_get(lab, "gateway", L.INTERNAL_V4, daemon.api_port, "/api/health",
                       timeout=2)
        assert daemon.proc.poll() is None and daemon.proc.pid == pid
        assert daemon.stop() == 0, daemon.log_tail()
    stored, meta = store_state(daemon)
    assert any(e.service_id == "soon.itself" for e in stored), stored
    assert (meta["gateway_id"], meta["internal_ipv4"], meta["internal_ipv6"]) == \
        ("gw-2", NEW_V4, NEW_V6)
