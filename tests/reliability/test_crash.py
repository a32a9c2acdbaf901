"""Crash safety of the daemon (issue 8): SIGKILL at random moments during a storm of add and
delete requests; simulated power loss (the store on a loop-mounted ext4 shut down with
EXT4_IOC_SHUTDOWN / NOLOGFLUSH mid-storm); and a crash at the exact points between the store
commit and the kernel commit, and between the kernel commit and the answer.

After each restart: the store opens, every request that got a 2xx is reflected, nothing that
got an error is (each client owns its ports, so its model follows from its answers: only the
one request whose answer was lost may have gone either way), and the kernel equals the store.

Short variants run in CI; OAKGW_SOAK=1 runs the long ones (50 kill rounds, 20 power losses)."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from gw.daemon.faults import CRASH_ENV, CRASH_EXIT
from tests.fs import Ext4, mount_namespace, require_tools
from tests.helpers import doc, ex
from tests.reliability.common import (Worker, freeze, report, scaled, split_by_worker,
                                      storm)
from tests.reliability.daemon import (API_PORT, HOST, TOKEN, docs_set, gateway, kill,
                                      reap_orphans, store_path, stored_docs)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CLIENTS = 8
PORTS = 12          # per client: few, so that adds hit existing keys and deletes find some
BASE_PORT = 20000


def workers(round_no: int, models: list[dict]) -> list[Worker]:
    return [Worker(i, range(BASE_PORT + 100 * i, BASE_PORT + 100 * i + PORTS),
                   seed=round_no * 1000 + i, model=models[i]) for i in range(CLIENTS)]


def check_after_restart(gw, ws: list[Worker], round_no: int) -> list[dict]:
    """The restarted daemon serves a state the clients' answers allow; kernel == store.
    Returns the per-client models to continue from."""
    listed = docs_set(gw.http().list())
    assert len(listed) == len(gw.http().list()), "a key listed twice"
    kernel = gw.kernel_docs()
    assert kernel == listed, (f"round {round_no}: kernel != store\nonly in the kernel: "
                              f"{kernel - listed}\nonly in the store: {listed - kernel}")
    models = split_by_worker(listed, ws)
    for w, got in zip(ws, models):
        allowed = w.possible()
        assert got in allowed, (
            f"round {round_no}, client {w.index}: the store holds {sorted(got.values())}; "
            f"its answers allow only {[sorted(s.values()) for s in allowed]} "
            f"(request in flight: {w.in_flight})")
    return models


def run_storm_and_crash(gw, ws: list[Worker], crash, delay: float) -> None:
    stop = threading.Event()
    threads = storm(gw.ns.name, ws, 1_000_000, HOST, API_PORT, TOKEN, stop)
    try:
        time.sleep(delay)
        crash()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a client hangs"
    problems = [p for w in ws for p in w.unexpected]
    assert not problems, "answers the model did not predict:\n" + "\n".join(problems[:10])


def test_sigkill_during_a_storm_loses_no_acknowledged_change(tmp_path):
    rounds = scaled(10, 50)
    rnd = random.Random(8)
    models: list[dict] = [{} for _ in range(CLIENTS)]
    sent = acked = 0
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        for r in range(rounds):
            ws = workers(r, models)

            def crash():
                # Most rounds kill -9; every fifth a SIGTERM (a clean stop compacts the store:
                # snapshot, .bak and journal rotation get crossed by later kills too).
                sig = signal.SIGTERM if r % 5 == 4 else signal.SIGKILL
                status = kill(gw, sig)
                assert status in (-signal.SIGKILL, 0), status

            run_storm_and_crash(gw, ws, crash, rnd.uniform(0.2, 1.2))
            reap_orphans(gw)
            gw.start()
            models = check_after_restart(gw, ws, r)
            sent += sum(w.sent for w in ws)
            acked += sum(n for w in ws for s, n in w.answers.items() if 200 <= s < 300)
        assert gw.stop() == 0
        assert stored_docs(store_path(gw)) == {d for m in models for d in m.values()}
    report("sigkill storm", rounds=rounds, requests=sent, acked_2xx=acked)
    assert acked > rounds * 10, "the storm hardly ran: the test proves little"


def test_power_loss_during_a_storm_loses_no_acknowledged_change(tmp_path):
    require_tools("mkfs.ext4", "losetup", "unshare", "nsenter")
    rounds = scaled(5, 20)
    rnd = random.Random(9)
    models: list[dict] = [{} for _ in range(CLIENTS)]
    sent = acked = 0
    with mount_namespace() as mns:
        fs = Ext4(mns, tmp_path)
        try:
            fs.mount()
            path = fs.path / "state" / "exposures.json"
            with gateway(tmp_path / "gw", config={"store": {"path": str(path)}}) as gw:
                gw.start()
                for r in range(rounds):
                    ws = workers(r, models)

                    def power_loss():
                        # Freeze first: no system call of the daemon is in flight when the
                        # disk goes, so no answer can leave after it (as on a real machine).
                        freeze(gw.proc.pid)
                        fs.shutdown()
                        kill(gw)

                    run_storm_and_crash(gw, ws, power_loss, rnd.uniform(0.3, 1.2))
                    reap_orphans(gw)
                    fs.remount()
                    # The machine rebooted: the kernel lost our table too.
                    gw.nft("delete", "table", "inet", "oakestra_gw")
                    gw.start()
                    models = check_after_restart(gw, ws, r)
                    sent += sum(w.sent for w in ws)
                    acked += sum(n for w in ws for s, n in w.answers.items()
                                 if 200 <= s < 300)
                assert gw.stop() == 0
        finally:
            fs.unmount()
    report("power loss storm", rounds=rounds, requests=sent, acked_2xx=acked)
    assert acked > rounds * 10, "the storm hardly ran: the test proves little"


# -- a crash at the exact points around the kernel commit -------------------------------------

def crashed_request(gw, call) -> None:
    """The request that hits the injected crash gets no answer; the daemon exits with
    CRASH_EXIT."""
    with pytest.raises(OSError):
        call()
    assert gw.proc.wait(timeout=10) == CRASH_EXIT, gw.log()
    reap_orphans(gw)


def test_crash_between_the_store_commit_and_the_kernel_commit(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        api = gw.http()
        gw.start(env={CRASH_ENV: "before-kernel:3"})
        assert api.add(ex(8081)).status == 201
        assert api.add(ex(8082)).status == 201
        crashed_request(gw, lambda: api.add(ex(8083)))
        assert "exiting after the store commit, before the kernel commit" in gw.log()
        # The crash hit the exact point: the store has it, the kernel not (yet).
        assert stored_docs(store_path(gw)) == {doc(8081), doc(8082), doc(8083)}
        assert gw.kernel_docs() == {doc(8081), doc(8082)}
        # The restart makes the kernel follow the store.
        gw.start()
        assert docs_set(api.list()) == gw.kernel_docs() == {doc(8081), doc(8082), doc(8083)}
        assert gw.stop() == 0

        # A delete: the store no longer has it, the kernel still does, until the restart.
        gw.start(env={CRASH_ENV: "before-kernel:1"})
        crashed_request(gw, lambda: api.delete({"exposed_port": 8081}))
        assert stored_docs(store_path(gw)) == {doc(8082), doc(8083)}
        assert doc(8081) in gw.kernel_docs()
        gw.start()
        assert docs_set(api.list()) == gw.kernel_docs() == {doc(8082), doc(8083)}
        assert gw.stop() == 0


def test_crash_between_the_kernel_commit_and_the_answer(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        api = gw.http()
        gw.start(env={CRASH_ENV: "after-kernel:2"})
        assert api.add(ex(9001)).status == 201
        crashed_request(gw, lambda: api.add({"exposures": [ex(9002), ex(9003, "fdff::3")]}))
        both = {doc(9001), doc(9002), ("ipv6", "tcp", 9003, "fdff::3", 80)}
        assert stored_docs(store_path(gw)) == gw.kernel_docs() == both
        gw.start()
        assert docs_set(api.list()) == gw.kernel_docs() == both
        assert gw.stop() == 0


def test_a_bad_crash_spec_stops_the_start(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        gw.start(env={CRASH_ENV: "sometime"}, wait=False)
        assert gw.proc.wait(timeout=20) == 2
        assert CRASH_ENV in gw.log()
