"""The drift watcher's judgment of lost monitor events (gw.kernel.drift.unaccounted): a pure
function over generation numbers."""

from hypothesis import given, strategies as st

from gw.kernel.drift import unaccounted


def test_a_loss_spanning_only_our_loads_needs_no_repair():
    assert unaccounted(3, 11, own=range(4, 12), seen=()) == []


def test_a_generation_neither_ours_nor_shown_is_reported():
    assert unaccounted(3, 8, own={4, 5, 7}, seen={8}) == [6]


def test_nothing_after_the_last_shown_generation_is_nothing_to_judge():
    assert unaccounted(9, 9, own=(), seen=()) == []


@given(st.integers(0, 1000), st.integers(0, 60), st.sets(st.integers(0, 1100)),
       st.sets(st.integers(0, 1100)))
def test_exactly_the_unvouched_generations_of_the_window(since, span, own, seen):
    current = since + span
    missing = unaccounted(since, current, own, seen)
    assert missing == sorted(missing)
    for g in range(since + 1, current + 1):
        assert (g in missing) == (g not in own and g not in seen)
    assert all(since < g <= current for g in missing)


def test_a_loss_before_the_monitor_showed_anything_is_judged_from_the_kernels_generation():
    """With a big table in place `nft monitor` shows nothing for seconds, so the probe at start
    goes unseen. A loss of our own load's events then is judged from the generation the
    kernel had at start (it used to be drift by default: a full repair at every restart at
    262,134 exposures); a generation that is not ours is still drift."""
    import threading

    from gw.kernel.drift import LOST_EVENTS, DriftWatcher
    from tests.helpers import wait_for

    for own, drift in ((frozenset({8}), False), (frozenset(), True)):
        now = {"gen": 7}
        repairs, judged = [], threading.Event()
        watcher = DriftWatcher(repairs.append, lambda: None, argv=("sleep", "600"),
                               generations=lambda: (now["gen"], own))
        watcher.CATCH_UP = 0.0
        orig = watcher._judge_loss
        watcher._judge_loss = lambda: (orig(), judged.set())[0]
        try:
            watcher.start()  # no probe shown: the kernel's 7 stands in
            now["gen"] = 8   # our load (or not)
            watcher._read([f"# ERROR: We {LOST_EVENTS}!\n"])
            wait_for(judged.is_set, what="the loss judged")
            if drift:
                wait_for(lambda: repairs, what="the repair")
                assert "generation(s) 8 were not committed" in repairs[0]
            else:
                assert repairs == []
        finally:
            watcher.stop()
