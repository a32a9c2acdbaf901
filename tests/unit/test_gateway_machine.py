"""The gateway's state machine (tests/gateway_machine.py) against the in-memory nftables,
without root; tests/kernel/test_gateway.py runs the same machine against the kernel."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.gateway_machine import MACHINE_SETTINGS, FakeKernel, GatewayMachine

ROOT = Path(__file__).resolve().parents[2]


class OnTheFake(GatewayMachine):
    Kernel = FakeKernel


TestGatewayMachineOnTheFake = OnTheFake.TestCase
TestGatewayMachineOnTheFake.settings = MACHINE_SETTINGS


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root to show the machine needs none")
def test_the_machine_passes_as_an_unprivileged_user():
    """As nobody, with no groups: the unit tier's machine runs and passes."""
    nobody = pwd.getpwnam("nobody")
    home = tempfile.mkdtemp(prefix="gw-nobody-")
    try:
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "PYTHONDONTWRITEBYTECODE": "1", "HYPOTHESIS_STORAGE_DIRECTORY": home,
               "PYTHONPATH": str(ROOT)}
        check = ("import os, sys; print('uid', os.geteuid(), os.getegid(), os.getgroups()); "
                 "import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
                 f"'{Path(__file__).resolve()}::TestGatewayMachineOnTheFake']))")
        proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               sys.executable, "-c", check], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"uid {nobody.pw_uid} {nobody.pw_gid} []" in proc.stdout, proc.stdout
    assert "1 passed" in proc.stdout, proc.stdout
