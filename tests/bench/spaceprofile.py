"""Where a start at the whole port space goes: py-spy profiles of one cold start, one restart
with the table in place and one reconcile (SIGHUP), with the store of tests/bench/portspace.py.

    tests/run-isolated .venv/bin/python -m tests.bench.spaceprofile [--stored 262134]

Prints, for each, the seconds to ready (or to the reconcile's log line), the daemon's RSS and
the functions with the most samples (tests/bench/profile.py's summary); the collapsed stacks
go to tests/bench/out/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys

from . import portspace
from .controlplane import BenchDaemon, drop_table
from .profile import OUT, attached, pyspy, summarize, _interrupt
from .topology import BenchLab


def _spied_start(daemon: BenchDaemon, spy: str, raw, rate: int) -> dict:
    """Start the daemon as py-spy's child; ready seconds and RSS (py-spy adds little)."""
    t = daemon.start_timed(timeout=300, wrap=[spy, "record", "--format", "raw", "--rate",
                                              str(rate), "--nonblocking", "--output", str(raw),
                                              "--"])
    child = int(subprocess.run(["pgrep", "-P", str(daemon.proc.pid)], capture_output=True,
                               text=True).stdout.split()[0])
    t.update(_rss(child))
    return t | {"child": child}


def _rss(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def _stop_spied(daemon: BenchDaemon, child: int) -> None:
    os.kill(child, signal.SIGTERM)
    daemon.proc.wait(60)
    daemon.proc = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.spaceprofile")
    p.add_argument("--stored", type=int, default=portspace.FULL)
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    OUT.mkdir(exist_ok=True)
    spy = pyspy()
    with BenchLab(bridge=False) as lab:
        store = lab.tmp / "store"
        portspace.write_store(store / "exposures.json", portspace.port_space()[:args.stored])
        state = lab.tmp / "state"
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(store, state)
        daemon = BenchDaemon(lab)
        try:
            for name in ("cold", "restart"):
                if name == "cold":
                    drop_table(lab)
                raw = OUT / f"space-{name}-{args.stored}.txt"
                t = _spied_start(daemon, spy, raw, args.rate)
                print(f"\n== {name} start with {args.stored}: health {t['health_s']:.2f} s, "
                      f"ready {t['ready_s']:.2f} s, RSS {t['VmRSS']:.0f} MiB "
                      f"(peak {t['VmHWM']:.0f})")
                if name == "restart":
                    _stop_spied(daemon, t["child"])
                    print(summarize(raw, top=args.top, rate=args.rate))
                    break
                # The reconcile, sampled by a second py-spy attached to the same daemon.
                child = t["child"]
                # SIGHUP to the daemon itself, not to py-spy (its parent).
                daemon.send = lambda sig: os.kill(child, sig)
                with attached(spy, child, OUT / f"space-reconcile-{args.stored}.txt",
                              args.rate) as rraw:
                    seconds = portspace.reconcile_s(daemon)
                print(f"\n== reconcile with {args.stored}: {seconds:.2f} s, RSS "
                      f"{_rss(child)['VmRSS']:.0f} MiB")
                print(summarize(rraw, top=args.top, rate=args.rate))
                _stop_spied(daemon, child)
                print(f"\n== cold start profile ({raw})")
                print(summarize(raw, top=args.top, rate=args.rate))
        finally:
            if daemon.proc is not None:
                daemon.stop()
            # Its log too: the timestamps of each phase and the drift watcher's reasons.
            shutil.copy(daemon.log_path, OUT / f"space-daemon-{args.stored}.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
