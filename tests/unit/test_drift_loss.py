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
