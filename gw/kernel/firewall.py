"""Our nftables table: load the skeleton, apply changes as map-element transactions, read back
what the kernel holds and tell how it differs from what it should hold. Also the two things
done to the table from outside the daemon: `teardown` and `check` (`oakestra-gw teardown`,
`oakestra-gw rules diff`; see docs/cli.md)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..core import ruleset
from ..core.settings import Settings
from ..core.errors import ConfigError, KernelRefused
from ..core.exposure import Exposure, Key
from ..core.elements import decode_nests
from ..core.ruleset import Listing, Target, parse_counters, parse_listing  # noqa: F401 - re-exported
from .nft import AlreadyExists, NoSuchObject, Nft

log = logging.getLogger(__name__)


@dataclass
class Diff:
    """Kernel versus desired state, by key."""

    missing: list[Exposure] = field(default_factory=list)      # desired, not in the kernel
    unexpected: list[Key] = field(default_factory=list)        # in the kernel, not desired
    wrong: list[Exposure] = field(default_factory=list)        # in the kernel with another target
    table_missing: bool = False
    chains_changed: list[str] = field(default_factory=list)  # our chains someone edited
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
            parts.append(f"chains edited ({', '.join(self.chains_changed)})")
        if self.unreadable:
            parts.append("foreign elements")
        return ", ".join(parts) or "in sync"


def compute_diff(desired: Iterable[Exposure], actual: dict[Key, Target] | None) -> Diff:
    """Pure: `actual` is None when the table does not exist."""
    desired = list(desired)
    if actual is None:
        return Diff(missing=desired, table_missing=True)
    wanted = {e.key: e for e in desired}
    diff = Diff()
    for key, e in wanted.items():
        held = actual.get(key)
        if held is None:
            diff.missing.append(e)
        elif held != e.target:
            diff.wrong.append(e)
    diff.unexpected = sorted(k for k in actual if k not in wanted)
    return diff


def judge(desired: Iterable[Exposure], listing: Listing | None,
          chains: dict[str, list] | None) -> Diff:
    """Pure: the listing against the exposures and, when given, the chains it should have."""
    diff = compute_diff(desired, None if listing is None else listing.elements)
    if listing is not None:
        diff.unreadable = listing.unreadable
        if chains is not None:
            diff.chains_changed = sorted(name for name in chains.keys() | listing.chains.keys()
                                         if chains.get(name) != listing.chains.get(name))
    return diff


def _read_map(nft: Nft, family: str) -> tuple[dict[Key, Target], bool]:
    return decode_nests(family, nft.map_elements(family))


def _listing(nft: Nft) -> Listing | None:
    """What the kernel holds (None: no table). Reads every element: never on a request path.
    The two maps are read at once: while the kernel fills one's dump, the other's is decoded."""
    found: dict[Key, Target] = {}
    unreadable = False
    with ThreadPoolExecutor(len(ruleset.MAPS), thread_name_prefix="maps") as pool:
        reads = [pool.submit(_read_map, nft, family) for family in ruleset.MAPS]
        try:
            for read in reads:
                elements, bad = read.result()
                found.update(elements)
                unreadable |= bad
        except NoSuchObject:
            return None
    return Listing(found, nft.chain_rules(), unreadable)


def teardown(nft: Nft) -> bool:
    """Delete our table. Returns whether it existed."""
    try:
        existed = parse_listing(nft.list_table(terse=True)) is not None
    except NoSuchObject:
        existed = False
    nft.apply((ruleset.DeleteTable(),))
    return existed


def check(nft: Nft, desired: Iterable[Exposure], settings: Settings,
          default_interfaces: Iterable[str] = (), skeleton: Path | None = None) -> Diff:
    """The kernel against the stored exposures and against the skeleton rendered from the
    settings, chain by chain. Chains are not judged while the settings lack the internal
    addresses (Oakestra mode before the cluster assigned them)."""
    try:
        variables = ruleset.skeleton_vars(settings, default_interfaces)
    except ConfigError:
        chains = None
    else:
        chains = nft.reference((ruleset.ReplaceTable(variables,
                                                     skeleton or ruleset.skeleton_path()),))
    return judge(desired, _listing(nft), chains)


class Firewall:
    def __init__(self, session: Nft, variables: dict[str, str], skeleton=None,
                 observe=None):
        self.session = session
        self.variables = variables  # the skeleton's $names (ruleset.skeleton_vars)
        self.skeleton = skeleton or ruleset.skeleton_path()
        # observe(kind, seconds, ok): where metrics hook in, without the firewall knowing them.
        self._observe = observe or (lambda kind, seconds, ok: None)

    def set_variables(self, variables: dict[str, str]) -> None:
        """New skeleton values; they take effect at the next `load`."""
        self.variables = dict(variables)

    def internal_addresses(self) -> set[str]:
        """The addresses our SNAT gives the flows we hand to the tunnel."""
        return {self.variables["internal_ipv4"], self.variables["internal_ipv6"]}

    def _run(self, kind: str, tx: ruleset.Transaction) -> None:
        start = time.perf_counter()
        try:
            self.session.apply(tx)
        except KernelRefused:
            self._observe(kind, time.perf_counter() - start, False)
            raise
        self._observe(kind, time.perf_counter() - start, True)

    def load(self, exposures: Iterable[Exposure]) -> None:
        """Replace our whole table (skeleton and elements) in one transaction. Existing flows
        keep their conntrack NAT bindings, so they survive it."""
        self._run("load", ruleset.load_tx(self.variables, exposures, self.skeleton))
        # The chains as loaded are the reference that drift is judged by. They depend only on
        # the skeleton and its values, so they are taken once per set of values (at start and
        # after a reload that changed them; never at a repair) and never from a listing made
        # after a repair, which follows a foreign change by construction.
        values = (str(self.skeleton), tuple(sorted(self.variables.items())))
        if self._chains_for != values:
            self._chains_loaded = self._reference_chains()
            self._chains_for = values

    def _reference_chains(self) -> dict:
        """The skeleton alone loaded in a throw-away network namespace and read there: what
        no change made after the load can have touched. Where no namespace can be made (e.g.
        systemd's RestrictNamespaces=) our own table's chains stand in, read right after the
        load, before anything else is likely to have changed them."""
        try:
            return self.session.reference(
                (ruleset.ReplaceTable(self.variables, self.skeleton),))
        except (KernelRefused, OSError) as exc:
            log.info("chains' reference from our own table (no namespace for it: %s)", exc)
            return self.session.chain_rules()

    _chains_loaded: dict | None = None
    _chains_for: tuple | None = None

    def apply(self, add: Iterable[Exposure] = (), remove: Iterable[Exposure] = ()) -> None:
        """One transaction of element deletes and adds. If the kernel disagrees with what the
        store believes it holds (drift), ask it which keys it has and retry exactly once."""
        add, remove = list(add), list(remove)
        if not add and not remove:
            return
        try:
            self._run("change", ruleset.change_tx(add, remove))
        except (AlreadyExists, NoSuchObject) as exc:
            log.warning("the kernel's maps differ from the store (%s); retrying", exc.message)
            present = self.present(e.key for e in add + remove)
            self._run("change", ruleset.change_tx(add, remove, present))

    def present(self, keys: Iterable[Key]) -> set[Key]:
        """Which of these keys the kernel's maps hold: one read of each map involved."""
        keys = set(keys)
        found: set[Key] = set()
        for family in {k[0] for k in keys}:
            try:
                elements, _ = _read_map(self.session, family)
            except NoSuchObject:
                continue  # no table, no map: none of them is there
            found |= keys & elements.keys()
        return found

    def listing(self) -> Listing | None:
        """What the kernel holds (None: no table). Never on a request path."""
        return _listing(self.session)

    def read(self) -> dict[Key, Target] | None:
        listing = self.listing()
        return None if listing is None else listing.elements

    def diff(self, desired: Iterable[Exposure]) -> Diff:
        listing = self.listing()
        if listing is not None and self._chains_loaded is None:
            self._chains_loaded = listing.chains
        return judge(desired, listing, self._chains_loaded)

    def counters(self) -> dict[str, int]:
        """Our named counters (egress connections and drops): a few lines, never the maps.
        Empty while the table is missing."""
        try:
            return parse_counters(self.session.list_counters())
        except KernelRefused:
            return {}
