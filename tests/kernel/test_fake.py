"""The fake nftables against the real one: the same random transactions, sent to both, are
refused alike (with the same named refusal) and leave the same elements."""

import json
import subprocess

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from gw.core import ruleset
from gw.core.errors import KernelRefused
from gw.kernel.fake import FakeNft
from gw.kernel.nft import NftSession, NoSuchObject
from tests import oracle
from tests.gateway_machine import SETTINGS, ex

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_table")]

VARIABLES = ruleset.skeleton_vars(SETTINGS)
exposures = st.builds(ex, st.integers(1, 3), st.sampled_from(["10.30.0.1", "fdff::1"]),
                      st.integers(1, 2), st.sampled_from(["tcp", "udp"]))
unique = st.lists(exposures, min_size=1, max_size=3).map(lambda es: {e.key: e for e in es}.values())
loads = st.lists(exposures, max_size=4).map(
    lambda es: list(ruleset.load_tx(VARIABLES, {e.key: e for e in es}.values())))
adds, deletes = unique.map(ruleset.adds), unique.map(ruleset.deletes)
# Mostly element changes on a loaded table, where both refusals happen; now and then the
# table replaced or gone.
ops = st.one_of(adds, deletes, adds, deletes, loads, st.just([ruleset.DeleteTable()]))
transactions = st.lists(ops, min_size=1, max_size=3).map(lambda parts: tuple(
    op for part in parts for op in part))


def outcome(nft, tx):
    try:
        nft.apply(tx)
    except KernelRefused as exc:
        refused = type(exc)
    else:
        refused = None
    try:
        elements = oracle.elements(json.dumps(nft.list_table()))
    except NoSuchObject:
        elements = None
    return refused, elements


@pytest.fixture(scope="module")
def session():
    nft = NftSession()
    yield nft
    nft.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(start=loads, history=st.lists(transactions, min_size=1, max_size=6))
def test_the_fake_refuses_and_holds_what_the_kernel_does(session, start, history):
    fake = FakeNft()
    for nft in (session, fake):
        nft.apply(tuple(start))
    for tx in history:
        expected = outcome(session, tx)
        event(f"refused: {expected[0] and expected[0].__name__}")
        assert outcome(fake, tx) == expected, ruleset.script(tx)


def test_generations_count_commits_and_know_our_whole_loads_alike(session):
    """The same history on both: each commit is one generation, a refused one none; our own
    whole-table loads are known as ours, element changes and another process's commit not."""
    fake = FakeNft()
    start = {}
    for nft in (session, fake):
        start[nft] = nft.generations()[0]
        nft.apply(tuple(ruleset.load_tx(VARIABLES, [ex(1, "10.30.0.1")])))
        nft.apply(tuple(ruleset.adds([ex(2, "10.30.0.1")])))
        with pytest.raises(KernelRefused):
            nft.apply(tuple(ruleset.adds([ex(2, "10.30.0.2")])))
    # Another process: on the kernel's side nft's CLI, behind the fake's back its own hook.
    subprocess.run(["nft", "flush", "map", "inet", ruleset.TABLE_NAME, "expose_v4"], check=True)
    fake.flush_map("ipv4")
    for nft in (session, fake):
        current, own = nft.generations()
        s = start[nft]
        assert current == s + 3, nft
        assert s + 1 in own and s + 2 not in own and s + 3 not in own, (nft, s, own)
