"""The playbook and the role: ansible-lint's production profile (offline, no Galaxy) and
ansible-playbook's syntax check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install ansible ansible-lint)")
    return found


def env() -> dict[str, str]:
    return dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                NO_COLOR="1", ANSIBLE_LOCAL_TEMP=os.environ.get("TMPDIR", "/tmp"))


def test_syntax_check():
    res = subprocess.run([tool("ansible-playbook"), "--syntax-check", "-i",
                          "inventory.example.yml", "site.yml"], cwd=ANSIBLE, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ansible_lint_production_profile():
    res = subprocess.run([tool("ansible-lint"), "--offline", "--profile", "production",
                          "--nocolor", "site.yml", "roles/oakestra_gateway"], cwd=ANSIBLE,
                         env=env(), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Profile 'production' was required, and it passed" in out, out
