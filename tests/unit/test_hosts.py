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
