"""``python -m gw.lab``: the lab's own program. ``serve [ROLE]`` runs the services inside a
namespace (see `gw.lab.services`); ``list`` and ``remove TAG|all`` find and remove labs kept
with ``--keep``."""

from __future__ import annotations

import signal
import sys

from .services import serve
from .topology import list_labs, remove_tag


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        serve(*argv[1:2])
        return 0
    if argv[:1] == ["list"]:
        print("\n".join(list_labs()) or "(no lab)")
        return 0
    if argv[:1] == ["remove"] and len(argv) == 2:
        tags = list_labs() if argv[1] == "all" else [argv[1]]
        failed = [n for tag in tags for n in remove_tag(tag)]
        for tag in tags:
            print(f"removed lab {tag}")
        return 1 if failed else 0
    print("usage: python -m gw.lab serve [ROLE] | list | remove TAG|all", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
