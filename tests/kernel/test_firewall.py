"""The firewall driver against the real kernel, in the test run's private network namespace."""

import ipaddress
import subprocess

import pytest

from gw.core import ruleset
from gw.core.config import parse_config
from gw.core.errors import KernelRefused
from gw.core.exposure import Exposure
from gw.kernel.firewall import Firewall, teardown
from gw.kernel.nft import NftSession, NoSuchObject
from tests import oracle

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_table")]

SETTINGS = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1"}})


def ex(port, ip, service_port=80, proto="tcp"):
    return Exposure(port, proto, ipaddress.ip_address(ip), service_port)


MIXED = [ex(8080, "10.30.0.1"), ex(8080, "fdff:2000::1"), ex(53, "10.30.0.2", 5353, "udp"),
         ex(53, "fdff:2000::2", 53, "udp")]


@pytest.fixture
def fw():
    return Firewall(NftSession(), ruleset.skeleton_vars(SETTINGS))


def nft(*args):
    return subprocess.run(["nft", *args], check=True, capture_output=True, text=True).stdout


def kernel_elements():
    """Read with the nft tool, independently of the code under test (tests/oracle.py)."""
    return oracle.read()


def as_elements(exposures):
    return {(e.family, e.protocol, e.exposed_port, str(e.service_ip), e.service_port)
            for e in exposures}


def test_load_then_read_back(fw):
    assert fw.read() is None
    fw.load(MIXED)
    assert kernel_elements() == as_elements(MIXED)
    assert fw.read() == {e.key: e.target for e in MIXED}
    assert not fw.diff(MIXED)


def test_changes_are_element_transactions(fw):
    fw.load([])
    chains_before = nft("list", "chain", "inet", "oakestra_gw", "expose")
    fw.apply(add=MIXED)
    assert kernel_elements() == as_elements(MIXED)
    fw.apply(remove=MIXED[:2])
    assert kernel_elements() == as_elements(MIXED[2:])
    assert nft("list", "chain", "inet", "oakestra_gw", "expose") == chains_before


def test_apply_converges_whatever_the_kernel_holds(fw):
    fw.load([ex(8080, "10.30.0.9"), ex(9, "10.30.0.9")])  # a stale target for 8080
    fw.apply(add=[MIXED[0]], remove=[MIXED[2]])  # MIXED[2] is not there at all
    assert kernel_elements() == as_elements([MIXED[0], ex(9, "10.30.0.9")])
    assert fw.present([MIXED[0].key, MIXED[2].key, MIXED[1].key]) == {MIXED[0].key}


def test_load_repairs_tampering_and_reports_it(fw):
    fw.load(MIXED)
    nft("flush", "chain", "inet", "oakestra_gw", "prerouting")
    nft("delete", "element", "inet", "oakestra_gw", "expose_v4", "{ tcp . 8080 }")
    nft("add", "element", "inet", "oakestra_gw", "expose_v6", "{ udp . 9 : fdff::9 . 9 }")
    diff = fw.diff(MIXED)
    assert [e.key for e in diff.missing] == [("ipv4", "tcp", 8080)]
    assert diff.unexpected == [("ipv6", "udp", 9)]
    fw.load(MIXED)
    assert kernel_elements() == as_elements(MIXED)
    assert "jump expose" in nft("list", "chain", "inet", "oakestra_gw", "prerouting")


def test_other_tables_are_never_touched(fw):
    subprocess.run(["nft", "-f", "-"], input="table inet neighbour {\n chain c {\n"
                   " type filter hook forward priority 0; policy accept;\n"
                   " tcp dport 8080 counter drop\n }\n}\n", text=True, check=True)
    before = nft("list", "table", "inet", "neighbour")
    fw.load(MIXED)
    fw.apply(remove=MIXED)
    assert teardown(fw.session) is True
    assert teardown(fw.session) is False
    assert nft("list", "table", "inet", "neighbour") == before
    nft("delete", "table", "inet", "neighbour")


def test_refusals_carry_nfts_words_and_change_nothing(fw):
    fw.load(MIXED[:1])
    with pytest.raises(KernelRefused) as info:
        fw.session.run("add element inet oakestra_gw expose_v4 { udp . 1 : 10.30.0.1 . 1 }\n"
                       "add element inet oakestra_gw no_such_map { tcp . 1 : 10.30.0.1 . 1 }")
    assert "No such file or directory" in info.value.message
    assert isinstance(info.value, NoSuchObject)  # the refusal code branches on
    assert kernel_elements() == as_elements(MIXED[:1])


def test_internal_addresses_and_api_port_in_the_rules(fw):
    fw.load([])
    text = nft("list", "table", "inet", "oakestra_gw")
    assert "snat ip to 10.30.255.1" in text and "snat ip6 to fdff::ffff:1" in text
    assert "tcp dport != 11022 accept" in text
    assert "maxseg size set rt mtu" in text


def test_edited_chains_and_foreign_elements_count_as_drift(fw):
    fw.load(MIXED)
    assert not fw.diff(MIXED)
    nft("add", "element", "inet", "oakestra_gw", "expose_v4",
        '{ udp . 81 comment "x" : 10.30.0.1 . 80 }')
    assert fw.diff(MIXED).unreadable
    fw.load(MIXED)
    assert not fw.diff(MIXED)
    nft("insert", "rule", "inet", "oakestra_gw", "forward", "counter", "accept")
    diff = fw.diff(MIXED)
    assert diff.chains_changed == ["forward"] and diff.summary() == "chains edited (forward)"
    fw.load(MIXED)
    assert not fw.diff(MIXED)


def test_chains_reference_is_the_skeleton_alone_and_equals_the_live_table(fw, monkeypatch):
    """The reference drift is judged by comes from a throw-away namespace (the skeleton with
    no elements), never from our table; it equals what the live table's chains read, so an
    untouched table is in sync and an edited chain is caught. Where no namespace can be made,
    the live table right after the load is the reference instead."""
    read = []
    real_rules = fw.session.chain_rules
    monkeypatch.setattr(fw.session, "chain_rules", lambda: read.append(1) or real_rules())
    fw.load(MIXED)
    assert read == []
    assert fw._chains_loaded == real_rules() and set(real_rules()) >= {"prerouting", "expose"}
    nft("insert", "rule", "inet", "oakestra_gw", "output", "counter", "accept")
    assert fw.diff(MIXED).chains_changed == ["output"]

    def refused(tx):
        raise KernelRefused("unshare: unshare failed: Operation not permitted")

    other = Firewall(fw.session, dict(fw.variables, api_port="11023"))
    monkeypatch.setattr(fw.session, "reference", refused)
    read.clear()
    other.load(MIXED)
    assert read == [1]  # the live table, right after the load
    assert not other.diff(MIXED)
