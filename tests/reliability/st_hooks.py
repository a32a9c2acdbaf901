"""schemathesis hooks for tests/reliability/test_hostile.py (SCHEMATHESIS_HOOKS): a check that a
rejected request (any 4xx/5xx to a mutating route) changed nothing: not the exposures the daemon
serves, not its store files, not the kernel's maps. Runs inside the daemon's namespace; the
daemon's address, token and store directory come from the environment."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import schemathesis

from tests import oracle

API = os.environ["OAKGW_ST_API"]
TOKEN = os.environ["OAKGW_ST_TOKEN"]
STORE_DIR = Path(os.environ["OAKGW_ST_STORE_DIR"])
TALLY = Path(os.environ["OAKGW_ST_TALLY"])  # one line per rejected request compared
_before: dict[str, object] = {}


def _state() -> tuple:
    req = urllib.request.Request(f"{API}/api/service/exposure",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        served = json.loads(resp.read())["exposures"]
    files = {p.name: p.read_bytes() for p in STORE_DIR.iterdir()
             if p.is_file() and not p.name.endswith(".lock")}
    maps = oracle.read()  # None: no table, which differs from an empty one
    return sorted(json.dumps(d, sort_keys=True) for d in served), files, maps


def _mutating(case) -> bool:
    return case.method.upper() == "POST"


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if _mutating(case):
        _before["state"] = _state()


@schemathesis.check
def rejected_request_changes_nothing(ctx, response, case):
    if not _mutating(case) or response.status_code < 400:
        return None
    before = _before.get("state")
    after = _state()
    if before != after:
        raise AssertionError(f"a {response.status_code} answer to {case.method} {case.path} "
                             f"changed the state:\nbefore {before}\nafter  {after}")
    with open(TALLY, "a") as f:
        f.write(f"{response.status_code} {case.path}\n")
    return None
