"""Fail closed when the tunnel is gone (issue 12, item 2). When NetManager restarts, its TUN
`goProxyTun` and the route to the service ranges go with it; the gateway's default route
points at the public side. A DNATed flow must then leave nowhere: no packet to a service
address on the public link, no answer to the client, and no conntrack entry confirmed
without its SNAT binding (such an entry would keep the client's own source on the flow once
the tunnel is back, and NetManager's proxy drops sources it does not know). When the tunnel
returns, new connections and an ongoing UDP exchange work again.

The capture is an nftables counter on the client's public link (ingress of its eth0): every
packet the gateway sends there towards 10.30.0.0/16 or fdff::/16 is counted. Its positive
control is a datagram the gateway host itself sends to a service address while the tunnel is
gone: it takes the default route, and the counter sees it."""

from __future__ import annotations

import json
import socket

import pytest

from gw import lab as L
from tests.helpers import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

FAMILIES = {"ipv4": (L.GATEWAY_V4, L.SERVICE_V4, L.INTERNAL_V4),
            "ipv6": (L.GATEWAY_V6, L.SERVICE_V6, L.INTERNAL_V6)}
BACK_WITHIN = 2.0  # seconds: a generous deadline that only catches a flow that stays broken
CAPTURE = f"""
table netdev capture {{
    counter leak_v4 {{}}
    counter leak_v6 {{}}
    chain public_link {{
        type filter hook ingress device "eth0" priority 0; policy accept;
        ip daddr {L.SERVICE_RANGES[0]} counter name leak_v4
        ip6 daddr {L.SERVICE_RANGES[1]} counter name leak_v6
    }}
}}
"""


def leaked(lab) -> dict[str, int]:
    """Packets to the service ranges that arrived on the public link, by family."""
    out = json.loads(lab.run("client", "nft", "-j", "list", "counters", "table", "netdev",
                             "capture").stdout)
    counts = {c["counter"]["name"]: c["counter"]["packets"] for c in out["nftables"]
              if "counter" in c}
    return {"ipv4": counts["leak_v4"], "ipv6": counts["leak_v6"]}


def peer(lab, public: str) -> str:
    """A new TCP connection through the exposure: who the service saw."""
    status, body = L.http_get(lab, "client", public, 8080, "/whoami", timeout=1)
    assert status == 200
    return json.loads(body)["peer"]


def unsnatted_entries(lab) -> list[str]:
    """Conntrack entries of DNATed flows whose reply does not go to an internal address,
    i.e. confirmed without the SNAT binding."""
    lines = []
    for family, (_pub, _svc, internal) in FAMILIES.items():
        out = lab.run("gateway", "conntrack", "-L", "-f", family, "--dst-nat",
                      check=False).stdout
        lines += [line for line in out.splitlines()
                  if line.split("dst=")[-1].split()[0] != internal]
    return lines


def exposed(lab):
    """The lab's services behind the daemon: 8080/tcp and 5353/udp for both families, and
    the capture on the client's public link."""
    lab.start_services()
    daemon = L.lab_daemon(lab).start()
    status, answer = daemon.request("POST", "/api/service/exposure/add", {"exposures": [
        {"exposed_port": 8080, "service_ip": svc, "service_port": 80}
        for _pub, svc, _int in FAMILIES.values()] + [
        {"exposed_port": 5353, "service_ip": svc, "service_port": 53, "protocol": "udp"}
        for _pub, svc, _int in FAMILIES.values()]})
    assert status == 201, answer
    lab.run("client", "nft", "-f", "-", input=CAPTURE)
    return daemon


def test_without_the_tunnel_dnated_flows_leave_nowhere_and_recover_when_it_returns():
    with L.Lab() as lab:
        daemon = exposed(lab)
        flows = {}
        try:
            for family, (public, _svc, internal) in FAMILIES.items():
                assert peer(lab, public) == internal
                flows[family, "before"] = L.UdpFlow(lab, "client", public, 5353)
                reply = flows[family, "before"].exchange(b"hello", timeout=2)
                assert reply is not None and internal.encode() in reply, reply
            assert leaked(lab) == {"ipv4": 0, "ipv6": 0}

            lab.delete_tunnel()
            for family, (public, _svc, _int) in FAMILIES.items():
                # The client gets no answer: neither a SYN-ACK nor a reset.
                with pytest.raises(TimeoutError):
                    peer(lab, public)
                # A flow whose first datagram is sent now:
                flows[family, "during"] = L.UdpFlow(lab, "client", public, 5353)
                for when in ("before", "during"):
                    assert flows[family, when].exchange(b"anyone?", timeout=0.5) is None
            assert leaked(lab) == {"ipv4": 0, "ipv6": 0}, "DNATed packets left by the public link"
            assert unsnatted_entries(lab) == []

            # Positive control: the route out of the public side is there, and the capture
            # sees what takes it.
            for family, (_pub, svc, _int) in FAMILIES.items():
                with lab.socket("gateway", L.family_of(svc), socket.SOCK_DGRAM) as probe:
                    probe.sendto(b"control", (svc, 9))
            wait_for(lambda: all(leaked(lab).values()), timeout=5, what="the control captured")

            lab.add_tunnel()
            for family, (public, _svc, internal) in FAMILIES.items():
                def new_connection_works():
                    try:
                        return peer(lab, public) == internal
                    except OSError:
                        return False
                wait_for(new_connection_works, timeout=BACK_WITHIN,
                         what=f"a new {family} TCP connection through the exposure")
                for when in ("before", "during"):
                    def exchange_works(flow=flows[family, when]):
                        reply = flow.exchange(b"again", timeout=0.2)
                        return reply is not None and reply
                    reply = wait_for(exchange_works, timeout=BACK_WITHIN,
                                     what=f"the {family} UDP exchange started {when} the outage")
                    # NetManager drops sources it does not know: the flow must be SNATed.
                    assert f"(from {internal})".encode() in reply, reply
        finally:
            for flow in flows.values():
                flow.close()
        assert daemon.stop() == 0, daemon.log_tail()


def test_without_the_tunnel_the_hosts_own_dnated_flows_leave_nowhere_either():
    """The gateway host's own connections to its public address are DNATed in the output
    hook and never pass chain forward: chain leave (output) holds them back the same way.
    Before the outage they are DNATed into the tunnel (the service sees the internal
    address); during it neither a TCP connection nor a datagram of theirs reaches the
    public link, while the host's direct datagram to a service address does (the control).
    A packet the host's own table drops on its way out may fail its send with EPERM, or the
    sender waits in vain: either way no answer."""
    with L.Lab() as lab:
        daemon = exposed(lab)
        flows = []
        try:
            for family, (public, _svc, internal) in FAMILIES.items():
                status, body = L.http_get(lab, "gateway", public, 8080, "/whoami", timeout=2)
                assert status == 200 and json.loads(body)["peer"] == internal, body
            lab.delete_tunnel()
            for family, (public, _svc, _int) in FAMILIES.items():
                with pytest.raises((PermissionError, TimeoutError)):
                    L.http_get(lab, "gateway", public, 8080, "/whoami", timeout=1)
                flows.append(L.UdpFlow(lab, "gateway", public, 5353))
                try:
                    assert flows[-1].exchange(b"anyone?", timeout=0.5) is None
                except PermissionError:
                    pass
            assert leaked(lab) == {"ipv4": 0, "ipv6": 0}, "the host's DNATed packets leaked"
            for family, (_pub, svc, _int) in FAMILIES.items():
                with lab.socket("gateway", L.family_of(svc), socket.SOCK_DGRAM) as probe:
                    probe.sendto(b"control", (svc, 9))
            wait_for(lambda: all(leaked(lab).values()), timeout=5, what="the control captured")
        finally:
            for flow in flows:
                flow.close()
        assert daemon.stop() == 0, daemon.log_tail()
