"""Egress end to end: a container in the worker namespace (10.19.0.2 and fc00::2, Oakestra's
container networks; its default route goes into the tunnel) talks to a server on the public
side (the client namespace, which routes no container network back, as the Internet does
not). The gateway must masquerade it to its public address; the real daemon in the gateway
namespace, real packets, real conntrack.

Every "gets nothing" has a positive control: the same probe answered in the same run."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from gw import lab as L
from tests.helpers import fails, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# family: (public server, the gateway's public address, the container's source, a denied host)
FAMILIES = {"ipv4": (L.CLIENT_V4, L.GATEWAY_V4, L.CONTAINER_V4, "198.18.0.3"),
            "ipv6": (L.CLIENT_V6, L.GATEWAY_V6, L.CONTAINER_V6, "2001:db8::3")}
NEGATIVE_TIMEOUT = 1.0
EGRESS = {"enabled": True, "deny_destinations": ["198.18.0.3/32", "2001:db8::3/128"],
          "deny_ports": ["7/tcp"]}


@pytest.fixture(scope="module")
def gw():
    with L.Lab() as lab:
        lab.start_services()            # the worker's service (exposed, for hairpin)
        lab.start_services("client")    # the server on the Internet
        # A second public host for the deny list; the client answers on both addresses. Never
        # the source of the client's own answers (a secondary IPv4, a deprecated IPv6), so a UDP
        # answer from the first address comes from it.
        lab.ip("client", "addr add 198.18.0.3/24 dev eth0",
               "addr add 2001:db8::3/64 dev eth0 nodad preferred_lft 0")
        daemon = L.lab_daemon(lab, overrides={"egress": EGRESS}).start()
        status, answer = daemon.request("POST", "/api/service/exposure/add", {"exposures": [
            {"exposed_port": 8080, "service_ip": L.SERVICE_V4, "service_port": 80},
            {"exposed_port": 8080, "service_ip": L.SERVICE_V6, "service_port": 80}]})
        assert status == 201, answer
        yield SimpleNamespace(lab=lab, daemon=daemon)
        assert daemon.stop() == 0, daemon.log_tail()


def whoami(gw, server, source, port=80, timeout=5.0) -> dict:
    status, body = L.http_get(gw.lab, "worker", server, port, "/whoami", source=source,
                              timeout=timeout)
    assert status == 200
    return json.loads(body)


def ping(gw, server, source) -> bool:
    return gw.lab.run("worker", "ping", "-c", "1", "-W", "2", "-I", source, server,
                      check=False).returncode == 0


def metrics(gw) -> dict[str, float]:
    status, text = gw.daemon.request("GET", "/metrics")
    assert status == 200
    found = {}
    for line in text.splitlines():
        m = re.match(r"(oakestra_gw_egress_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


@pytest.mark.parametrize("fam", FAMILIES)
def test_http_udp_and_ping_out_leave_with_the_gateways_public_address(gw, fam):
    server, public, source, _denied = FAMILIES[fam]
    who = whoami(gw, server, source)
    assert who["peer"] == public  # not the container's address, not the internal one
    # The server was told an MSS that fits the 1450-byte tunnel its answers go into.
    assert who["mss"] <= L.TUNNEL_MTU - (40 if fam == "ipv4" else 60)
    answer = L.udp_exchange(gw.lab, "worker", server, 53, b"out", source=source)
    assert answer == f"echo out (from {public})\n".encode()
    assert ping(gw, server, source)
    # conntrack's view: the original comes from the container, the reply goes to the public IP.
    table = gw.lab.run("gateway", "conntrack", "-L", "-s", source).stdout
    for proto in ("tcp", "udp", "icmp" if fam == "ipv4" else "icmpv6"):
        line = next(x for x in table.splitlines() if x.startswith(proto))
        assert f"src={server} dst={public}" in line, line


@pytest.mark.parametrize("fam", FAMILIES)
def test_large_download_through_egress(gw, fam):
    server, _public, source, _denied = FAMILIES[fam]
    size = 4_000_000
    status, body = L.http_get(gw.lab, "worker", server, 80, f"/bytes/{size}", source=source,
                              timeout=10)
    assert status == 200 and len(body) == size


@pytest.mark.parametrize("fam", FAMILIES)
def test_denied_destination_and_port_get_nothing_a_permitted_one_does(gw, fam):
    server, public, source, denied = FAMILIES[fam]
    before = metrics(gw)
    assert fails(lambda: whoami(gw, denied, source, timeout=NEGATIVE_TIMEOUT)) == "TimeoutError"
    assert fails(lambda: L.tcp_connect(gw.lab, "worker", server, 7, source=source,
                                       timeout=NEGATIVE_TIMEOUT)) == "TimeoutError"
    # Positive controls in the same run: the denied host answers the gateway itself, the
    # permitted host answers on port 80, and port 7 answers from the gateway.
    assert L.http_get(gw.lab, "gateway", denied, 80, "/whoami")[0] == 200
    assert whoami(gw, server, source)["peer"] == public
    L.tcp_connect(gw.lab, "gateway", server, 7).close()
    after = metrics(gw)
    key = 'oakestra_gw_egress_drops_total{cause="policy"}'
    assert after[key] >= before.get(key, 0) + 2


def test_the_per_source_cap_refuses_the_connection_over_it(gw):
    server, public, source = L.CLIENT_V4, L.GATEWAY_V4, "10.19.0.3"
    gw.lab.ip("worker", f"addr add {source}/32 dev wtun")
    gw.daemon.reconfigure({"egress": {"max_connections_per_source": 3}})
    held = []
    try:
        before = metrics(gw)
        for _ in range(3):  # up to the cap: each opens (an HTTP server waiting for a request)
            held.append(L.tcp_connect(gw.lab, "worker", server, 80, source=source))
        assert fails(lambda: L.tcp_connect(gw.lab, "worker", server, 80, source=source,
                                           timeout=NEGATIVE_TIMEOUT)) == "TimeoutError"
        # Another source is not affected by this one's connections.
        assert whoami(gw, server, L.CONTAINER_V4)["peer"] == public
        key = 'oakestra_gw_egress_drops_total{cause="cap"}'
        assert metrics(gw)[key] >= before.get(key, 0) + 1
        # A held connection still works, and once one closes a new one is admitted.
        held[0].sendall(b"GET /whoami HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: held[0].recv(4096), b""))
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["peer"] == public
        held.pop(0).close()
        wait_for(lambda: fails(lambda: whoami(gw, server, source, timeout=NEGATIVE_TIMEOUT))
                 is None, what="a connection under the cap again")
    finally:
        for sock in held:
            sock.close()
        gw.daemon.reconfigure({"egress": {"max_connections_per_source": 1024}})


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_public_side_cannot_open_into_the_oakestra_side(gw, fam):
    """A public client that routes the container network and the service IPs to the gateway
    gets nothing from either, even while egress flows of that very container are open; the
    exposed port answers it (positive control)."""
    server, public, container, _denied = FAMILIES[fam]
    service = L.SERVICE_V4 if fam == "ipv4" else L.SERVICE_V6
    subnet = L.CONTAINER_SUBNETS[0 if fam == "ipv4" else 1]
    gw.lab.ip("client", f"route add {subnet} via {public}")
    try:
        held = L.tcp_connect(gw.lab, "worker", server, 80, source=container)  # egress is open
        try:
            for target in (container, service):
                assert fails(lambda: L.http_get(gw.lab, "client", target, 80, "/whoami",
                                                timeout=NEGATIVE_TIMEOUT)) == "TimeoutError"
                assert fails(lambda: L.udp_exchange(gw.lab, "client", target, 53, b"in",
                                                    timeout=NEGATIVE_TIMEOUT)) == "TimeoutError"
            assert gw.lab.run("client", "ping", "-c", "1", "-W", "1", container,
                              check=False).returncode != 0
            status, body = L.http_get(gw.lab, "client", public, 8080, "/whoami")
            assert status == 200 and json.loads(body)["local"] == service
        finally:
            held.close()
    finally:
        gw.lab.ip("client", f"route del {subnet} via {public}")


@pytest.mark.parametrize("fam", FAMILIES)
def test_hairpin_the_worker_reaches_its_exposed_service_by_the_public_address(gw, fam):
    _server, public, container, _denied = FAMILIES[fam]
    service = L.SERVICE_V4 if fam == "ipv4" else L.SERVICE_V6
    internal = L.INTERNAL_V4 if fam == "ipv4" else L.INTERNAL_V6
    who = whoami(gw, public, container, port=8080)
    # DNAT to the service, SNAT into the tunnel to the internal address (not masqueraded).
    assert who["local"] == service and who["peer"] == internal


def test_egress_off_the_same_probes_get_nothing_and_on_again_they_answer(gw):
    probes = {fam: (lambda s=server, c=container: whoami(gw, s, c, timeout=NEGATIVE_TIMEOUT))
              for fam, (server, _public, container, _denied) in FAMILIES.items()}
    for probe in probes.values():  # positive control, in this run
        assert probe()["peer"] in (L.GATEWAY_V4, L.GATEWAY_V6)
    gw.daemon.reconfigure({"egress": {"enabled": False}})
    try:
        status, ready = gw.daemon.request("GET", "/api/ready")
        assert status == 200 and ready["egress"] == {"enabled": False, "interfaces": []}
        for probe in probes.values():
            assert fails(probe) == "TimeoutError"
        assert not ping(gw, L.CLIENT_V4, L.CONTAINER_V4)
        # Exposures are not egress: they keep working.
        assert L.http_get(gw.lab, "client", L.GATEWAY_V4, 8080, "/whoami")[0] == 200
    finally:
        gw.daemon.reconfigure({"egress": {"enabled": True}})
    status, ready = gw.daemon.request("GET", "/api/ready")
    assert status == 200 and ready["egress"] == {"enabled": True, "interfaces": ["pub0"]}
    for probe in probes.values():
        assert probe()["peer"] in (L.GATEWAY_V4, L.GATEWAY_V6)


def test_metrics_count_egress_connections_by_family_and_protocol(gw):
    before = metrics(gw)
    for server, _public, container, _denied in FAMILIES.values():
        whoami(gw, server, container)
        L.udp_exchange(gw.lab, "worker", server, 53, b"m", source=container)
    after = metrics(gw)
    for family in ("ipv4", "ipv6"):
        for protocol in ("tcp", "udp"):
            key = f'oakestra_gw_egress_connections_total{{family="{family}",protocol="{protocol}"}}'
            assert after[key] >= before.get(key, 0) + 1, key
