"""Stopping and starting the daemon: the kernel keeps forwarding while it is away, and an
established TCP connection through the gateway survives the stop, the restart (the table is
replaced in one transaction) and the start after it."""

from __future__ import annotations

import json
import signal

import pytest

from gw import lab as L

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


echo = L.tcp_echo


def bridge_addresses(lab):
    out = lab.run("gateway", "ip", "-j", "addr", "show", "dev", "oakgw0").stdout
    return sorted((a["local"], a["prefixlen"]) for link in json.loads(out)
                  for a in link["addr_info"] if a["scope"] == "global")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL],
                         ids=["sigterm", "sigkill"])
def test_a_restart_keeps_established_connections_and_the_exposures(stop_signal):
    with L.Lab() as lab:
        lab.start_services()
        daemon = L.lab_daemon(lab).start()
        status, _ = daemon.request("POST", "/api/service/exposure/add", {"exposures": [
            {"exposed_port": 7007, "service_ip": L.SERVICE_V4, "service_port": 7},
            {"exposed_port": 7007, "service_ip": L.SERVICE_V6, "service_port": 7}]})
        assert status == 201
        conns = [L.tcp_connect(lab, "client", host, 7007) for host in (L.GATEWAY_V4,
                                                                        L.GATEWAY_V6)]
        try:
            for conn in conns:
                assert echo(conn, b"one") == b"one\n"
            rc = daemon.stop(stop_signal)
            assert rc == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)
            # The process is away: the table stays, flows old and new keep going.
            for conn in conns:
                assert echo(conn, b"two") == b"two\n"
            fresh = L.tcp_connect(lab, "client", L.GATEWAY_V4, 7007)
            assert echo(fresh, b"new while away") == b"new while away\n"
            fresh.close()

            daemon.start()
            for conn in conns:
                assert echo(conn, b"three") == b"three\n"
            status, listing = daemon.request("GET", "/api/service/exposure")
            assert status == 200 and len(listing["exposures"]) == 2
            # The bridge is reused, its addresses are not duplicated.
            assert bridge_addresses(lab) == [(L.INTERNAL_V4, 32), (L.INTERNAL_V6, 128)]
            assert lab.run("gateway", "ip", "-o", "link", "show", "type", "bridge"
                           ).stdout.count("oakgw0") == 1
        finally:
            for conn in conns:
                conn.close()
        assert daemon.stop() == 0
