"""A store writer for the crash tests, and the model it is checked against.

    python crashwriter.py STORE_PATH SEED [--no-fsync]

opens the store and commits change(SEED, 0), change(SEED, 1), ... for ever, printing
``ack <i>`` (flushed) after commit i returned. The parent kills it at a random moment, reopens the
store and checks it against apply_changes(): every acked change is there, at most the one in
flight more. The changes are a pure function of (seed, i), so the parent rebuilds them.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import sys

from gw.core.exposure import Exposure

PORTS = range(1, 33)  # few keys, so that puts often replace and deletes often hit
# Small, so that compactions (rotation, background snapshot, .bak, segment cleanup) happen
# several times per run and get killed in the middle too.
COMPACT_MIN_BYTES = 2048


def change(seed: int, i: int) -> dict:
    """Commit arguments (put, delete, meta) of change i."""
    rnd = random.Random(f"{seed}/{i}")

    def key():
        return (rnd.choice(("ipv4", "ipv6")), rnd.choice(("tcp", "udp")), rnd.choice(PORTS))

    put = {}
    for _ in range(rnd.randint(0, 3)):
        family, protocol, port = key()
        ip = ("10.30.0.%d" % rnd.randint(1, 254) if family == "ipv4"
              else "fdff::%x" % rnd.randint(1, 0xffff))
        put[family, protocol, port] = Exposure(
            port, protocol, ipaddress.ip_address(ip), rnd.randint(1, 65535),
            f"s{i}" if rnd.random() < 0.5 else None)
    delete = [key() for _ in range(rnd.randint(0, 2))]
    meta = {"last": i, "odd": None if i % 2 == 0 else i} if rnd.random() < 0.3 else None
    return {"put": list(put.values()), "delete": delete, "meta": meta}


def apply_changes(docs: dict, meta: dict, seed: int, start: int, stop: int) -> None:
    """Applies changes start..stop-1 to a model: deletes before puts, a meta None deletes."""
    for i in range(start, stop):
        c = change(seed, i)
        for key in c["delete"]:
            docs.pop(key, None)
        for exposure in c["put"]:
            docs[exposure.key] = exposure
        for name, value in (c["meta"] or {}).items():
            if value is None:
                meta.pop(name, None)
            else:
                meta[name] = value


def main() -> None:
    from gw.store.local import LocalStore

    path, seed = sys.argv[1], int(sys.argv[2])
    LocalStore.COMPACT_MIN_BYTES = COMPACT_MIN_BYTES
    store = LocalStore(path, fsync="--no-fsync" not in sys.argv)
    for i in itertools.count():
        store.commit(**change(seed, i))
        print(f"ack {i}", flush=True)


if __name__ == "__main__":
    main()
