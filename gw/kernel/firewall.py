"""Our nftables table: load the skeleton, apply changes as map-element transactions, read back
what the kernel holds and tell how it differs from what it should hold."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from ..core import ruleset
from ..core.errors import KernelRefused
from ..core.exposure import Exposure, Key
from .nft import NftSession

log = logging.getLogger(__name__)
Target = tuple  # (service_ip, service_port) as an ipaddress object and an int


@dataclass
class Diff:
    """Kernel versus desired state, by key."""

    missing: list[Exposure] = field(default_factory=list)      # desired, not in the kernel
    unexpected: list[Key] = field(default_factory=list)        # in the kernel, not desired
    wrong: list[Exposure] = field(default_factory=list)        # in the kernel with another target
    table_missing: bool = False
    chains_changed: bool = False  # someone edited our chains (not the maps)
    unreadable: bool = False      # elements we cannot parse (e.g. added with a comment)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong or self.table_missing
                    or self.chains_changed or self.unreadable)

    def summary(self) -> str:
        if self.table_missing:
            return "our table is missing"
        parts = [f"{len(v)} {name}" for name, v in
                 (("missing", self.missing), ("unexpected", self.unexpected),
                  ("with a wrong target", self.wrong)) if v]
        if self.chains_changed:
            parts.append("chains edited")
        if self.unreadable:
            parts.append("foreign elements")
        return ", ".join(parts) or "in sync"


@dataclass
class Listing:
    """What `nft -j list table` says of our table."""

    elements: dict[Key, Target]
    chains: dict[str, list]  # chain name -> its rules, without handles
    unreadable: bool = False


def compute_diff(desired: Iterable[Exposure], actual: dict[Key, Target] | None) -> Diff:
    """Pure: `actual` is None when the table does not exist."""
    desired = list(desired)
    if actual is None:
        return Diff(missing=desired, table_missing=True)
    wanted = {e.key: e for e in desired}
    diff = Diff()
    for key, e in wanted.items():
        if key not in actual:
            diff.missing.append(e)
        elif actual[key] != e.target:
            diff.wrong.append(e)
    diff.unexpected = sorted(k for k in actual if k not in wanted)
    return diff


# Without a protocols database (/etc/protocols: Debian's netbase, absent on a minimal system)
# libnftables lists a map key's protocol as its number.
PROTOCOL_NUMBERS = {"6": "tcp", "17": "udp"}


def parse_listing(listing: dict) -> Listing | None:
    """Pure: our maps' elements and chains' rules from `nft -j list table` output; None when
    the table is gone. Elements in a shape we never write (a comment, a timeout: someone
    else's) cannot be read as exposures: they mark the listing unreadable."""
    elements: dict[Key, Target] = {}
    chains: dict[str, list] = {}
    seen_map, unreadable = False, False
    for item in listing.get("nftables", []):
        if "rule" in item:
            rule = {k: v for k, v in item["rule"].items() if k != "handle"}
            chains.setdefault(rule.get("chain"), []).append(rule)
        elif "chain" in item:
            chains.setdefault(item["chain"]["name"], [])
        m = item.get("map")
        if not m or m.get("name") not in ruleset.MAPS.values():
            continue
        seen_map = True
        family = "ipv4" if m["name"] == ruleset.MAPS["ipv4"] else "ipv6"
        for pair in m.get("elem", []):
            try:
                (proto, port), (ip, service_port) = pair[0]["concat"], pair[1]["concat"]
                target = (ipaddress.ip_address(ip), int(service_port))
            except (KeyError, TypeError, ValueError, IndexError):
                unreadable = True
                continue
            elements[(family, PROTOCOL_NUMBERS.get(str(proto), proto), int(port))] = target
    return Listing(elements, chains, unreadable) if seen_map else None


def parse_counters(listing: dict) -> dict[str, int]:
    """Pure: packets by counter name from `nft -j list counters table ...`."""
    return {item["counter"]["name"]: int(item["counter"].get("packets", 0))
            for item in listing.get("nftables", []) if "counter" in item}


class Firewall:
    def __init__(self, session: NftSession, variables: dict[str, str], skeleton=None,
                 observe=None):
        self.session = session
        self.variables = variables  # the skeleton's $names (ruleset.skeleton_vars)
        self.skeleton = skeleton or ruleset.skeleton_path()
        # observe(kind, seconds, ok): where metrics hook in, without the firewall knowing them.
        self._observe = observe or (lambda kind, seconds, ok: None)

    def internal_addresses(self) -> set[str]:
        """The addresses our SNAT gives the flows we hand to the tunnel."""
        return {self.variables["internal_ipv4"], self.variables["internal_ipv6"]}

    def _run(self, kind: str, text: str) -> None:
        start = time.perf_counter()
        try:
            self.session.run(text)
        except KernelRefused:
            self._observe(kind, time.perf_counter() - start, False)
            raise
        self._observe(kind, time.perf_counter() - start, True)

    def load(self, exposures: Iterable[Exposure]) -> None:
        """Replace our whole table (skeleton and elements) in one transaction. Existing flows
        keep their conntrack NAT bindings, so they survive it."""
        self._run("load", ruleset.load(self.variables, exposures, self.skeleton))
        # The chains as loaded are the reference that drift is judged by. It is listed right
        # after the load, never later: the first listing after a repair follows a foreign
        # change by construction and would make a tampered chain the reference. The chains
        # depend only on the skeleton and its values, so this costs one terse listing (no
        # elements: ~0.3 s at 50k, as nft 1.0.6 still fetches them) per set of values, at
        # start and after a reload that changed them; never at a repair.
        values = (str(self.skeleton), tuple(sorted(self.variables.items())))
        if self._chains_for != values:
            terse = self.session.run_json(f"list table {ruleset.TABLE}", terse=True)
            self._chains_loaded = parse_listing(terse).chains
            self._chains_for = values

    _chains_loaded: dict | None = None
    _chains_for: tuple | None = None

    def apply(self, add: Iterable[Exposure] = (), remove: Iterable[Exposure] = ()) -> None:
        """One transaction of element deletes and adds. If the kernel disagrees with what the
        store believes it holds (drift), ask it which keys it has and retry exactly once."""
        add, remove = list(add), list(remove)
        if not add and not remove:
            return
        try:
            self._run("change", ruleset.change(add, remove))
        except KernelRefused as exc:
            if not any(err in exc.message for err in ("File exists", "No such file")):
                raise
            log.warning("the kernel's maps differ from the store (%s); retrying", exc.message)
            present = self.present(e.key for e in add + remove)
            self._run("change", ruleset.change(add, remove, present))

    def present(self, keys: Iterable[Key]) -> set[Key]:
        """Which of these keys the kernel's maps hold: one listing of each map involved."""
        keys = set(keys)
        found: set[Key] = set()
        for family in {k[0] for k in keys}:
            try:
                listing = self.session.run_json(f"list map {ruleset.TABLE} "
                                                f"{ruleset.MAPS[family]}")
            except KernelRefused:
                continue  # no table, no map: none of them is there
            parsed = parse_listing(listing)
            found |= keys & set(parsed.elements) if parsed else set()
        return found

    def listing(self) -> Listing | None:
        """What the kernel holds (None: no table). Costs ~1 s at 50k: never on a request path."""
        try:
            out = self.session.run_json(f"list table {ruleset.TABLE}")
        except KernelRefused as exc:
            if "No such file or directory" in exc.message:
                return None
            raise
        return parse_listing(out)

    def read(self) -> dict[Key, Target] | None:
        listing = self.listing()
        return None if listing is None else listing.elements

    def diff(self, desired: Iterable[Exposure]) -> Diff:
        listing = self.listing()
        diff = compute_diff(desired, None if listing is None else listing.elements)
        if listing is not None:
            diff.unreadable = listing.unreadable
            if self._chains_loaded is None:
                self._chains_loaded = listing.chains
            diff.chains_changed = listing.chains != self._chains_loaded
        return diff

    def counters(self) -> dict[str, int]:
        """Our named counters (egress connections and drops): a few lines, never the maps.
        Empty while the table is missing."""
        try:
            return parse_counters(self.session.run_json(f"list counters table {ruleset.TABLE}"))
        except KernelRefused:
            return {}

    def remove_table(self) -> bool:
        """Delete our table (teardown). Returns whether it existed."""
        existed = self.read() is not None
        self.session.run(f"table {ruleset.TABLE}\ndelete table {ruleset.TABLE}")
        return existed
