"""The subprocess supervisor: output handed over per run, restarts with a flag, stop ends the
child. Real child processes (sh), no root needed."""

import os
import threading

from gw.kernel.supervisor import Supervisor


def test_a_command_that_exits_is_restarted_and_its_lines_are_handed_over():
    runs, spawns, seen = [], [], threading.Event()

    def consume(lines):
        runs.append(list(lines))
        if len(runs) >= 3:
            seen.set()

    sup = Supervisor(["sh", "-c", "echo one; echo two; exit 3"], consume, label="test",
                     first=0.01, most=0.02, steady=60, on_spawn=spawns.append).start()
    try:
        assert seen.wait(30), runs  # only catches a hang
    finally:
        sup.stop()
    assert runs[:3] == [["one\n", "two\n"]] * 3
    assert spawns[0] is False and all(spawns[1:3])


def test_stop_ends_a_running_child_and_a_missing_command_is_retried(caplog):
    started = threading.Event()
    pids = []

    def consume(lines):
        started.set()
        for line in lines:
            pids.append(int(line))

    sup = Supervisor(["sh", "-c", "echo $$; exec sleep 600"], consume, label="test",
                     first=0.01, most=0.02, steady=60).start()
    assert started.wait(30)
    while not pids:  # the pid line follows at once
        threading.Event().wait(0.01)
    sup.stop()
    assert not os.path.exists(f"/proc/{pids[0]}") or \
        open(f"/proc/{pids[0]}/stat").read().split()[2] == "Z"

    missing = Supervisor(["/nonexistent/command"], lambda lines: None, label="test",
                         first=0.01, most=0.02, steady=60).start()
    tries = lambda: [r for r in caplog.records if "cannot run /nonexistent/command" in r.message]
    for _ in range(3000):  # only catches a hang
        if len(tries()) >= 2:
            break
        threading.Event().wait(0.01)
    missing.stop()
    assert len(tries()) >= 2  # tried again after the first failure
