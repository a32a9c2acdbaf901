"""Run inside the gateway namespace (``ip netns exec GW python -m tests.bench.nsload N``):
load our table with the benchmark's first N exposures through the real code path,
``Firewall(NftSession(), skeleton_vars(settings)).load(exposures)``, and print the seconds the
load took as JSON. ``nsload limit`` loads the exposures tests/bench/limit.py measures; a second
argument names another skeleton file to load instead of rules/gateway.nft (a lever under test)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from gw.core import ruleset
from gw.core.config import parse_config
from gw.kernel.firewall import Firewall
from gw.kernel.nft import NftSession

from .exposures import exposures, limit_exposures, settings_doc


def main() -> None:
    items = limit_exposures() if sys.argv[1] == "limit" else exposures(int(sys.argv[1]))
    n = len(items)
    skeleton = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    fw = Firewall(NftSession(), ruleset.skeleton_vars(parse_config(settings_doc())), skeleton)
    start = time.perf_counter()
    fw.load(items)
    print(json.dumps({"exposures": n, "load_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
