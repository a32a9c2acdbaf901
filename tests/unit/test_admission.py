"""gw.daemon.admission: changes in flight may exceed the cap while they flow, not once stuck."""

from hypothesis import given, strategies as st

import pytest

from gw.core.errors import Busy
from gw.daemon.admission import ChangeGate


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_burst_that_flows_is_never_busy():
    clock = Clock()
    gate = ChangeGate(3, busy_after=1.0, clock=clock)
    tickets = [gate.enter() for _ in range(20)]  # all at once, none old yet
    assert len(set(tickets)) == 20


def test_stuck_changes_make_the_next_busy_until_one_leaves():
    clock = Clock()
    gate = ChangeGate(3, busy_after=1.0, clock=clock)
    first = [gate.enter() for _ in range(3)]
    clock.now = 1.5
    with pytest.raises(Busy) as caught:
        gate.enter()
    assert caught.value.status == 503 and caught.value.code == "busy"
    assert caught.value.headers["Retry-After"]
    gate.leave(first[0])  # one answered: room again
    gate.enter()


@given(st.lists(st.tuples(st.sampled_from(["enter", "leave", "tick"]),
                          st.floats(0, 2)), max_size=60),
       st.integers(1, 8))
def test_busy_exactly_when_as_many_as_may_wait_do_and_the_oldest_is_old(steps, cap):
    clock = Clock()
    gate = ChangeGate(cap, busy_after=1.0, clock=clock)
    held: dict[int, float] = {}
    for op, value in steps:
        if op == "tick":
            clock.now += value
        elif op == "leave" and held:
            ticket = sorted(held)[int(value * 10) % len(held)]
            gate.leave(ticket)
            del held[ticket]
        elif op == "enter":
            expect_busy = len(held) >= cap and clock.now - min(held.values()) >= 1.0
            try:
                held[gate.enter()] = clock.now
                assert not expect_busy
            except Busy:
                assert expect_busy
