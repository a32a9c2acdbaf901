"""Fixtures of the API tests: one real daemon per module (token required), emptied between
tests."""

from __future__ import annotations

import pytest

from tests.api.harness import running


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    # Without the drift watcher: some tests break the table on purpose and look at the result.
    with running(tmp_path_factory.mktemp("gw"), drift_watch=False) as gateway:
        yield gateway


@pytest.fixture
def api(gw):
    """The daemon's client; every exposure is deleted after the test."""
    client = gw.http()
    yield client
    if gw.proc is not None and gw.proc.poll() is None:
        for doc in client.list():
            client.delete({"exposed_port": doc["exposed_port"], "protocol": doc["protocol"],
                           "family": doc["family"]})
