"""Our table beside other tables on the node (issue 12, item 10).

- NetManager's iptables-nft `nat POSTROUTING` chain runs at `srcnat`. The first NAT chain
  that binds a new flow's source wins, and at equal priority the order is that of loading.
  The competitor here is the table and chain iptables-nft creates (`table ip nat`, base chain
  `POSTROUTING`, priority srcnat) with a rule that SNATs flows into the tunnel to another
  address; the worker's service reports which source it saw. Both load orders: NetManager up
  before the gateway starts, and NetManager (re)started after it.
- Our forward chain judges packets into the Oakestra network from outside. An invalid packet
  (in conntrack's view) of some other forwarded flow on the node passes it untouched; an
  invalid packet from the public side into the Oakestra network is still dropped.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct

import pytest

from gw import lab as L
from tests.helpers import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

FAMILIES = {"ipv4": (L.GATEWAY_V4, L.SERVICE_V4, L.INTERNAL_V4, L.CLIENT_V4, "10.30.255.99"),
            "ipv6": (L.GATEWAY_V6, L.SERVICE_V6, L.INTERNAL_V6, L.CLIENT_V6, "fdff:ffff::99")}
EXPOSURES = [{"exposed_port": 8080, "service_ip": svc, "service_port": 80}
             for _pub, svc, *_ in FAMILIES.values()]


def netmanager_postrouting(family: str, snat_to: str) -> str:
    """The nat table iptables-nft makes for `iptables -t nat -A POSTROUTING -o goProxyTun
    -j SNAT --to-source ADDR` (ip6tables: the ip6 family)."""
    table = "ip" if family == "ipv4" else "ip6"
    return (f"table {table} nat {{\n"
            f"  chain POSTROUTING {{ type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "goProxyTun" counter snat to {snat_to}\n  }}\n}}\n')


def peer(lab, public: str) -> str:
    status, body = L.http_get(lab, "client", public, 8080, "/whoami", timeout=3)
    assert status == 200
    return json.loads(body)["peer"]


@pytest.mark.parametrize("netmanager", ["before", "after"],
                         ids=["netmanager-loaded-first", "netmanager-restarted-later"])
def test_our_snat_wins_over_netmanagers_postrouting(netmanager):
    with L.Lab() as lab:
        lab.start_services()

        def load_netmanager():
            for family, (*_, other) in FAMILIES.items():
                lab.run("gateway", "nft", "-f", "-", input=netmanager_postrouting(family, other))

        if netmanager == "before":
            load_netmanager()
        daemon = L.lab_daemon(lab).start()
        if netmanager == "after":
            load_netmanager()
        status, answer = daemon.request("POST", "/api/service/exposure/add",
                                        {"exposures": EXPOSURES})
        assert status == 201, answer
        for family, (public, _svc, internal, *_) in FAMILIES.items():
            assert peer(lab, public) == internal, f"{family}: NetManager's SNAT ran first"
        # Positive control: its chain does SNAT what we leave alone (the gateway host's own
        # connection to the service, not DNATed).
        for family, (_pub, svc, _int, _client, other) in FAMILIES.items():
            status, body = L.http_get(lab, "gateway", svc, 80, "/whoami", timeout=3)
            assert json.loads(body)["peer"] == other, family
        assert daemon.stop() == 0, daemon.log_tail()


# -- invalid packets ------------------------------------------------------------------------

CAPTURE = """
table netdev capture {
    counter probe {}
    chain link {
        type filter hook ingress device "%s" priority 0; policy accept;
        tcp dport 4444 counter name probe
    }
}
"""
SYN, FIN = 0x02, 0x01


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src: str, dst: str, flags: int, sport: int = 40000, dport: int = 4444) -> bytes:
    """A bare TCP header with a correct checksum (the kernel adds the IP header)."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    header = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    if a.version == 4:
        pseudo = a.packed + b.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    else:
        pseudo = a.packed + b.packed + struct.pack("!I3xB", len(header), socket.IPPROTO_TCP)
    return header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]


def send_raw(lab, role: str, src: str, dst: str, flags: int) -> None:
    family = L.family_of(dst)
    with lab.inside(role):
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
    with sock:
        sock.bind((src, 0))
        sock.sendto(tcp_segment(src, dst, flags), (dst, 0))


def counted(lab, role: str) -> int:
    out = json.loads(lab.run(role, "nft", "-j", "list", "counter", "netdev", "capture",
                             "probe").stdout)
    return next(c["counter"]["packets"] for c in out["nftables"] if "counter" in c)


def test_invalid_packets_of_other_forwarded_flows_pass_and_ours_from_outside_do_not():
    with L.Lab() as lab:
        lab.run("client", "nft", "-f", "-", input=CAPTURE % "eth0")
        lab.run("worker", "nft", "-f", "-", input=CAPTURE % "wtun")
        # SYN together with FIN: conntrack calls it invalid and tracks nothing.
        invalid = SYN | FIN
        # Positive control, before our table exists: both ways the lab forwards it.
        for _pub, svc, _int, client, _other in FAMILIES.values():
            send_raw(lab, "worker", svc, client, invalid)
            send_raw(lab, "client", client, svc, invalid)
        wait_for(lambda: counted(lab, "client") == 2 and counted(lab, "worker") == 2,
                 timeout=5, what="the control packets forwarded")

        daemon = L.lab_daemon(lab).start()
        for _pub, svc, _int, client, _other in FAMILIES.values():
            # Some container's flow out to the Internet: not ours to judge.
            send_raw(lab, "worker", svc, client, invalid)
            # From the public side into the Oakestra network, not an exposure: dropped.
            send_raw(lab, "client", client, svc, invalid)
        wait_for(lambda: counted(lab, "client") == 4, timeout=5,
                 what="invalid packets of other forwarded flows passing the gateway")
        assert counted(lab, "worker") == 2, "an invalid packet entered the Oakestra network"
        assert daemon.stop() == 0, daemon.log_tail()
