"""Running the role's playbook (ansible/site.yml) against booted test nodes, and reading its
recap: what the node tests (test_node.py, test_pair_nodes.py) share."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import nodelab

ANSIBLE = nodelab.REPO / "ansible"
BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                   r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+).*$", re.M)


def requirements() -> str | None:
    """Why the node tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, systemd-nspawn)"
    missing = nodelab.tools_missing()
    if missing:
        return f"missing {', '.join(missing)} (apt-get install debootstrap systemd-container)"
    if not (BIN / "ansible-playbook").exists():
        return "ansible is not installed in this virtualenv (pip install ansible)"
    return None


def node_rootfs() -> Path:
    """The cached root file system the nodes boot from. Skips the test where node tests cannot
    run; fails it where they could but the cache was not prepared."""
    reason = requirements()
    if reason:
        pytest.skip(reason)
    unprepared = nodelab.prepared()
    if unprepared:
        pytest.fail(unprepared)
    return nodelab.ensure_rootfs()


def snapshot_source(dest: Path) -> Path:
    """The checkout as it is now: every playbook run of a module builds from the same source,
    so a second run is judged on the role, not on edits made meanwhile."""
    dest.mkdir()
    excludes = [f"--exclude={p}" for p in (".git", ".venv", "build", "dist", "*.egg-info",
                                           "__pycache__", ".pytest_cache", ".hypothesis",
                                           "site", "tests")]
    subprocess.run(f"tar -C {nodelab.REPO} {' '.join(excludes)} -cf - . | tar -C {dest} -xf -",
                   shell=True, check=True)
    return dest


def conntrack_max(node: nodelab.Machine) -> int:
    """Only the host's initial namespace may set nf_conntrack_max (a node's copy is read-only):
    the value the node already has, for the role, so that the live setting is a no-op."""
    res = node.run("cat", "/proc/sys/net/netfilter/nf_conntrack_max", check=False)
    return int(res.stdout) if res.returncode == 0 else 0


def offline_build_vars(src: Path) -> dict:
    """The role's variables for building from `src` without PyPI (the test run has no route
    to it): the controller-side build resolves the dependencies from the prepared cache."""
    return {"oakestra_gateway_source_dir": str(src),
            "oakestra_gateway_pip_wheel_args": ["--no-index", "--find-links",
                                                str(nodelab.wheels_dir())]}


def run_playbook(inventory: Path, tmp: Path, *args: str,
                 **extra_vars) -> subprocess.CompletedProcess:
    """`ansible-playbook -i inventory site.yml args`, with `.elapsed` (seconds); its output is
    also kept in `tmp`."""
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), "site.yml", *args]
    if extra_vars:
        argv += ["--extra-vars", json.dumps(extra_vars)]
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp), ANSIBLE_HOME=str(tmp / "ansible-home"),
               PATH=f"{BIN}:{os.environ['PATH']}")
    t0 = time.monotonic()
    res = subprocess.run(argv, cwd=ANSIBLE, env=env, capture_output=True, text=True,
                         timeout=900)
    res.elapsed = time.monotonic() - t0
    (tmp / f"playbook-{time.time():.3f}.log").write_text(res.stdout + res.stderr)
    return res


def recaps(res: subprocess.CompletedProcess) -> dict[str, dict]:
    """The play recap by host: ok, changed, unreachable, failed and the line itself."""
    out = {}
    for match in RECAP.finditer(res.stdout):
        row = {k: (int(v) if v.isdigit() else v) for k, v in match.groupdict().items()}
        row["line"] = match.group(0).strip()
        out[row["host"]] = row
    assert out, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def recap(res: subprocess.CompletedProcess) -> dict:
    """The recap of a run on one host."""
    return next(iter(recaps(res).values()))


def assert_changed_nothing(res: subprocess.CompletedProcess) -> None:
    """The run succeeded with changed=0 on every host; else the tasks that changed."""
    rows = recaps(res).values()
    changed = re.findall(r"^changed: \[.*$|^TASK \[.*$", res.stdout, re.M)
    assert res.returncode == 0 and all(r["changed"] == 0 and r["failed"] == 0 for r in rows), \
        "\n".join(changed) + res.stdout[-3000:]
