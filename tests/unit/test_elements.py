"""The map elements' netlink decoder (gw/core/elements.py) against a tiny encoder written here
from the kernel's layout (include/uapi/linux/netfilter/nf_tables.h), and against what
`parse_listing` reads from nft's JSON of the same elements. What nft itself wrote is compared
in tests/kernel/test_nfnl.py."""

import ipaddress
import struct

from hypothesis import given, strategies as st

from gw.core import elements, ruleset
from gw.core.exposure import Exposure

NESTED = 0x8000
# NFTA_SET_ELEM_*: what an element may carry besides its key and data.
FLAGS, TIMEOUT, EXPIRATION, USERDATA, EXPR, OBJREF, KEY_END = 3, 4, 5, 6, 7, 9, 10


def attr(kind, value, nested=0):
    length = 4 + len(value)
    return struct.pack("=HH", length, kind | nested) + value + bytes(-length % 4)


def element(key, data, extra=(), nested=0):
    """An NFTA_LIST_ELEM: NFTA_SET_ELEM_KEY and _DATA, each an NFTA_DATA_VALUE."""
    body = attr(1, attr(1, key), nested) + attr(2, attr(1, data), nested)
    return attr(1, body + b"".join(attr(k, v) for k, v in extra), nested)


def key_bytes(proto: int, port: int) -> bytes:
    return bytes([proto, 0, 0, 0]) + port.to_bytes(2, "big") + bytes(2)


def data_bytes(ip, port: int) -> bytes:
    return ip.packed + port.to_bytes(2, "big") + bytes(2)


PROTOS = {"tcp": 6, "udp": 17}
ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
ports = st.integers(1, 65535)
protocols = st.sampled_from(["tcp", "udp"])


def exposures(ips):
    return st.lists(st.builds(Exposure, ports, protocols, ips, ports), max_size=60,
                    unique_by=lambda e: e.key)


def nests_of(es, cuts, nested=0):
    """The elements split into dump messages' nests at the given points."""
    encoded = [element(key_bytes(PROTOS[e.protocol], e.exposed_port),
                       data_bytes(e.service_ip, e.service_port), nested=nested) for e in es]
    points = sorted({0, len(encoded), *(c % (len(encoded) + 1) for c in cuts)})
    return [b"".join(encoded[a:b]) for a, b in zip(points, points[1:])]


def as_nft_lists(family, es):
    return ruleset.parse_listing({"nftables": [{"map": {
        "name": ruleset.MAPS[family], "elem": [ruleset.element_json(e) for e in es]}}]})


@given(st.sampled_from([("ipv4", ipv4), ("ipv6", ipv6)]).flatmap(
    lambda f: st.tuples(st.just(f[0]), exposures(f[1]))),
    st.lists(st.integers(0, 100), max_size=4), st.sampled_from([0, NESTED]))
def test_our_elements_read_as_parse_listing_reads_nfts_json_of_them(fam_es, cuts, nested):
    family, es = fam_es
    nests = nests_of(es, cuts, nested)
    found, unreadable = elements.decode_nests(family, nests)
    assert not unreadable
    assert found == {e.key: e.target for e in es} == as_nft_lists(family, es).elements
    # The one-pass read and the attribute-by-attribute one agree.
    assert elements.decode(family, (r for n in nests for r in elements.raw_elements(n))) == (
        found, False)


EXTRAS = st.sampled_from([
    (USERDATA, b"\x00\x01x\x00"),            # a comment
    (TIMEOUT, struct.pack(">Q", 30000)),
    (EXPIRATION, struct.pack(">Q", 29000)),
    (FLAGS, struct.pack(">I", 1)),           # NFT_SET_ELEM_INTERVAL_END
    (KEY_END, attr(1, key_bytes(6, 90))),
    (EXPR, attr(1, b"counter\x00")),
    (OBJREF, b"x\x00\x00\x00"),
])


@given(exposures(ipv4).filter(len), EXTRAS, st.integers(0, 59))
def test_an_element_in_a_shape_we_never_write_makes_the_map_unreadable(es, extra, at):
    at %= len(es)
    encoded = [element(key_bytes(PROTOS[e.protocol], e.exposed_port),
                       data_bytes(e.service_ip, e.service_port),
                       [extra] if i == at else ()) for i, e in enumerate(es)]
    found, unreadable = elements.decode_nests("ipv4", [b"".join(encoded)])
    assert unreadable
    assert found == {e.key: e.target for i, e in enumerate(es) if i != at}


def test_zero_flags_a_foreign_protocol_and_wrong_lengths():
    ip = ipaddress.ip_address("10.30.0.1")
    ours = element(key_bytes(6, 80), data_bytes(ip, 8080), [(FLAGS, bytes(4))])
    assert elements.decode_nests("ipv4", [ours]) == ({("ipv4", "tcp", 80): (ip, 8080)}, False)
    # sctp: nft lists it by number without a protocols database; not ours, so unexpected.
    sctp = element(key_bytes(132, 80), data_bytes(ip, 80))
    assert elements.decode_nests("ipv4", [sctp]) == ({("ipv4", 132, 80): (ip, 80)}, False)
    six = ipaddress.ip_address("fdff::1")
    for family, bad in (("ipv4", element(key_bytes(6, 80), data_bytes(six, 80))),
                        ("ipv6", element(key_bytes(6, 80), data_bytes(ip, 80))),
                        ("ipv4", element(key_bytes(6, 80)[:4], data_bytes(ip, 80)))):
        assert elements.decode_nests(family, [bad]) == ({}, True)
    assert elements.decode_nests("ipv4", []) == ({}, False)
    assert elements.decode_nests("ipv4", [b""]) == ({}, False)
