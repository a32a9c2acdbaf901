"""The whole ruleset as the gateway loads it (`ruleset.render`, what `oakestra-gw rules show`
prints), for a few configurations, against golden files: a change to the skeleton or to its
values shows in review as a diff of the ruleset itself. `UPDATE_GOLDEN=1` rewrites them. (Real
nftables loads these rulesets in the kernel and e2e tests.)"""

from __future__ import annotations

import ipaddress

import pytest

from gw.core import ruleset
from gw.core.config import parse_config
from gw.core.exposure import Exposure

from tests.unit.test_ha import PAIR, golden

NETWORK = {"internal_ipv4": "10.30.255.254", "internal_ipv6": "fdff::fe",
           "public_interfaces": ["pub0"]}
EXPOSURES = [Exposure(8080, "tcp", ipaddress.ip_address("10.30.0.1"), 80),
             Exposure(5353, "udp", ipaddress.ip_address("fdff:2000::1"), 53)]
CONFIGS = {
    # Standalone: egress off, so its NAT and policy match no source.
    "ruleset-single.nft": {"network": NETWORK},
    "ruleset-single-egress.nft": {"network": NETWORK, "egress": {"enabled": True}},
    # A pair: egress leaves with the floating public addresses.
    "ruleset-pair-egress.nft": {"network": NETWORK, "egress": {"enabled": True}, "ha": PAIR},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_rendered_ruleset_is_the_golden_file(name):
    golden(name, ruleset.render(parse_config(CONFIGS[name]), EXPOSURES))


def test_only_a_pair_pins_the_egress_source():
    single = ruleset.egress_vars(parse_config(CONFIGS["ruleset-single-egress.nft"]))
    pair = ruleset.egress_vars(parse_config(CONFIGS["ruleset-pair-egress.nft"]))
    assert single["egress_pin_if"] == '"lo"'
    assert single["egress_pin_src_v4"] == "{ 0.0.0.0/32 }"
    assert (pair["egress_pin_if"], pair["egress_pin_v4"], pair["egress_pin_v6"]) == \
        ('"pub0"', "198.18.0.10", "2001:db8::10")
    assert pair["egress_pin_src_v4"] == single["egress_src_v4"] != "{ 0.0.0.0/32 }"
    assert pair["egress_pin_src_v6"] == single["egress_src_v6"]


def test_a_pair_without_a_floating_address_of_a_family_masquerades_that_family():
    v4_only = dict(PAIR, public_addresses=["198.18.0.10/24"])
    values = ruleset.egress_vars(parse_config({"network": NETWORK, "egress": {"enabled": True},
                                               "ha": v4_only}))
    assert values["egress_pin_v4"] == "198.18.0.10"
    assert values["egress_pin_src_v6"] == "{ ::/128 }"
