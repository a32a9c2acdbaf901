"""Run inside the gateway namespace (``ip netns exec GW python -m tests.bench.nsload N``):
load our table with the benchmark's first N exposures through the real code path,
``Firewall(NftSession(), skeleton_vars(settings)).load(exposures)``, and print the seconds the
load took as JSON."""

from __future__ import annotations

import json
import sys
import time

from gw.core import ruleset
from gw.core.config import parse_config
from gw.kernel.firewall import Firewall
from gw.kernel.nft import NftSession

from .exposures import exposures, settings_doc


def main() -> None:
    n = int(sys.argv[1])
    items = exposures(n)
    fw = Firewall(NftSession(), ruleset.skeleton_vars(parse_config(settings_doc())))
    start = time.perf_counter()
    fw.load(items)
    print(json.dumps({"exposures": n, "load_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
