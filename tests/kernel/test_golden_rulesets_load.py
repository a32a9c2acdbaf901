"""Each golden ruleset (tests/unit/golden/ruleset-*.nft, see tests/unit/test_ruleset_golden.py)
is one that nftables takes: loaded into a namespace's kernel, its table holds both maps'
elements and, on a pair, the egress NAT to the floating address."""

import json
from pathlib import Path

import pytest

from gw.core.ruleset import parse_listing
from gw.lab.netns import netns

pytestmark = pytest.mark.kernel

GOLDEN = sorted((Path(__file__).parents[1] / "unit" / "golden").glob("ruleset-*.nft"))


def test_the_golden_rulesets_exist():
    assert [p.name for p in GOLDEN] == ["ruleset-pair-egress.nft", "ruleset-single-egress.nft",
                                        "ruleset-single.nft"]


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_a_golden_ruleset_loads(path):
    with netns("oakgr") as ns:
        ns.run("nft", "-f", str(path))
        listing = json.loads(ns.run("nft", "-j", "list", "table", "inet", "oakestra_gw").stdout)
        text = ns.run("nft", "list", "chain", "inet", "oakestra_gw", "postrouting").stdout
    assert sorted(parse_listing(listing).elements) == [("ipv4", "tcp", 8080),
                                                       ("ipv6", "udp", 5353)]
    pinned = "snat ip to 198.18.0.10" in text and "snat ip6 to 2001:db8::10" in text
    assert pinned == ("pair" in path.name), text
