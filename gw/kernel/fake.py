"""An in-memory nftables that applies the firewall's transactions as the kernel does: all or
nothing, refusing what the kernel refuses (an element whose key is held with another target,
the delete of a key that is not there, anything in a table that is not there) with the same
errors. Its listings have the JSON shape of `nft -j` for our maps and its map reads the bytes
of the kernel's element dump, so the firewall's codecs read them. Chains are kept as the
skeleton's rule lines with the values filled in: equal for equal loads, which is all the
firewall asks of them. No root needed (see docs/architecture.md)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from ..core import ruleset
from ..core.elements import PROTOCOL_NAMES, attribute
from ..core.errors import KernelRefused
from .nft import EXISTS_WORDS, MISSING_WORDS, NoSuchObject, refusal

CHAIN_RE = re.compile(r"^\s*chain (\w+) \{")
VARIABLE_RE = re.compile(r"\$(\w+)")
PROCESS = "Error: Could not process rule: "


@dataclass
class FakeTable:
    maps: dict[str, dict[tuple, tuple]] = field(default_factory=dict)  # family -> key -> target
    chains: dict[str, list[str]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


class FakeNft:
    def __init__(self):
        self.table: FakeTable | None = None
        self.generation = 1  # as a fresh kernel's ruleset: each commit adds one
        self._own: set[int] = set()

    # -- the Nft protocol -----------------------------------------------------------------

    def apply(self, tx: ruleset.Transaction) -> None:
        # As nft does: first every op is checked against the table as the transaction leaves
        # it (a refusal here and nothing reaches the kernel), then the kernel tries every op
        # and reports each refusal; an op stops at its first refused element, and what came
        # before stays in the transaction for the ops after it. Any refusal and nothing is
        # committed.
        errors = _unknown_table(self.table is not None, tx)
        table = copy.deepcopy(self.table)
        for op in tx if not errors else ():
            try:
                table = _apply(table, op)
            except KernelRefused as exc:
                errors.append(exc.message)
        if errors:
            raise refusal(f"nftables refused the change: {'; '.join(errors[:3])}")
        self.table = table
        self.generation += 1
        if any(isinstance(op, (ruleset.ReplaceTable, ruleset.DeleteTable)) for op in tx):
            self._own.add(self.generation)

    def generations(self) -> tuple[int, frozenset[int]]:
        return self.generation, frozenset(self._own)

    def list_table(self, terse: bool = False) -> dict:
        table = self._need()
        items = [_map_json(family, elements, terse) for family, elements in table.maps.items()]
        for name, rules in table.chains.items():
            items.append({"chain": {**_OURS, "name": name}})
            items += [{"rule": {**_OURS, "chain": name, "expr": [{"text": r}]}} for r in rules]
        return {"nftables": items}

    def map_elements(self, family: str) -> list[bytes]:
        """As the kernel's dump gives them: one nest of every element."""
        return [b"".join(_element(k, target) for k, target in self._need().maps[family].items())]

    def chain_rules(self) -> dict[str, list]:
        return {} if self.table is None else copy.deepcopy(self.table.chains)

    def list_counters(self) -> dict:
        return {"nftables": [{"counter": {**_OURS, "name": name, "packets": packets}}
                             for name, packets in self._need().counters.items()]}

    def reference(self, tx: ruleset.Transaction) -> dict[str, list]:
        other = FakeNft()
        other.apply(tx)
        return other.chain_rules()

    def probe(self) -> None:
        pass  # commits nothing, as the session's probe leaves the ruleset as it was

    def close(self) -> None:
        pass

    # -- what a test does to the kernel behind the gateway's back (a commit not ours) -------

    def flush_map(self, family: str) -> None:
        self._need().maps[family].clear()
        self.generation += 1

    def add_rule(self, chain: str, rule: str) -> None:
        self._need().chains[chain].append(rule)
        self.generation += 1

    def _need(self) -> FakeTable:
        if self.table is None:
            raise NoSuchObject(f"nftables refused: Error: {MISSING_WORDS}")
        return self.table


_OURS = {"family": ruleset.FAMILY, "table": ruleset.TABLE_NAME}


def _map_json(family: str, elements: dict, terse: bool) -> dict:
    m = {**_OURS, "name": ruleset.MAPS[family]}
    if elements and not terse:
        m["elem"] = [[{"concat": list(k)}, {"concat": [str(ip), port]}]
                     for k, (ip, port) in elements.items()]
    return {"map": m}


def _element(key: tuple, target: tuple) -> bytes:
    """An NFTA_LIST_ELEM of a map element: key l4proto . port, data address . port, each
    field padded to 4 bytes (see gw/core/elements.py)."""
    proto, port = key
    ip, service_port = target
    number = {name: n for n, name in PROTOCOL_NAMES.items()}[proto]
    value = number.to_bytes(4, "little") + port.to_bytes(2, "big") + \
        b"\0\0"
    data = ip.packed + service_port.to_bytes(2, "big") + b"\0\0"
    return attribute(1, attribute(1, attribute(1, value)) + attribute(2, attribute(1, data)))


def _unknown_table(exists: bool, tx: ruleset.Transaction) -> list[str]:
    """nft's own check: element ops on a table that will not be there."""
    errors = []
    for op in tx:
        if isinstance(op, (ruleset.ReplaceTable, ruleset.DeleteTable)):
            exists = isinstance(op, ruleset.ReplaceTable)
        elif not exists:
            errors.append(f"Error: {MISSING_WORDS}")
    return errors


def _apply(table: FakeTable | None, op) -> FakeTable | None:
    if isinstance(op, ruleset.DeleteTable):
        return None
    if isinstance(op, ruleset.ReplaceTable):
        return _skeleton(op)
    elements = table.maps[op.family]
    if isinstance(op, ruleset.AddElements):
        for e in op.exposures:
            key = e.key[1:]
            if elements.get(key, e.target) != e.target:
                raise KernelRefused(PROCESS + EXISTS_WORDS)
            elements[key] = e.target
    elif isinstance(op, ruleset.DeleteElements):
        for _, proto, port in op.keys:
            if elements.pop((proto, port), None) is None:
                raise KernelRefused(PROCESS + MISSING_WORDS)
    else:
        raise TypeError(f"not an nft op: {op!r}")
    return table


def _skeleton(op: ruleset.ReplaceTable) -> FakeTable:
    """The table the skeleton declares: its maps and counters, and its chains' rule lines
    (not the chain's own `type ... hook` line) with the values filled in."""
    table = FakeTable(maps={family: {} for family in ruleset.MAPS})
    chain = None
    for line in op.skeleton.read_text().splitlines():
        text = line.strip()
        if m := CHAIN_RE.match(line):
            chain = table.chains.setdefault(m[1], [])
        elif text.startswith("counter ") and chain is None:
            table.counters[text.split()[1]] = 0
        elif text == "}":
            chain = None
        elif chain is not None and text and not text.startswith(("#", "type ")):
            chain.append(VARIABLE_RE.sub(lambda v: op.variables[v[1]], text))
    table.chains["egress_cap"] = [r.split(" egress_cap ", 1)[1]
                                  for r in ruleset.cap_rules(op.variables)]
    return table
