"""The stand-in orchestrator is pinned to the contract as documented (docs/oakestra.md, the
cluster side's payloads), not to what the gateway's client happens to send: the key sets of
every request and answer are read from the document's table and checked against the stand-in."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from tests.oakestra.orchestrator import READY_KEYS, REGISTER_KEYS, Orchestrator

DOC = Path(__file__).resolve().parents[2] / "docs" / "oakestra.md"


def documented_steps() -> dict[str, list[set[str]]]:
    """step name -> the key sets of its row, in order (request body, then answer)."""
    steps = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"\| \d\. (\w[\w ]*?) \| (.*)", line)
        if row:
            steps[row[1]] = [set(re.findall(r'"(\w+)"', group))
                             for group in re.findall(r"`\{[^}]*\}`", row[2])]
    return steps


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


def test_the_stand_in_speaks_the_documented_contract():
    steps = documented_steps()
    (register_in, register_out), (ip_out,), (ready_in,) = (
        steps["register"], steps["addresses"], steps["ready"])
    assert REGISTER_KEYS == register_in and READY_KEYS == ready_in
    with Orchestrator(port=0).running() as orch:
        body = {"gateway_id": "", "gateway_ipv4": "198.18.0.1", "gateway_ipv6": "2001:db8::1"}
        status, answer = call(f"{orch.url}/api/gateway/register", body)
        assert status == 200 and set(answer) == register_out, answer
        gid = answer["gateway_id"]
        status, answer = call(f"{orch.url}/api/gateway/{gid}/ip")
        assert status == 200 and set(answer) == ip_out, answer
        ready = {"oakestra_gateway_ipv4": answer["oakestra_gateway_ipv4"],
                 "oakestra_gateway_ipv6": answer["oakestra_gateway_ipv6"],
                 "api_port": 11022, "api_token": "t" * 24}
        assert set(ready) == ready_in
        assert call(f"{orch.url}/api/gateway/{gid}/ready", ready)[0] // 100 == 2
        # A payload off the contract is refused: the stand-in checks, it does not echo.
        assert call(f"{orch.url}/api/gateway/register", {**body, "extra": 1})[0] == 400
        assert call(f"{orch.url}/api/gateway/{gid}/ready",
                    {k: v for k, v in ready.items() if k != "api_token"})[0] == 400
