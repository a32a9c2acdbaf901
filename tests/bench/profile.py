"""Where the daemon's time goes: py-spy profiles of a cold start and of the add/delete path.

    tests/run-isolated .venv/bin/python -m tests.bench.profile [--stored 50000] [--pairs 300]

Writes collapsed stacks (py-spy's raw format; open them with speedscope or flamegraph.pl) to
tests/bench/out/ and prints, for each profile, the functions with the most samples: "own"
counts samples in the function itself, "total" samples with it anywhere on the stack.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import controlplane as cp
from .topology import BenchLab

OUT = Path(__file__).with_name("out")


def pyspy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        sys.exit("py-spy is missing: .venv/bin/pip install py-spy")
    return found


def summarize(raw: Path, top: int = 25, rate: int = 1000, only_thread: str | None = None) -> str:
    """Top functions of a py-spy raw (collapsed) file, with milliseconds at `rate` Hz."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if only_thread and only_thread not in frames[0]:
            continue
        n = int(count)
        samples += n
        names = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                 + ")" if " (" in f else f for f in frames[1:]]
        own[names[-1] if names else frames[0]] += n
        for name in set(names):
            total[name] += n
    ms = 1000 / rate
    lines = [f"{samples} samples ({samples * ms:.0f} ms at {rate} Hz)",
             f"{'own ms':>8} {'total ms':>9}  function"]
    for name, n in total.most_common(top):
        lines.append(f"{own[name] * ms:8.0f} {n * ms:9.0f}  {name}")
    lines.append("by own time:")
    for name, n in own.most_common(12):
        lines.append(f"{n * ms:8.0f} {total[name] * ms:9.0f}  {name}")
    return "\n".join(lines)


@contextlib.contextmanager
def attached(spy: str, pid: int, raw: Path, rate: int):
    """py-spy sampling a running process for the duration of the block."""
    rec = subprocess.Popen([spy, "record", "--format", "raw", "--rate", str(rate),
                            "--nonblocking", "--pid", str(pid), "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        yield raw
    finally:
        rec.send_signal(signal.SIGINT)
        rec.wait(30)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    p.add_argument("--stored", type=int, default=50000)
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--flows", type=int, default=120000)
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--skip-latency", action="store_true", help="profile the cold start only")
    args = p.parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so namespaces and processes are removed.
    signal.signal(signal.SIGTERM, _interrupt)
    OUT.mkdir(exist_ok=True)
    spy = pyspy()
    log = print
    with BenchLab(bridge=False) as lab:
        daemon = cp.BenchDaemon(lab)
        api = cp.api_of(lab)
        try:
            daemon.start_timed()
            cp.fill_conntrack(lab, api, args.flows, log)
            with attached(spy, daemon.pid, OUT / f"populate-{args.stored}.txt", args.rate) as raw:
                cp.populate(lab, api, args.stored, 0, log)
            log(f"\n== filling the store to {args.stored} through the API ({raw})")
            log(summarize(raw, rate=args.rate))
            if not args.skip_latency:
                time.sleep(3)
                with attached(spy, daemon.pid, OUT / f"latency-{args.stored}.txt",
                              args.rate) as raw:
                    res = cp.latency(lab, api, args.pairs, 5, log)
                log(f"\n== add/delete with {args.stored} stored ({raw})")
                log(summarize(raw, rate=args.rate))
                (OUT / f"latency-{args.stored}.json").write_text(json.dumps(res, indent=1))
            api.close()
            # Cold start under py-spy (it starts the daemon; samples until it is stopped).
            daemon.stop()
            cp.drop_table(lab)
            raw = OUT / f"coldstart-{args.stored}.txt"
            t = daemon.start_timed(wrap=[spy, "record", "--format", "raw", "--rate",
                                         str(args.rate), "--nonblocking", "--output", str(raw),
                                         "--"])
            log(f"cold start under py-spy: ready after {t['ready_s']:.3f} s")
            spy_proc = daemon.proc
            # The daemon is py-spy's child; stop it (py-spy then writes its file).
            children = subprocess.run(["pgrep", "-P", str(spy_proc.pid)], capture_output=True,
                                      text=True).stdout.split()
            for pid in children:
                os.kill(int(pid), signal.SIGTERM)
            spy_proc.wait(30)
            daemon.proc = None
            log(f"\n== cold start with {args.stored} stored ({raw})")
            log(summarize(raw, rate=args.rate))
        finally:
            api.close()
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
