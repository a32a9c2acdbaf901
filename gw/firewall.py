"""Our nftables table: load the skeleton, apply changes as map-element transactions, read back
what the kernel holds and tell how it differs from what it should hold."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from . import ruleset
from .errors import KernelRefused
from .exposure import Exposure, Key
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

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong or self.table_missing
                    or self.chains_changed)

    def summary(self) -> str:
        if self.table_missing:
            return "our table is missing"
        parts = [f"{len(v)} {name}" for name, v in
                 (("missing", self.missing), ("unexpected", self.unexpected),
                  ("with a wrong target", self.wrong)) if v]
        if self.chains_changed:
            parts.append("chains edited")
        return ", ".join(parts) or "in sync"


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


def parse_listing(listing: dict) -> dict[Key, Target] | None:
    """Pure: the maps' elements from `nft -j list table` output; None when the table is gone."""
    elements: dict[Key, Target] = {}
    seen_map = False
    for item in listing.get("nftables", []):
        m = item.get("map")
        if not m or m.get("name") not in ruleset.MAPS.values():
            continue
        seen_map = True
        family = "ipv4" if m["name"] == ruleset.MAPS["ipv4"] else "ipv6"
        for key, value in m.get("elem", []):
            proto, port = key["concat"]
            ip, service_port = value["concat"]
            elements[(family, proto, int(port))] = (ipaddress.ip_address(ip), int(service_port))
    return elements if seen_map else None


class Firewall:
    def __init__(self, session: NftSession, variables: dict[str, str], skeleton=None,
                 observe=None):
        self.session = session
        self.variables = variables  # the skeleton's $names (ruleset.skeleton_vars)
        self.skeleton = skeleton or ruleset.skeleton_path()
        # observe(kind, seconds, ok): where metrics hook in, without the firewall knowing them.
        self._observe = observe or (lambda kind, seconds, ok: None)

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
        self._chains_loaded = self.chains()

    _chains_loaded: dict | None = None

    def chains(self) -> dict[str, list]:
        """Our chains' rules as the kernel lists them (no map elements: cheap at any size)."""
        listing = self.session.run_json(f"list chains {ruleset.FAMILY}")
        names = [c["chain"]["name"] for c in listing["nftables"]
                 if "chain" in c and c["chain"]["table"] == ruleset.TABLE_NAME]
        rules = {}
        for name in names:
            out = self.session.run_json(f"list chain {ruleset.TABLE} {name}")
            rules[name] = [{k: v for k, v in r["rule"].items() if k != "handle"}
                           for r in out["nftables"] if "rule" in r]
        return rules

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
        """Which of these keys the kernel's maps hold: one cheap lookup each, no listing."""
        found = set()
        for family, protocol, port in keys:
            try:
                self.session.run(f"get element {ruleset.TABLE} {ruleset.MAPS[family]} "
                                 f"{{ {protocol} . {port} }}")
            except KernelRefused:
                continue
            found.add((family, protocol, port))
        return found

    def read(self) -> dict[Key, Target] | None:
        """What the kernel holds (None: no table). Costs ~1 s at 50k: never on a request path."""
        try:
            listing = self.session.run_json(f"list table {ruleset.TABLE}")
        except KernelRefused as exc:
            if "No such file or directory" in exc.message:
                return None
            raise
        return parse_listing(listing)

    def diff(self, desired: Iterable[Exposure]) -> Diff:
        diff = compute_diff(desired, self.read())
        if not diff.table_missing and self._chains_loaded is not None:
            diff.chains_changed = self.chains() != self._chains_loaded
        return diff

    def remove_table(self) -> bool:
        """Delete our table (teardown). Returns whether it existed."""
        existed = self.read() is not None
        self.session.run(f"table {ruleset.TABLE}\ndelete table {ruleset.TABLE}")
        return existed
