"""gw.core.hosts: where a local client connects, and a host as a URL's host part."""

import ipaddress

from hypothesis import given, strategies as st

from gw.core import hosts


def test_wildcards_are_reached_over_loopback_of_their_family():
    assert hosts.reachable("0.0.0.0") == "127.0.0.1"
    assert hosts.reachable("::") == "::1"
    assert hosts.reachable("10.30.255.1") == "10.30.255.1"
    assert hosts.reachable("gw.example") == "gw.example"


@given(st.ip_addresses())
def test_a_url_host_part_parses_back_to_the_address(address):
    part = hosts.in_url(str(address))
    if address.version == 6:
        assert part.startswith("[") and part.endswith("]")
        part = part[1:-1]
    assert ipaddress.ip_address(part) == address


def test_names_stay_as_they_are():
    assert hosts.in_url("localhost") == "localhost"


def test_loopback_hosts():
    assert hosts.is_loopback("127.0.0.1") and hosts.is_loopback("::1")
    assert hosts.is_loopback("localhost") and hosts.is_loopback("[::1]")
    assert not hosts.is_loopback("10.30.255.1") and not hosts.is_loopback("0.0.0.0")


@given(st.ip_addresses())
def test_a_floating_listener_gets_a_loopback_one_beside_it_unless_it_is_reached_so(address):
    """In a pair the node's own clients must reach this node's daemon: over the listener's own
    address when that is loopback or a wildcard (reached over loopback), else over 127.0.0.1."""
    extra = hosts.node_local_extra(str(address))
    if address.is_loopback or address.is_unspecified:
        assert extra is None
        assert hosts.is_loopback(hosts.reachable(str(address)))
    else:
        assert extra == "127.0.0.1"


def test_a_pair_asks_its_own_daemon_over_loopback():
    from gw.core.config import parse_config  # noqa: PLC0415

    ha = {"enabled": True, "public_interface": "pub0", "public_addresses": ["198.18.0.10/24"],
          "sync_interface": "sync0", "sync_address": "198.19.77.1", "sync_peer": "198.19.77.2"}
    net = {"internal_ipv4": "10.30.255.254", "internal_ipv6": "fdff::fe"}
    pair = parse_config({"network": net, "ha": ha})
    assert pair.api_host == "10.30.255.254" and pair.api_node_host == "127.0.0.1"
    assert pair.api_local_host == "127.0.0.1"
    single = parse_config({"network": net})
    assert single.api_node_host is None and single.api_local_host == "10.30.255.254"
    wildcard = parse_config({"network": net, "ha": ha, "api": {"host": "::"}})
    assert wildcard.api_node_host is None and wildcard.api_local_host == "::1"
