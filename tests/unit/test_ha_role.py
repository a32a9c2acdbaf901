"""The daemon's role watcher (gw.service.ha_role): which readings of the role file are a
change (pure, a property over any sequence of readings), and the watcher itself on a real
role file written by `ha notify`'s writer."""

from __future__ import annotations

import queue

from hypothesis import given, strategies as st

from gw.core.ha_events import ROLES, role_record
from gw.service.ha_notify import write_role
from gw.service.ha_role import RoleFile, RoleWatcher, change_of

readings = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES),
                                           "since": st.sampled_from([None, 1.0, 2.0, 3.0])}),
                    max_size=30)


@given(readings)
def test_a_change_is_each_new_role_or_time_and_only_that(seen):
    changes, last = [], None
    for record in seen:
        if change_of(last, record):
            changes.append(record)
            last = record
    # What is reported is the readings with each run of equal ones folded into one.
    runs = [r for i, r in enumerate(seen) if i == 0 or (r["role"], r["since"]) !=
            (seen[i - 1]["role"], seen[i - 1]["since"])]
    assert changes == runs


def test_master_again_at_another_time_is_a_new_promotion():
    # Demoted and promoted between two looks: the other node may have announced meanwhile.
    assert change_of({"role": "master", "since": 1.0}, {"role": "master", "since": 2.0})
    assert not change_of({"role": "master", "since": 1.0}, {"role": "master", "since": 1.0})
    assert change_of(None, {"role": "unknown"})


def test_the_watcher_reports_the_role_at_start_then_each_change(tmp_path):
    path = str(tmp_path / "role")
    seen: queue.Queue = queue.Queue()
    watcher = RoleWatcher(RoleFile(path), lambda old, record: seen.put((old, record["role"])),
                          interval=0.01).start()
    try:
        assert seen.get(timeout=10) == (None, "unknown")  # no file yet
        for since, role in enumerate(("backup", "master", "backup"), 1):
            write_role(path, role_record(role, float(since)))
            assert seen.get(timeout=10)[1] == role
        write_role(path, role_record("master", 9.0))
        assert seen.get(timeout=10) == ("backup", "master")
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()


def test_a_failing_callback_does_not_stop_the_watcher(tmp_path):
    path = str(tmp_path / "role")
    seen: queue.Queue = queue.Queue()

    def on_change(old, record):
        seen.put(record["role"])
        if old is None:
            raise RuntimeError("the first one fails")

    watcher = RoleWatcher(RoleFile(path), on_change, interval=0.01).start()
    try:
        assert seen.get(timeout=10) == "unknown"
        write_role(path, role_record("master", 1.0))
        assert seen.get(timeout=10) == "master"
    finally:
        watcher.stop()
