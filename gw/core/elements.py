"""Our maps' elements as nf_tables netlink carries them (gw/kernel/nfnl.py reads them). Pure:
bytes in, the exposures' keys and targets out, in the shape `ruleset.parse_listing` gives
for nft's JSON listing of the same map.

An element of a GETSETELEM dump is an NFTA_LIST_ELEM nest holding NFTA_SET_ELEM_KEY and
NFTA_SET_ELEM_DATA nests, each with one NFTA_DATA_VALUE. Each field of a concatenation is
padded to 4 bytes: the key is l4proto (1 byte) . port (2, network order), the data the
service address . port. Anything else on an element (a comment, a timeout, an expiration,
flags such as an interval's end) is something we never write: the map is then unreadable.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable, Iterator

from .exposure import Key
from .ruleset import PROTOCOL_NUMBERS, Target

Raw = tuple  # (key bytes, data bytes, {attribute type: value} of anything else)

NLA = struct.Struct("=HH")  # an attribute's length and type, host order
NLA_TYPE_MASK = 0x3FFF      # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS = 1, 2, 3
NFTA_DATA_VALUE = 1

KEY_LEN = 8
DATA_LEN = {"ipv4": 8, "ipv6": 20}
ADDRESS = {"ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address}
# The two protocols exposures name (nft's JSON names them; any other stays its number).
PROTOCOL_NAMES = {int(number): name for number, name in PROTOCOL_NUMBERS.items()}


def attributes(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of each netlink attribute in buf[start:end]."""
    while start + NLA.size <= end:
        length, kind = NLA.unpack_from(buf, start)
        if length < NLA.size or start + length > end:
            return
        yield kind & NLA_TYPE_MASK, start + NLA.size, start + length
        start += (length + 3) & ~3


def attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute: its header, the value, and the padding to 4 bytes."""
    length = NLA.size + len(value)
    return NLA.pack(length, kind) + value + b"\0" * (-length % 4)


def raw_elements(nest: bytes) -> Iterator[Raw]:
    """Each element of an NFTA_SET_ELEM_LIST_ELEMENTS nest's value, attribute by attribute."""
    for kind, start, end in attributes(nest, 0, len(nest)):
        if kind != NFTA_LIST_ELEM:
            continue
        key = data = None
        extra = {}
        for akind, astart, aend in attributes(nest, start, end):
            values = [nest[s:e] for k, s, e in attributes(nest, astart, aend)
                      if k == NFTA_DATA_VALUE]
            if akind == NFTA_SET_ELEM_KEY and key is None and len(values) == 1:
                key = values[0]
            elif akind == NFTA_SET_ELEM_DATA and data is None and len(values) == 1:
                data = values[0]
            else:
                extra[akind] = nest[astart:aend]
        yield key or b"", data or b"", extra


def decode(family: str, raw: Iterable[Raw]) -> tuple[dict[Key, Target], bool]:
    """(key -> target, unreadable) of one family's map from its raw elements: (family,
    protocol, port) -> (address, port), a protocol other than tcp/udp as its number."""
    elements: dict[Key, Target] = {}
    unreadable = False
    address, data_len = ADDRESS[family], DATA_LEN[family]
    split = data_len - 4
    for key, data, extra in raw:
        if (any(kind != NFTA_SET_ELEM_FLAGS or value.strip(b"\0")
                for kind, value in extra.items())
                or len(key) != KEY_LEN or len(data) != data_len):
            unreadable = True
            continue
        elements[(family, PROTOCOL_NAMES.get(key[0], key[0]), (key[4] << 8) | key[5])] = (
            address(data[:split]), (data[split] << 8) | data[split + 1])
    return elements, unreadable


# Ours, byte for byte: the element nest, the key nest and its value, the data nest and its
# value (36 bytes for IPv4, 48 for IPv6), read with one struct; the headers are checked
# column by column (every element's byte at one offset at once), the values unpacked
# big-endian (ports are in network order; the skipped headers' order does not matter).
_LAYOUT = {family: ">12xB3xH2x8x%dsH2x" % (n - 4) for family, n in DATA_LEN.items()}


def _headers(family: str, nested: int) -> dict[int, int]:
    """Offset -> the byte every one of our elements has there."""
    size = struct.calcsize(_LAYOUT[family])
    value = NLA.size + KEY_LEN
    heads = NLA.pack(size, NFTA_LIST_ELEM | nested) + \
        NLA.pack(NLA.size + value, NFTA_SET_ELEM_KEY | nested) + NLA.pack(value, NFTA_DATA_VALUE)
    data = NLA.size + DATA_LEN[family]
    tail = NLA.pack(NLA.size + data, NFTA_SET_ELEM_DATA | nested) + \
        NLA.pack(data, NFTA_DATA_VALUE)
    return {**dict(enumerate(heads)), **{20 + i: b for i, b in enumerate(tail)}}


_FIXED = {family: [_headers(family, nested) for nested in (0x8000, 0)] for family in DATA_LEN}


def _uniform(family: str, nest: bytes) -> bool:
    """Whether the nest is nothing but our elements, each in the fixed layout."""
    size = struct.calcsize(_LAYOUT[family])
    count, rest = divmod(len(nest), size)
    return not rest and any(all(nest[at::size] == bytes((byte,)) * count
                                for at, byte in headers.items())
                            for headers in _FIXED[family])


def decode_nests(family: str, nests: Iterable[bytes]) -> tuple[dict[Key, Target], bool]:
    """`decode` of the elements of NFTA_SET_ELEM_LIST_ELEMENTS nests' values (one per dump
    message): a nest of nothing but our elements is read in one pass; any other attribute by
    attribute."""
    elements: dict[Key, Target] = {}
    unreadable = False
    address, names, layout = ADDRESS[family], PROTOCOL_NAMES, _LAYOUT[family]
    for nest in nests:
        if _uniform(family, nest):
            elements.update({(family, names.get(proto, proto), port): (address(ip), sport)
                             for proto, port, ip, sport in struct.iter_unpack(layout, nest)})
        else:
            found, bad = decode(family, raw_elements(nest))
            elements.update(found)
            unreadable |= bad
    return elements, unreadable
