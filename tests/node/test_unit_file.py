"""The systemd unit: it verifies cleanly and its hardening keeps systemd-analyze's exposure
level at or below 2.5."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gw.daemon.server import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "oakestra-gw.service"
ROLE_UNIT = REPO / "ansible" / "roles" / "oakestra_gateway" / "files" / "oakestra-gw.service"
EXEC = "/opt/oakestra-gw/bin/oakestra-gw"
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (Debian: systemd)")


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_role_installs_this_unit():
    # The role ships the unit through a symlink, so there is one copy to maintain.
    assert ROLE_UNIT.resolve() == UNIT.resolve()


def test_lifecycle_directives():
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == [f"{EXEC} serve --config /etc/oakestra-gw/gateway.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "ExecStop" not in d and "ExecStopPost" not in d, "stopping must leave the rules"
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]  # a bad config: no loop
    assert d["WatchdogSec"] and d["StateDirectory"] == ["oakestra-gw"]
    assert d["ConfigurationDirectory"] == ["oakestra-gw"]
    assert "network-online.target" in " ".join(d["After"]) and \
        "network-online.target" in " ".join(d["Wants"])
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]


@needs_analyze
def test_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart exists. It is installed by the role (the node test verifies
    # the real one inside the node); here a stand-in takes its place and nothing else changes.
    stub = tmp_path / "oakestra-gw"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(EXEC) == 1
    unit = tmp_path / "oakestra-gw.service"
    unit.write_text(text.replace(EXEC, str(stub)))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    # verify exits 0 on unknown keys and only warns: any word about our unit is a failure.
    complaints = [line for line in (res.stdout + res.stderr).splitlines()
                  if "oakestra-gw" in line]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr


@needs_analyze
def test_verify_catches_a_typo(tmp_path):
    # The check above can fail: a misspelt key is reported.
    unit = tmp_path / "oakestra-gw.service"
    unit.write_text(UNIT.read_text().replace("WatchdogSec=", "WatchdogSc=")
                    .replace(EXEC, "/bin/true"))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert "WatchdogSc" in res.stdout + res.stderr


def exposure(unit: Path) -> float:
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                          str(unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", res.stdout)
    assert match, f"no exposure level in:\n{res.stdout}{res.stderr}"
    return float(match.group(1))


@needs_analyze
def test_security_exposure_at_most_2_5():
    level = exposure(UNIT)
    print(f"systemd-analyze security: exposure {level}")
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}"


@needs_analyze
def test_exposure_check_can_fail(tmp_path):
    # Without the hardening the same parser reports a high exposure.
    bare = tmp_path / "oakestra-gw.service"
    bare.write_text("[Service]\nType=notify\nExecStart=/bin/true\n")
    assert exposure(bare) > MAX_EXPOSURE
