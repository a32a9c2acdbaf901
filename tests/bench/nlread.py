"""The firewall's whole-table reads, nft's JSON listing against the netlink dump, side by side
in one run: a full reconcile's read and judgement (`Firewall.diff`) and `present()` of a key
of each family, with the store of tests/bench/portspace.py loaded by `Firewall.load`.

    tests/run-isolated .venv/bin/python -m tests.bench.nlread [--sizes 50000,262134]

The old path is rebuilt here from what is left of it (nft's JSON listings and
`parse_listing`, kept as the tests' oracle); both judge against the same chains' reference.
The two alternate, round by round, in this process's own network namespace.
"""

from __future__ import annotations

import argparse
import sys
import time

from gw.core import ruleset
from gw.core.config import parse_config
from gw.kernel.firewall import Firewall, judge
from gw.kernel.nft import NftSession

from . import portspace
from .stats import median

SETTINGS = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1"}})


def old_diff(fw: Firewall, desired):
    """What `Firewall.diff` was: one JSON listing of the table, parsed and judged (its chains
    against themselves: the comparison costs nothing beside the listing)."""
    listing = ruleset.parse_listing(fw.session.list_table())
    return judge(desired, listing, listing.chains)


def old_present(fw: Firewall, keys):
    found = set()
    for family in {k[0] for k in keys}:
        parsed = ruleset.parse_listing(fw.session.run_json(
            f"list map {ruleset.TABLE} {ruleset.MAPS[family]}"))
        found |= set(keys) & set(parsed.elements)
    return found


def timed(f, *args):
    start = time.perf_counter()
    out = f(*args)
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.nlread")
    p.add_argument("--sizes", default=f"50000,{portspace.FULL}")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    items = portspace.port_space()
    fw = Firewall(NftSession(), ruleset.skeleton_vars(SETTINGS))
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            desired = items[:n]
            fw.load(desired)
            # A key of each family: present() reads both maps, whichever holds them.
            keys = [desired[-1].key, ("ipv6", "udp", 65535)]
            expected = {e.key for e in desired} & set(keys)
            got: dict[str, list[float]] = {k: [] for k in
                                           ("old diff", "new diff", "old present",
                                            "new present")}
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for which in order:
                    if which == "old":
                        t, d = timed(old_diff, fw, desired)
                        t2, found = timed(old_present, fw, keys)
                    else:
                        t, d = timed(fw.diff, desired)
                        t2, found = timed(fw.present, keys)
                    assert not d and found == expected, (which, d.summary(), found)
                    got[f"{which} diff"].append(t)
                    got[f"{which} present"].append(t2)
            m = {k: median(v) for k, v in got.items()}
            print(f"{n:>7} exposures, {args.rounds} rounds (median, min-max):")
            for what in ("diff", "present"):
                old, new = got[f"old {what}"], got[f"new {what}"]
                print(f"   {what:>8}: nft JSON {m[f'old {what}']:.2f} s "
                      f"({min(old):.2f}-{max(old):.2f}), netlink {m[f'new {what}']:.2f} s "
                      f"({min(new):.2f}-{max(new):.2f}), ratio "
                      f"{m[f'new {what}'] / m[f'old {what}']:.3f}", flush=True)
    finally:
        fw.session.apply((ruleset.DeleteTable(),))
        fw.session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
