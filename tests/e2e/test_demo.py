"""`oakestra-gw demo` as a user runs it: to the end with visible success, and leaving nothing
behind (no namespace, no process, no file), also when interrupted with Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gw import lab as L

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

DEMO = [str(Path(sys.executable).with_name("oakestra-gw")), "demo"]


def leftovers(tag: str) -> list[str]:
    found = [n for n in (f"{L.PREFIX}-{tag}-{r}" for r in L.ROLES) if L.ns_path(n).exists()]
    procs = subprocess.run(["pgrep", "-af", f"oakestra-gw-lab/{tag}/"], capture_output=True,
                           text=True).stdout.strip()
    if procs:
        found.append(procs)
    if (L.LAB_ROOT / tag).exists():
        found.append(str(L.LAB_ROOT / tag))
    return found


def tag_of(output: str) -> str:
    m = re.search(rf"{L.PREFIX}-(\S+)-client", output)
    assert m, output
    return m[1]


def test_the_demo_runs_to_the_end_and_leaves_nothing_behind():
    proc = subprocess.run(DEMO, capture_output=True, text=True, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "SUCCESS: the client reached the worker's service through the gateway" in out
    assert f"it sees you as {L.INTERNAL_V4}" in out and f"it sees you as {L.INTERNAL_V6}" in out
    assert f"echo hello (from {L.INTERNAL_V4})" in out
    assert f"echo hello (from {L.INTERNAL_V6})" in out
    assert "5000000 bytes" in out
    assert "dport=8080 src=10.30.0.1 dst=10.30.255.1 sport=80" in out  # conntrack, both NATs
    # One egress request after the ingress ones: the public server saw the public address,
    # and conntrack shows the masquerade.
    assert out.index("worker$ curl") > out.index("client$ curl")
    assert f"hello from the client namespace's server at {L.CLIENT_V4}; it sees you as " \
           f"{L.GATEWAY_V4}" in out
    assert f"src={L.CONTAINER_V4} dst={L.CLIENT_V4}" in out
    assert f"src={L.CLIENT_V4} dst={L.GATEWAY_V4} sport=80" in out
    assert "map expose_v4" in out  # the ruleset
    assert "removed the lab" in out
    assert leftovers(tag_of(out)) == []


def test_ctrl_c_removes_everything():
    proc = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # interrupt once the daemon runs and traffic flows
            lines.append(line)
            if "client$ curl" in line:
                break
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        lines.append(proc.stdout.read())
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert "interrupted" in out and "removed the lab" in out, out
    assert leftovers(tag_of(out)) == []
