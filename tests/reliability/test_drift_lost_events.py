"""When `nft monitor` loses events (its socket overflowed: ENOBUFS), the drift watcher cannot
see what changed. Our own whole-table loads overflow it (an event per element), so a loss is
judged by the ruleset's generation: when every generation it may span is one of our own loads,
nothing is repaired (a repair would list the whole table, a cost that grows with it); when any
other commit may hide in it, the table is repaired as before.

The monitor is paused (SIGSTOP) during a load so that its socket overflows for sure; the real
daemon, the real kernel, in a namespace of its own."""

from __future__ import annotations

import ipaddress
import os
import signal

import pytest

from gw.core.exposure import Exposure
from gw.store.local import LocalStore
from tests.helpers import wait_for
from tests.reliability.common import children, cmdline, metric
from tests.reliability.daemon import gateway, store_path

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

HANG = 120  # seconds: only catches a hang
# Loads of this many elements while the monitor is paused: enough events to overflow its
# socket (the kernel packs several events in one message).
EXPOSURES, LOADS = 45000, 8
FOREIGN = "add element inet oakestra_gw expose_v4 { tcp . 9997 : 10.30.0.1 . 80 }"
SENTINEL = "add element inet oakestra_gw expose_v4 { tcp . 9998 : 10.30.0.1 . 80 }"


def many(n: int) -> list[Exposure]:
    """n exposures, TCP and UDP from port 20000 up, each to a service IP of its own."""
    base = ipaddress.IPv4Address("10.30.1.1")
    return [Exposure(20000 + i // 2, ("tcp", "udp")[i % 2], base + i // 2, 80, "svc")
            for i in range(n)]


def write_store(gw, items: list[Exposure]) -> None:
    path = store_path(gw)
    path.parent.mkdir(parents=True, exist_ok=True)
    with LocalStore(path, fsync=False) as store:
        for start in range(0, len(items), 1000):
            store.commit(put=items[start:start + 1000])


def drift_checks(gw) -> float:
    status, text = gw.request("GET", "/metrics")
    assert status == 200
    return metric(text, "oakestra_gw_drift_checks_total")


def monitor_of(gw) -> int:
    found = [p for p in children(gw.proc.pid) if cmdline(p) == "nft monitor"]
    assert len(found) == 1, [cmdline(p) for p in children(gw.proc.pid)]
    return found[0]


def has(gw, element: str) -> bool:
    port = element.split(" . ")[1].split(" :")[0]
    text = gw.nft("list", "map", "inet", "oakestra_gw", "expose_v4").stdout
    return f"tcp . {port} :" in text


def load_while_paused(gw, also: str | None = None) -> None:
    """Our own loads of the whole table (reloads that change a skeleton value) while the
    monitor is stopped, then `also` by hand (another process), then the monitor goes on and
    reads what its socket kept."""
    monitor, mark = monitor_of(gw), len(gw.log())
    os.kill(monitor, signal.SIGSTOP)
    try:
        for _ in range(LOADS):
            cap = 4 if gw.config.get("egress", {}).get("max_connections_per_source") == 3 else 3
            gw.reconfigure({"egress": {"max_connections_per_source": cap}}, timeout=HANG)
        if also:
            gw.nft(also)
    finally:
        os.kill(monitor, signal.SIGCONT)
    wait_for(lambda: "lost some netlink events" in gw.log()[mark:], timeout=HANG,
             what="the monitor to report lost events (else this test tests nothing)",
             log=gw.log_tail)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    with gateway(tmp_path_factory.mktemp("lost"), data_path=False) as gw:
        write_store(gw, many(EXPOSURES))
        gw.start(timeout=HANG)
        yield gw


def test_lost_events_of_our_own_load_are_not_drift(big):
    gw = big
    # The start's own load may have overflowed the monitor too: let that be judged first.
    wait_for(lambda: gw.nft("list", "table", "inet", "oakestra_gw", check=False).returncode == 0,
             timeout=HANG, what="the table")
    checks = drift_checks(gw)
    mark = len(gw.log())
    load_while_paused(gw)
    # Judged one way or the other: a drift check (a listing of the whole table), or not.
    wait_for(lambda: drift_checks(gw) > checks or "lost events were our own" in gw.log()[mark:],
             timeout=HANG, what="the loss judged", log=gw.log_tail)
    assert drift_checks(gw) == checks, gw.log()[mark:]
    assert "lost events were our own" in gw.log()[mark:]
    # The watcher still tells a foreign change afterwards.
    gw.nft(SENTINEL)
    wait_for(lambda: not has(gw, SENTINEL), timeout=HANG, what="the sentinel's repair",
             log=gw.log_tail)
    assert drift_checks(gw) == checks + 1, gw.log()[mark:]
    assert "changed our table" in gw.log()[mark:]


def test_a_foreign_change_hidden_in_a_loss_is_repaired(big):
    gw = big
    mark = len(gw.log())
    load_while_paused(gw, also=FOREIGN)
    wait_for(lambda: not has(gw, FOREIGN), timeout=HANG, what="the foreign element's repair",
             log=gw.log_tail)
    log = gw.log()[mark:]
    assert "drift: repaired" in log, log
    # Its events were lost with ours (the socket was full by then): the generation told.
    assert "were not committed by this gateway" in log, [l for l in log.splitlines() if "drift" in l]
