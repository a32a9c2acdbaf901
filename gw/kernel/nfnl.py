"""Reads of our table over nf_tables netlink, in the caller's network namespace: the elements
of one named set or map (NFT_MSG_GETSETELEM) and the rules of our chains (NFT_MSG_GETCHAIN,
NFT_MSG_GETRULE), as raw attribute bytes. The elements are decoded by gw/core/elements.py.

Why not nft: a libnftables listing of any part of our table fetches every element of every
set into its cache first (nft 1.0.6, even for one chain or a terse listing) and then prints
them; at the whole port space that is seconds for a few kilobytes of rules. A dump reads only
what is asked for. Nothing here writes: changes stay on nft (gw/kernel/nft.py).

A dump comes in parts (one per recv, up to 32 KiB each). Every part carries the ruleset
generation it was filled at (the low 16 bits, nfgenmsg.res_id) and NLM_F_DUMP_INTR when the
kernel saw a change under it; a dump whose parts disagree is read again, as nft itself
re-reads its cache when the generation moved.

    python -m gw.kernel.nfnl    # our chains' rules as JSON (NftSession.reference runs it)
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
from typing import Callable, Iterator

from ..core import ruleset
from ..core.errors import KernelRefused
from ..core.elements import NLA, attribute, attributes
from .nft import NoSuchObject, refusal

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSETELEM = 4, 7, 13
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3

NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_POSITION = 1, 2, 3, 6

_NLMSG = struct.Struct("=IHHII")   # len, type, flags, seq, pid (host order)
_NFGEN = struct.Struct("=BBH")     # family, version, res_id (big-endian generation bits)
_HEADER = _NLMSG.size + _NFGEN.size
RECV = 1 << 16                     # a dump part is at most 32 KiB
RETRIES = 20                       # dumps interrupted in a row before giving up

class Interrupted(KernelRefused):
    """The ruleset kept changing under a dump (RETRIES attempts in a row)."""


def set_elements(name: str, table: str = ruleset.TABLE_NAME,
                 on_part: Callable[[], None] | None = None) -> list[bytes]:
    """The elements of set or map `name` of `inet table`: the value of each dump message's
    NFTA_SET_ELEM_LIST_ELEMENTS nest, undecoded (gw/core/elements.py decodes them). A
    missing table or set raises NoSuchObject (ENOENT), as nft's listing does. `on_part` is
    called after each part is read (a test changes the ruleset there, mid-dump)."""
    attrs = attribute(NFTA_SET_ELEM_LIST_TABLE, _string(table)) + \
        attribute(NFTA_SET_ELEM_LIST_SET, _string(name))
    return [payload[start:end] for payload in _dump(NFT_MSG_GETSETELEM, attrs, on_part)
            for kind, start, end in attributes(payload, _NFGEN.size, len(payload))
            if kind == NFTA_SET_ELEM_LIST_ELEMENTS]


def chain_rules(table: str = ruleset.TABLE_NAME) -> dict[str, list[str]]:
    """Our chains, each with its rules in order as hex of the rule's attributes without its
    handle and position (which any reload renumbers): equal for equal loads, different for
    an edited rule. An empty dict when the table has none (or is not there: the kernel's
    chain and rule dumps do not say)."""
    chains: dict[str, list[str]] = {}
    for payload in _dump(NFT_MSG_GETCHAIN, b""):
        found = dict(_values(payload))
        if found.get(NFTA_CHAIN_TABLE) == _string(table):
            chains[_text(found[NFTA_CHAIN_NAME])] = []
    for payload in _dump(NFT_MSG_GETRULE, attribute(NFTA_RULE_TABLE, _string(table))):
        rule, kept = {}, []
        for kind, start, end in attributes(payload, _NFGEN.size, len(payload)):
            if kind in (NFTA_RULE_TABLE, NFTA_RULE_CHAIN):
                rule[kind] = payload[start:end]
            elif kind not in (NFTA_RULE_HANDLE, NFTA_RULE_POSITION):
                kept.append(payload[start - NLA.size:end].hex())
        if rule.get(NFTA_RULE_TABLE) == _string(table):
            chains.setdefault(_text(rule[NFTA_RULE_CHAIN]), []).append("".join(kept))
    return chains


# -- the dump ----------------------------------------------------------------------------

def _dump(command: int, attrs: bytes, on_part=None) -> list[bytes]:
    """The payloads (nfgenmsg onwards) of one consistent dump; re-read while a change
    interrupted it."""
    for _ in range(RETRIES):
        payloads, generations, interrupted = [], set(), False
        for flags, payload in _parts(command, attrs, on_part):
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            generations.add(payload[2:4])
            payloads.append(payload)
        if not interrupted and len(generations) <= 1:
            return payloads
    raise Interrupted(f"the ruleset kept changing under a dump ({RETRIES} attempts)")


def _parts(command: int, attrs: bytes, on_part) -> Iterator[tuple[int, bytes]]:
    """(flags, payload) of each message of one dump, to NLMSG_DONE."""
    kind = (NFNL_SUBSYS_NFTABLES << 8) | command
    seq = int.from_bytes(os.urandom(4), "little") or 1
    body = _NFGEN.pack(NFPROTO_INET, 0, 0) + attrs
    request = _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq,
                          0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.send(request)
        while True:
            data = sock.recv(RECV)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, mtype, flags, mseq, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    raise refusal(f"nf_tables dump: a message of {length} bytes")
                message = data[offset + _NLMSG.size:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue  # not an answer to this request
                if mtype == NLMSG_DONE:
                    # It carries the dump's own result: negative when it failed part-way.
                    code = struct.unpack_from("=i", message)[0] if len(message) >= 4 else 0
                    if code < 0:
                        raise _error(-code)
                    return
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", message)
                    if code == 0:
                        continue  # an acknowledgement
                    raise _error(-code)
                if mtype >> 8 == NFNL_SUBSYS_NFTABLES and len(message) >= _NFGEN.size:
                    yield flags, message
            if on_part is not None:
                on_part()


def _error(code: int) -> Exception:
    text = f"nf_tables dump: {os.strerror(code)}"
    if code == errno.ENOENT:
        return NoSuchObject(f"nftables refused: Error: {text}")
    return refusal(text)


# -- attributes --------------------------------------------------------------------------

def _values(payload: bytes) -> Iterator[tuple[int, bytes]]:
    for kind, start, end in attributes(payload, _NFGEN.size, len(payload)):
        yield kind, payload[start:end]


def _string(text: str) -> bytes:
    return text.encode() + b"\0"


def _text(value: bytes) -> str:
    return value.rstrip(b"\0").decode()


def main() -> int:
    """Our chains' rules as JSON on stdout, in this process's network namespace."""
    json.dump(chain_rules(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
