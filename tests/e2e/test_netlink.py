"""gw.netlink against the kernel, each test in namespaces of its own (the calling thread enters
them with setns; pyroute2's sockets and /proc/sys/net follow the thread)."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from gw import lab as L
from gw.kernel import netlink
from gw.core.config import parse_config

pytestmark = pytest.mark.kernel


def settings(v4="10.30.255.1", v6="fdff:ffff::1", **net):
    return parse_config({"network": {"internal_ipv4": v4, "internal_ipv6": v6, **net}})


@pytest.fixture
def lab():
    with L.Lab() as lab:
        yield lab


def addrs(lab, ifname="oakgw0"):
    out = lab.run("gateway", "ip", "-j", "addr", "show", "dev", ifname).stdout
    return [(a["local"], a["prefixlen"], a.get("nodad", False), a.get("tentative", False))
            for link in json.loads(out) for a in link["addr_info"] if a["scope"] == "global"]


def test_the_bridge_is_created_with_host_addresses_and_is_idempotent(lab):
    s = settings()
    with lab.inside("gateway"):
        netlink.ensure_bridge(s)
        index = socket.if_nametoindex("oakgw0")
        netlink.ensure_bridge(s)  # a restart
        netlink.ensure_bridge(s)
        assert socket.if_nametoindex("oakgw0") == index
    assert sorted(addrs(lab)) == [("10.30.255.1", 32, False, False),
                                  ("fdff:ffff::1", 128, True, False)]
    link = json.loads(lab.run("gateway", "ip", "-j", "-d", "link", "show", "oakgw0").stdout)[0]
    assert link["linkinfo"]["info_kind"] == "bridge" and "UP" in link["flags"]
    # /32 and /128: no connected route steals a part of the Oakestra ranges from the tunnel.
    assert lab.run("gateway", "ip", "route", "get", "10.30.255.2").stdout.split()[2] == \
        "goProxyTun"
    assert "goProxyTun" in lab.run("gateway", "ip", "-6", "route", "get", "fdff:ffff::2").stdout


def test_ipv6_works_on_a_bridge_without_carrier(lab):
    """A bridge whose only port has no carrier is NO-CARRIER: an IPv6 address added the
    ordinary way stays tentative there (the control), ours is usable at once."""
    lab.ip("gateway", "link add oakgw0 type bridge", "link add p0 type veth peer name p1",
           "link set p0 master oakgw0", "link set p0 up", "link set oakgw0 up",
           "addr add fdff:eeee::9/128 dev oakgw0")
    assert "NO-CARRIER" in lab.run("gateway", "ip", "link", "show", "oakgw0").stdout
    assert ("fdff:eeee::9", 128, False, True) in addrs(lab)  # control: tentative...
    with lab.inside("gateway"):
        with socket.socket(socket.AF_INET6) as sock, pytest.raises(OSError):
            sock.bind(("fdff:eeee::9", 0))  # ... and unusable
        netlink.ensure_bridge(settings())
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("fdff:ffff::1", 0))  # EADDRNOTAVAIL while tentative
    assert sorted(addrs(lab)) == [("10.30.255.1", 32, False, False),
                                  ("fdff:ffff::1", 128, True, False)]  # the stray one is gone


def test_changed_internal_addresses_replace_the_old_ones(lab):
    with lab.inside("gateway"):
        netlink.ensure_bridge(settings())
        lab.ip("gateway", "addr add 10.30.255.1/24 dev oakgw0")  # a wrong prefix
        netlink.ensure_bridge(settings("10.30.255.7", "fdff:ffff::7"))
    assert sorted(addrs(lab)) == [("10.30.255.7", 32, False, False),
                                  ("fdff:ffff::7", 128, True, False)]


def ha_settings():
    return parse_config({
        "network": {"internal_ipv4": "10.30.255.1", "internal_ipv6": "fdff:ffff::1"},
        "ha": {"enabled": True, "public_interface": "pub0",
               "public_addresses": ["198.18.0.10/24"], "sync_interface": "sync0",
               "sync_address": "198.19.77.1", "sync_peer": "198.19.77.2"}})


def test_with_ha_the_internal_addresses_are_keepaliveds(lab):
    """On a pair, keepalived adds the internal addresses on the master and takes them away on
    the backup: the daemon makes the bridge, and neither adds them (a backup holding them
    would answer ARP for the master's address) nor removes what keepalived added."""
    s = ha_settings()
    with lab.inside("gateway"):
        netlink.ensure_bridge(s)
        assert addrs(lab) == []                      # a backup, or a master before keepalived
        lab.ip("gateway", "addr add 10.30.255.1/32 dev oakgw0",
               "addr add fdff:ffff::1/128 dev oakgw0 nodad")  # keepalived, on the master
        netlink.ensure_bridge(s)                     # a restart of the master's daemon
    assert sorted(addrs(lab)) == [("10.30.255.1", 32, False, False),
                                  ("fdff:ffff::1", 128, True, False)]
    link = json.loads(lab.run("gateway", "ip", "-j", "link", "show", "oakgw0").stdout)[0]
    assert "UP" in link["flags"]


def test_a_name_taken_by_another_kind_of_link_is_refused(lab):
    lab.ip("gateway", "link add oakgw0 type veth peer name oakgw1")
    with lab.inside("gateway"), pytest.raises(netlink.NetlinkFailed) as err:
        netlink.ensure_bridge(settings())
    assert "oakgw0 exists and is not a bridge" in err.value.message
    with lab.inside("gateway"):
        assert netlink.remove_bridge(settings()) is False  # not ours: left alone
    assert addrs(lab) == []


def test_remove_bridge(lab):
    with lab.inside("gateway"):
        netlink.ensure_bridge(settings(bridge_interface="oakgw9"))
        assert netlink.remove_bridge(settings(bridge_interface="oakgw9")) is True
        assert netlink.remove_bridge(settings(bridge_interface="oakgw9")) is False
    assert subprocess.run(L.Lab.argv(lab, "gateway", "ip", "link", "show", "oakgw9"),
                          capture_output=True).returncode != 0


def test_readiness_problems(lab):
    s = settings()
    with lab.inside("gateway"):
        assert netlink.readiness_problems(s) == {}
        lab.ip("gateway", "route del fdff::/16 dev goProxyTun")
        problems = netlink.readiness_problems(s)
        assert list(problems) == ["route fdff::/16"]
        assert "routed through pub0, not through goProxyTun" in problems["route fdff::/16"]
        lab.ip("gateway", "route add fdff::/16 dev goProxyTun")
        lab.sysctl("gateway", "net.ipv4.ip_forward=0")
        assert list(netlink.readiness_problems(s)) == ["forwarding_ipv4"]
        lab.sysctl("gateway", "net.ipv4.ip_forward=1")
        lab.ip("gateway", "link set goProxyTun down")
        problems = netlink.readiness_problems(s)
        assert "tunnel" in problems and "route 10.30.0.0/16" in problems
        lab.ip("gateway", "link del goProxyTun")
        problems = netlink.readiness_problems(s)
        assert problems["tunnel"] == "the tunnel interface goProxyTun does not exist"
        assert set(problems) == {"tunnel", "route 10.30.0.0/16", "route fdff::/16"}


def test_public_addresses_come_from_the_default_route_interface(lab):
    with lab.inside("gateway"):
        assert netlink.default_interfaces() == ["pub0"]
        assert netlink.public_addresses(settings()) == {"ipv4": L.GATEWAY_V4,
                                                        "ipv6": L.GATEWAY_V6}
        assert netlink.public_addresses(settings(public_interfaces=["goProxyTun"])) == {}
