"""Our whole-table commits are known as ours from the moment the kernel counts them: the drift
watcher asks `generations()` while a load is under way (its monitor lost the load's events), and
an answer that shows the load's generation without claiming it makes the daemon repair the
whole table for nothing (it did at every start with 262,134 exposures)."""

import threading

import pytest

from gw.core import ruleset
from gw.kernel.nft import NftSession
from tests.gateway_machine import SETTINGS, ex

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_table")]


def test_no_answer_shows_our_load_unclaimed():
    session = NftSession()
    items = [ex(port, "10.30.0.1") for port in range(1, 5001)]
    tx = tuple(ruleset.load_tx(ruleset.skeleton_vars(SETTINGS), items))
    answers: list[tuple[int, frozenset[int]]] = []
    done = threading.Event()

    def ask():  # as the drift watcher's repair thread does, as often as it can
        while not done.is_set():
            answers.append(session.generations())

    try:
        asker = threading.Thread(target=ask)
        asker.start()
        loads = []
        for _ in range(5):
            session.apply(tx)
            loads.append(session.generations()[0])
        done.set()
        asker.join()
        assert all(g in session.generations()[1] for g in loads)
        unclaimed = [(current, own) for current, own in answers
                     if current in loads and current not in own]
        assert len(answers) > 10 and not unclaimed, unclaimed[:3]
    finally:
        done.set()
        session.close()
