"""Rendering desired state as nft text, and the kernel-vs-desired diff. Pure."""

import ipaddress

from hypothesis import given, strategies as st

from gw.core import ruleset
from gw.core.config import parse_config
from gw.core.exposure import Exposure
from gw.kernel.firewall import compute_diff, parse_listing

SETTINGS = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1"},
                         "api": {"allowed_sources": ["10.30.0.0/16", "10.30.1.0/24",
                                                     "127.0.0.1/32", "fdff::/16"]}})
E4 = Exposure(8080, "tcp", ipaddress.ip_address("10.30.0.1"), 80)
E6 = Exposure(8080, "tcp", ipaddress.ip_address("fdff:2000::1"), 80, "svc")
U4 = Exposure(53, "udp", ipaddress.ip_address("10.30.0.2"), 5353)


def test_elements():
    assert ruleset.element(E4) == "tcp . 8080 : 10.30.0.1 . 80"
    assert ruleset.element(E6) == "tcp . 8080 : fdff:2000::1 . 80"
    assert ruleset.add_elements([E4, U4, E6]) == [
        "add element inet oakestra_gw expose_v4 { tcp . 8080 : 10.30.0.1 . 80, "
        "udp . 53 : 10.30.0.2 . 5353 }",
        "add element inet oakestra_gw expose_v6 { tcp . 8080 : fdff:2000::1 . 80 }"]
    assert [ruleset.script(tuple(ruleset.deletes([U4])))] == [
        "delete element inet oakestra_gw expose_v4 { udp . 53 }"]


def test_change_deletes_what_is_present_before_adding():
    assert ruleset.script(ruleset.change_tx(add=[E4], remove=[U4])).splitlines() == [
        "delete element inet oakestra_gw expose_v4 { udp . 53 }",
        "add element inet oakestra_gw expose_v4 { tcp . 8080 : 10.30.0.1 . 80 }"]
    # after drift: the kernel holds a stale 8080 and no 53
    assert ruleset.script(ruleset.change_tx(add=[E4], remove=[U4], present={E4.key})).splitlines() == [
        "delete element inet oakestra_gw expose_v4 { tcp . 8080 }",
        "add element inet oakestra_gw expose_v4 { tcp . 8080 : 10.30.0.1 . 80 }"]
    assert ruleset.script(ruleset.change_tx()) == ""


def test_variables_merge_overlapping_sources_and_keep_loopback():
    v = ruleset.skeleton_vars(SETTINGS)
    assert v["api_allow_v4"] == "{ 10.30.0.0/16, 127.0.0.0/8 }"
    assert v["api_allow_v6"] == "{ ::1/128, fdff::/16 }"
    assert v["tunnel_if"] == '"goProxyTun"' and v["internal_ipv4"] == "10.30.255.1"


def test_service_ranges_are_variables_and_a_family_without_one_matches_nothing():
    v = ruleset.skeleton_vars(SETTINGS)
    assert (v["service_v4"], v["service_v6"]) == ("{ 0.0.0.0/32, 10.30.0.0/16 }",
                                                  "{ ::/128, fdff::/16 }")
    v4_only = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                        "internal_ipv6": "fdff::ffff:1",
                                        "service_ranges": ["10.30.0.0/16"]}})
    assert ruleset.skeleton_vars(v4_only)["service_v6"] == "{ ::/128 }"


def _egress(**egress):
    return parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1"}, "egress": egress})


def test_egress_variables_nat_the_sources_out_of_the_public_interfaces():
    v = ruleset.skeleton_vars(_egress(enabled=True, deny_ports=["25/tcp", "53/udp", "25/tcp"],
                                      deny_destinations=["192.0.2.0/24", "2001:db8::/32"],
                                      max_connections_per_source=7), ["eth0", "eth1"])
    assert v["public_if"] == '{ "eth0", "eth1" }'
    assert (v["egress_src_v4"], v["egress_src_v6"]) == ("{ 0.0.0.0/32, 10.16.0.0/12 }",
                                                        "{ ::/128, fc00::/7 }")
    assert (v["egress_deny_v4"], v["egress_deny_v6"]) == ("{ 0.0.0.0/32, 192.0.2.0/24 }",
                                                          "{ ::/128, 2001:db8::/32 }")
    assert v["egress_deny_ports"] == "{ tcp . 25, udp . 53 }"
    assert ruleset.cap_rules(v) == [
        "add rule inet oakestra_gw egress_cap add @egress_conns_v4 { ip saddr ct count over 7 } "
        "counter name egress_drop_cap drop",
        "add rule inet oakestra_gw egress_cap add @egress_conns_v6 { ip6 saddr ct count over 7 } "
        "counter name egress_drop_cap drop"]
    # Configured public interfaces win over the default route's.
    configured = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                           "internal_ipv6": "fdff::ffff:1",
                                           "public_interfaces": ["pub0"]},
                               "egress": {"enabled": True}})
    assert ruleset.skeleton_vars(configured, ["eth0"])["public_if"] == '{ "pub0" }'
    assert ruleset.egress_status(configured, ["eth0"]) == {"enabled": True,
                                                           "interfaces": ["pub0"]}


def test_egress_off_or_without_a_public_interface_matches_nothing():
    for settings, interfaces in ((_egress(enabled=False), ["eth0"]), (_egress(enabled=True), [])):
        v = ruleset.skeleton_vars(settings, interfaces)
        assert (v["egress_src_v4"], v["egress_src_v6"]) == ("{ 0.0.0.0/32 }", "{ ::/128 }")
        assert ruleset.egress_status(settings, interfaces) == {"enabled": False,
                                                               "interfaces": []}
    assert ruleset.skeleton_vars(_egress(enabled=True), [])["public_if"] == '{ "lo" }'
    assert ruleset.skeleton_vars(_egress())["egress_deny_ports"] == "{ tcp . 0 }"


def test_load_replaces_only_our_table_in_one_script():
    text = ruleset.script(ruleset.load_tx(ruleset.skeleton_vars(SETTINGS), [E4, E6]))
    lines = text.splitlines()
    assert lines[-2:] == ruleset.add_elements([E4, E6])
    assert "table inet oakestra_gw" in lines and "delete table inet oakestra_gw" in lines
    assert all(" table " not in line or "oakestra_gw" in line for line in lines)
    assert "flush ruleset" not in text


def test_render_is_a_self_contained_script():
    text = ruleset.render(SETTINGS, [E4])
    assert text.startswith("#!/usr/sbin/nft -f\nredefine tunnel_if = \"goProxyTun\"")
    assert "chain prerouting" in text and "add element inet oakestra_gw expose_v4" in text
    # No include directive (a word in a comment is fine): the script stands alone.
    assert not [line for line in text.splitlines() if line.lstrip().startswith("include ")]


exposures = st.builds(
    Exposure, st.integers(1, 65535), st.sampled_from(["tcp", "udp"]),
    st.one_of(st.integers(1, 2**16 - 1).map(lambda n: ipaddress.ip_address("10.30.0.0") + n),
              st.integers(1, 2**64).map(lambda n: ipaddress.ip_address("fdff::") + n)),
    st.integers(1, 65535))


def _listing(elements):
    """What `nft -j list table` prints for these elements."""
    maps = {"ipv4": [], "ipv6": []}
    for e in elements:
        maps[e.family].append([{"concat": [e.protocol, e.exposed_port]},
                               {"concat": [str(e.service_ip), e.service_port]}])
    return {"nftables": [{"metainfo": {}}] + [
        {"map": {"family": "inet", "table": "oakestra_gw", "name": ruleset.MAPS[f],
                 **({"elem": elems} if elems else {})}} for f, elems in maps.items()]}


@given(st.lists(exposures, max_size=30), st.lists(exposures, max_size=30))
def test_diff_matches_a_model(desired, actual):
    desired = list({e.key: e for e in desired}.values())
    actual = list({e.key: e for e in actual}.values())
    kernel = parse_listing(_listing(actual)).elements
    assert kernel == {e.key: e.target for e in actual}
    diff = compute_diff(desired, kernel)
    want, have = {e.key: e for e in desired}, {e.key: e for e in actual}
    assert {e.key for e in diff.missing} == want.keys() - have.keys()
    assert set(diff.unexpected) == have.keys() - want.keys()
    assert {e.key for e in diff.wrong} == {k for k in want.keys() & have.keys()
                                           if want[k].target != have[k].target}
    assert bool(diff) == (want.keys() != have.keys() or bool(diff.wrong))


def test_foreign_element_shapes_make_the_listing_unreadable_not_a_crash():
    listing = _listing([E4])
    listing["nftables"][1]["map"]["elem"].append(
        [{"elem": {"val": {"concat": ["udp", 81]}, "comment": "x"}},
         {"concat": ["10.30.0.1", 80]}])
    parsed = parse_listing(listing)
    assert parsed.unreadable and parsed.elements == {E4.key: E4.target}


def test_missing_table():
    diff = compute_diff([E4], parse_listing({"nftables": [{"metainfo": {}}]}))
    assert diff.table_missing and diff.missing == [E4] and diff.summary() == "our table is missing"
