"""The maps and chains read over nf_tables netlink (gw/kernel/nfnl.py, decoded by
gw/core/elements.py) against nft's own JSON listing of the same table, in the test run's
private network namespace."""

import ipaddress
import subprocess

import pytest

from gw.core import elements, ruleset
from gw.core.exposure import Exposure
from gw.kernel import nfnl
from gw.kernel.firewall import Firewall
from gw.kernel.nft import NftSession, NoSuchObject
from tests import oracle
from tests.kernel.test_firewall import SETTINGS, as_elements, nft

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_table")]


def mixed(n: int) -> list[Exposure]:
    """n exposures over both families and protocols, each to another address and port."""
    out = []
    for i in range(n):
        family, proto = divmod(i % 4, 2)
        port = 1 + i // 4 * 7 % 65535
        ip = (ipaddress.IPv4Address("10.30.0.1") + i if family == 0
              else ipaddress.IPv6Address("fdff:2000::1") + i * 65537)
        out.append(Exposure(port, ("tcp", "udp")[proto], ip, 1 + i % 65535))
    return list({e.key: e for e in out}.values())


@pytest.fixture(scope="module")
def session():
    s = NftSession()
    yield s
    s.close()


@pytest.fixture
def fw(session):
    return Firewall(session, ruleset.skeleton_vars(SETTINGS))


def test_the_netlink_read_is_nfts_listing_element_for_element(fw):
    exposures = mixed(4000)
    fw.load(exposures)
    read = fw.read()
    listed = ruleset.parse_listing(fw.session.list_table()).elements
    assert read == listed == {e.key: e.target for e in exposures}
    assert {(*k, str(ip), port) for k, (ip, port) in read.items()} == oracle.read() \
        == as_elements(exposures)
    assert not fw.listing().unreadable and not fw.diff(exposures)
    keys = [e.key for e in exposures[::97]] + [("ipv4", "tcp", 65535), ("ipv6", "udp", 0)]
    assert fw.present(keys) == {e.key for e in exposures[::97]}


def test_a_foreign_element_makes_the_listing_unreadable_and_the_rest_is_read(fw):
    exposures = mixed(40)
    fw.load(exposures)
    nft("add", "element", "inet", "oakestra_gw", "expose_v6",
        '{ udp . 81 comment "x" : fdff::9 . 80 }')
    listing = fw.listing()
    assert listing.unreadable and ruleset.parse_listing(fw.session.list_table()).unreadable
    assert listing.elements == {e.key: e.target for e in exposures}
    assert fw.diff(exposures).summary() == "foreign elements"


def test_a_missing_table_or_map_is_no_such_object(fw):
    with pytest.raises(NoSuchObject):
        nfnl.set_elements("expose_v4")
    assert fw.read() is None and fw.present([("ipv4", "tcp", 80)]) == set()
    assert nfnl.chain_rules() == {}
    nft("add", "table", "inet", "oakestra_gw")  # someone else's empty table of our name
    with pytest.raises(NoSuchObject):
        nfnl.set_elements("expose_v4")
    assert fw.read() is None  # as nft's listing of it reads: no map, not our table
    assert ruleset.parse_listing(fw.session.list_table()) is None


def test_a_dump_the_ruleset_changed_under_is_read_again(fw, monkeypatch):
    """Mid-dump (after its first part) another process adds an element and deletes one the
    first part may have held: the dump is read again, so the result is the table after the
    change, with none lost and none twice, not a mix."""
    exposures = [e for e in mixed(6000) if e.family == "ipv6"]
    fw.load(exposures)
    dumps = []
    real_parts = nfnl._parts
    monkeypatch.setattr(nfnl, "_parts", lambda *a: dumps.append(1) or real_parts(*a))
    gone, new = exposures[0], Exposure(65535, "tcp", ipaddress.ip_address("fdff::1"), 9)
    changed = []

    def change():
        if not changed:
            changed.append(1)
            subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
                f"delete element inet oakestra_gw expose_v6 {{ tcp . {gone.exposed_port} }}\n"
                "add element inet oakestra_gw expose_v6 { tcp . 65535 : fdff::1 . 9 }\n"))

    nests = nfnl.set_elements("expose_v6", on_part=change)
    assert len(dumps) >= 2 and changed
    found, unreadable = elements.decode_nests("ipv6", nests)
    after = [e for e in exposures if e.key != gone.key] + [new]
    assert found == {e.key: e.target for e in after} and not unreadable
    assert sum(len(n) for n in nests) == 48 * len(after)  # nothing read twice


def test_chains_read_equal_the_reference_and_show_an_edit(fw):
    fw.load(mixed(20))
    rules = nfnl.chain_rules()
    assert rules == fw.session.reference((ruleset.ReplaceTable(fw.variables, fw.skeleton),))
    listed = ruleset.parse_listing(fw.session.list_table(terse=True)).chains
    assert {name: len(r) for name, r in rules.items()} == \
        {name: len(r) for name, r in listed.items()}
    nft("insert", "rule", "inet", "oakestra_gw", "mss", "counter", "accept")
    edited = nfnl.chain_rules()
    assert [n for n in rules if rules[n] != edited[n]] == ["mss"]
    assert len(edited["mss"]) == len(rules["mss"]) + 1
