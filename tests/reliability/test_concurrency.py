"""Concurrency (issue 8): 32 concurrent clients send mixed add (single and batch), delete and
list requests. Each client owns a disjoint range of exposed ports, so every answer is
predictable from its own earlier answers: the test asserts each status (201, 200, 409, 404:
never a 5xx), that every listing shows exactly the client's model for its ports (no lost and no
duplicated exposure at any moment), and afterwards kernel == store == the union of the models,
also after a restart. CI sends 1,500 requests, OAKGW_SOAK=1 5,000."""

from __future__ import annotations

import collections
import time

import pytest

from tests.reliability.common import Worker, report, scaled, storm
from tests.reliability.daemon import API_PORT, HOST, TOKEN, docs_set, gateway, stored_docs
from tests.reliability.daemon import store_path

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CLIENTS = 32


def test_32_concurrent_clients_lose_and_duplicate_nothing(tmp_path):
    total = scaled(1500, 5000)
    per_client = -(-total // CLIENTS)
    ws = [Worker(i, range(30000 + 50 * i, 30000 + 50 * i + 10), seed=i) for i in range(CLIENTS)]
    with gateway(tmp_path / "gw", config={"api": {"threads": 8}}) as gw:
        gw.start()
        started = time.monotonic()
        threads = storm(gw.ns.name, ws, per_client, HOST, API_PORT, TOKEN, timeout=60)
        for t in threads:
            t.join(timeout=600)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), "a client hangs"
        lost = [w.index for w in ws if w.in_flight is not None]
        assert not lost, f"clients {lost} lost their connection: {gw.log()[-3000:]}"
        problems = [p for w in ws for p in w.unexpected]
        assert not problems, f"{len(problems)} unexpected answers:\n" + "\n".join(problems[:10])
        statuses = collections.Counter()
        for w in ws:
            statuses.update(w.answers)
        assert not [s for s in statuses if s >= 500], statuses
        model = {doc for w in ws for doc in w.model.values()}
        listed = gw.http().list()
        assert len(listed) == len(docs_set(listed)) == len(model), "a key listed twice?"
        assert docs_set(listed) == model
        assert gw.kernel_docs() == model
        assert gw.http().get("/api/ready").status == 200
        assert gw.stop() == 0
        assert stored_docs(store_path(gw)) == model
        gw.start()
        assert docs_set(gw.http().list()) == gw.kernel_docs() == model
        assert "Traceback" not in gw.log()
    sent = sum(w.sent for w in ws)
    report("concurrency", clients=CLIENTS, requests=sent, seconds=f"{elapsed:.1f}",
           per_second=f"{sent / elapsed:.0f}", statuses=dict(sorted(statuses.items())),
           exposures_at_end=len(model))
    assert sent >= total
    for status in (200, 201, 404, 409):
        assert statuses[status] > 0, f"the workload never produced a {status}: {statuses}"
