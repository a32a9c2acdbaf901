"""schemathesis against the served /api/openapi.json: no 5xx, no answer outside the document
(status, content type, headers, body schema), schema-violating requests rejected, auth not
ignored. Bounded (examples per operation) so that it stays well under a minute."""

from __future__ import annotations

import os

import pytest

from tests.api.harness import API_PORT, TOKEN, docs_set, schemathesis_bin

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

MAX_EXAMPLES = int(os.environ.get("GW_SCHEMATHESIS_EXAMPLES", "150"))


def test_schemathesis(gw, tmp_path):
    binary = schemathesis_bin()
    api = gw.http()
    assert api.add({"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80}
                   ).status == 201
    proc = gw.ns.run(
        binary, "run", f"http://127.0.0.1:{API_PORT}/api/openapi.json",
        "--header", f"Authorization: Bearer {TOKEN}",
        "--checks", "all",
        # Valid by the schema is not enough to be accepted: service ranges, reserved ports
        # and listening ports are configuration, not schema.
        "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(MAX_EXAMPLES),
        "--phases", "examples,coverage,fuzzing",
        "--request-timeout", "10",
        "--output-truncate", "true",
        "--report", "junit", "--report-dir", str(tmp_path),
        check=False, timeout=150, env={**os.environ, "NO_COLOR": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20000:]
    assert "passed" in output
    # Whatever it did, the kernel still equals the store, and the daemon is ready.
    assert docs_set(api.list()) == gw.kernel_docs()
    assert api.get("/api/ready").status == 200
    assert "Traceback" not in gw.log()
