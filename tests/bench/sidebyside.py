"""The port space's figures of two source trees, alternated in one run (the same machine
minutes apart is noise): cold start, reconcile, restart with the table in place and RSS, as
tests/bench/portspace.py measures them, the daemon of each tree in turn.

    git archive BASE | tar -x -C /tmp/base
    tests/run-isolated .venv/bin/python -m tests.bench.sidebyside /tmp/base . [--sizes 262134]

The daemon runs with PYTHONPATH set to the tree; the lab (this process) is the current one.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from . import portspace
from .controlplane import BenchDaemon, drop_table
from .profile import _interrupt
from .topology import BenchLab


def measure(daemon: BenchDaemon, tree: Path) -> dict:
    wrap = ["env", f"PYTHONPATH={tree}"]
    p = {"cold_s": daemon.start_timed(timeout=300, wrap=wrap)["ready_s"]}
    p.update(daemon.rss())
    p["reconcile_s"] = portspace.reconcile_s(daemon)
    p["rss_after_reconcile"] = daemon.rss()["rss_mib"]
    daemon.stop()
    p["restart_s"] = daemon.start_timed(timeout=300, wrap=wrap)["ready_s"]
    p["restart_rss"] = daemon.rss()["rss_mib"]
    p["log"] = [line for line in daemon.log().splitlines() if "drift" in line]
    daemon.stop()
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.sidebyside")
    p.add_argument("trees", nargs="+", type=Path)
    p.add_argument("--sizes", default=str(portspace.FULL))
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    trees = [t.resolve() for t in args.trees]
    items = portspace.port_space()
    with BenchLab(bridge=False) as lab:
        daemon = BenchDaemon(lab)
        try:
            for n in [int(x) for x in args.sizes.split(",")]:
                store = lab.tmp / "stores" / str(n)
                portspace.write_store(store / "exposures.json", items[:n])
                for r in range(args.rounds):
                    # The order flips from round to round.
                    for tree in trees if r % 2 == 0 else list(reversed(trees)):
                        state = lab.tmp / "state"
                        shutil.rmtree(state, ignore_errors=True)
                        shutil.copytree(store, state)
                        drop_table(lab)
                        m = measure(daemon, tree)
                        print(f"{n:>7} {tree}: cold {m['cold_s']:.2f} s, reconcile "
                              f"{m['reconcile_s']:.2f} s, restart {m['restart_s']:.2f} s, "
                              f"RSS {m['rss_mib']:.0f} MiB (peak {m['hwm_mib']:.0f}), after "
                              f"the reconcile {m['rss_after_reconcile']:.0f}, after the "
                              f"restart {m['restart_rss']:.0f}", flush=True)
                        for line in m["log"]:
                            print(f"          {line[:160]}", flush=True)
        finally:
            if daemon.proc is not None:
                daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
