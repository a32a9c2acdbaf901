"""The pure parts of group commit (gw/service/group.py): which queued requests form the next
group, and the bisection that narrows a refused commit to the items it belongs to."""

from __future__ import annotations

from hypothesis import given, strategies as st

from gw.service.group import Pending, refused, take


def pending(*keys, size=1):
    return Pending(keys, lambda: None, size)


def test_a_group_takes_the_oldest_and_leaves_a_key_seen_in_it():
    a, b, c, d = pending("x"), pending("y"), pending("x", "z"), pending("z")
    queue = [a, b, c, d]
    # c shares x with a; d shares z with c, which stays: d stays behind it.
    assert take(queue, 64, 1000) == [a, b]
    assert queue == [c, d]
    assert take(queue, 64, 1000) == [c]
    assert take(queue, 64, 1000) == [d] and queue == []


def test_a_group_is_capped_by_requests_and_by_elements():
    queue = [pending(i) for i in range(5)]
    assert len(take(queue, 3, 1000)) == 3 and len(queue) == 2
    a, b, c = pending("a", size=600), pending("b", size=600), pending("c", size=300)
    big = [a, b, c]
    assert take(big, 64, 1000) == [a, c] and big == [b]  # b waits for the next group
    queue = [pending("a", size=1500)]  # larger than the cap alone: a group of its own
    assert len(take(queue, 64, 1000)) == 1


class Refuses(Exception):
    pass


@given(st.lists(st.booleans(), max_size=40))
def test_bisection_finds_exactly_the_refused_and_commits_the_rest(bad):
    committed: list[int] = []

    def commit(part):
        if any(bad[i] for i in part):
            raise Refuses(part)
        committed.extend(part)

    out = refused(list(range(len(bad))), commit, (Refuses,))
    assert sorted(out) == [i for i, b in enumerate(bad) if b]
    assert sorted(committed) == [i for i, b in enumerate(bad) if not b]
    assert all(isinstance(e, Refuses) and e.args[0] == [i] for i, e in out.items())


def test_one_commit_when_nothing_is_refused():
    calls = []
    assert refused([1, 2, 3], calls.append, (Refuses,)) == {}
    assert calls == [[1, 2, 3]]
