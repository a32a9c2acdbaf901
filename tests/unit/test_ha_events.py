"""keepalived's notify lines as events and roles, what each role asks of conntrackd, and the
role file between `ha notify` and the daemon. The lines are those keepalived 2.2.7 wrote in
tests/ha/test_ha_notify.py's run (and keepalived.conf(5) describes)."""

from __future__ import annotations

import json
import subprocess

import pytest
from hypothesis import given, strategies as st

from gw.core import ha_events as he
from gw.core.config import parse_config
from gw.service.ha_notify import Notifier
from gw.service.ha_role import RoleFile


@pytest.mark.parametrize("line, event", [
    ('GROUP "oakestra_gw" MASTER 0\n', he.Event("GROUP", "oakestra_gw", "MASTER", 0)),
    ('INSTANCE "public_v4" BACKUP 100', he.Event("INSTANCE", "public_v4", "BACKUP", 100)),
    ('INSTANCE "internal_v6" STOP 100', he.Event("INSTANCE", "internal_v6", "STOP", 100)),
    ('GROUP "oakestra_gw" FAULT', he.Event("GROUP", "oakestra_gw", "FAULT", None)),
    ('INSTANCE "public_v4" MASTER_RX_LOWER_PRI 150',
     he.Event("INSTANCE", "public_v4", "MASTER_RX_LOWER_PRI", 150)),
])
def test_keepalived_lines_parse(line, event):
    assert he.parse_line(line) == event


@pytest.mark.parametrize("line", [
    "", "\n", "garbage", 'GROUP oakestra_gw MASTER 0', 'GROUP "oakestra_gw" master 0',
    'GROUP "oakestra_gw" PROMOTED 0', 'VS [192.168.201.15]:tcp:80 UP',
    'GROUP "oakestra_gw" MASTER 0 extra', 'GROUP "a"b" MASTER 0', 'GROUP "x" MASTER -1',
])
def test_other_lines_are_bad_lines_with_a_reason(line):
    with pytest.raises(he.BadLine) as exc:
        he.parse_line(line)
    assert str(exc.value)


@given(st.text(max_size=200))
def test_no_text_crashes_the_parser(text):
    try:
        event = he.parse_line(text)
    except he.BadLine:
        return
    assert event.kind in he.TYPES
    assert event.state in he.GROUP_ROLES or event.state in he.OTHER_STATES


@given(st.sampled_from(he.TYPES), st.text(st.characters(blacklist_characters='"\n\r'),
                                          max_size=40),
       st.sampled_from(sorted(he.GROUP_ROLES) + sorted(he.OTHER_STATES)),
       st.integers(0, 255))
def test_every_well_formed_line_round_trips(kind, name, state, priority):
    assert he.parse_line(f'{kind} "{name}" {state} {priority}\n') == \
        he.Event(kind, name, state, priority)


def test_only_the_sync_group_decides_the_role():
    group = he.Event("GROUP", "oakestra_gw", "MASTER", 0)
    assert he.role_of(group) == "master"
    assert he.role_of(he.Event("GROUP", "oakestra_gw", "STOP", 0)) == "stopped"
    assert he.role_of(he.Event("INSTANCE", "public_v4", "MASTER", 100)) is None
    assert he.role_of(he.Event("GROUP", "another", "MASTER", 0)) is None
    assert he.role_of(he.Event("GROUP", "oakestra_gw", "MASTER_PRIORITY", 0)) is None


def plan(role, external_cache):
    return [s.role or " ".join(s.args) or ("hold" if s.hold else "lift")
            for s in he.steps(role, external_cache)]


def test_promotion_commits_and_lifts_the_hold_before_it_says_master():
    assert plan("master", True) == ["promoting", "-c", "lift", "-f", "-R", "-B", "master"]
    # Without the external cache the flows are in the kernel already: nothing to commit
    # (and no hold was set; lifting removes a stale one).
    assert plan("master", False) == ["promoting", "lift", "-f", "-R", "-B", "master"]


def test_demotion_holds_then_tells_the_daemon_then_conntrackd():
    assert plan("backup", True) == ["hold", "backup", "-t", "-n"]
    assert plan("fault", True) == ["hold", "fault", "-t"]
    assert plan("stopped", True) == ["hold", "stopped"]
    # -t would flush the flows the peer synced into this kernel.
    assert plan("backup", False) == ["backup", "-n"]
    assert plan("fault", False) == ["fault"]
    assert plan("stopped", False) == ["stopped"]


def test_role_record_round_trips_and_bad_files_are_unknown():
    text = he.role_record("master", 1700000000.1234, 'GROUP "oakestra_gw" MASTER', "x failed")
    assert he.read_record(text) == {"role": "master", "since": 1700000000.123,
                                    "failed": "x failed"}
    assert he.read_record("{") == {"role": "unknown", "problem": "the role file is not JSON"}
    assert he.read_record('{"role": "chief"}')["role"] == "unknown"
    assert he.read_record('{"role": "backup", "since": true}') == {"role": "backup",
                                                                    "since": None}
    with pytest.raises(ValueError):
        he.role_record("chief", 0)


# -- the notify's state logic, with a recorder for conntrackd -------------------------------

def ha_settings(tmp_path, external_cache=False):
    return parse_config({
        "network": {"internal_ipv4": "10.30.255.254", "internal_ipv6": "fdff::fe"},
        "ha": {"enabled": True, "public_interface": "pub0",
               "public_addresses": ["198.18.0.10/24"], "sync_interface": "sync0",
               "sync_address": "192.168.100.1", "sync_peer": "192.168.100.2",
               "state_dir": str(tmp_path), "conntrack_external_cache": external_cache}}).ha


class Recorder:
    """conntrackd's client and nft as subprocess.run: records each call ("hold" and "lift"
    for nft) and the role file's role at that moment, so a test sees the order of all."""

    def __init__(self, settings, fail=(), missing=False):
        self.settings, self.fail, self.missing = settings, fail, missing
        self.calls = []

    def __call__(self, argv, **kw):
        if self.missing:
            raise FileNotFoundError(argv[0])
        what = argv[-1] if argv[0] == "conntrackd" else (
            "hold" if "chain hold" in kw["input"] else "lift")
        self.calls.append((what, RoleFile(self.settings.role_file).read()["role"]))
        rc = 1 if argv[-1] in self.fail else 0
        return subprocess.CompletedProcess(argv, rc, "", "cannot connect to socket" if rc else "")


def test_promotion_order_with_the_external_cache(tmp_path):
    settings = ha_settings(tmp_path, external_cache=True)
    recorder = Recorder(settings)
    notifier = Notifier(settings, run=recorder, clock=lambda: 1700000000.0)
    notifier.line('INSTANCE "public_v4" MASTER 100')
    assert recorder.calls == [] and RoleFile(settings.role_file).read() == {"role": "unknown"}
    notifier.line('GROUP "oakestra_gw" MASTER 0')
    assert recorder.calls == [("-c", "promoting"), ("lift", "promoting"), ("-f", "promoting"),
                              ("-R", "promoting"), ("-B", "promoting")]
    assert RoleFile(settings.role_file).read() == {"role": "master", "since": 1700000000.0}
    recorder.calls.clear()
    notifier.line('GROUP "oakestra_gw" BACKUP 0')
    assert recorder.calls == [("hold", "master"), ("-t", "backup"), ("-n", "backup")]


def test_a_failing_or_missing_conntrackd_is_noted_and_the_role_still_changes(tmp_path, caplog):
    settings = ha_settings(tmp_path)
    recorder = Recorder(settings, fail=("-R",))
    Notifier(settings, run=recorder).line('GROUP "oakestra_gw" MASTER 0')
    assert [c for c, _ in recorder.calls] == ["lift", "-f", "-R", "-B"]
    record = RoleFile(settings.role_file).read()
    assert record["role"] == "master"
    assert record["failed"] == "conntrackd -R failed (1): cannot connect to socket"

    missing = Recorder(settings, missing=True)
    notifier = Notifier(settings, run=missing)
    notifier.line('GROUP "oakestra_gw" BACKUP 0')
    record = RoleFile(settings.role_file).read()
    assert record["role"] == "backup" and "conntrackd is not installed" in record["failed"]
    notifier.line('GROUP "oakestra_gw" MASTER 0')
    assert RoleFile(settings.role_file).read()["role"] == "master"
    # One error per change, not one per step (nft, missing too, says so once per change).
    assert sum("conntrackd is not installed" in r.message for r in caplog.records) == 2


def test_garbage_is_logged_and_skipped(tmp_path, caplog):
    settings = ha_settings(tmp_path)
    notifier = Notifier(settings, run=Recorder(settings))
    for line in ("nonsense", 'GROUP "oakestra_gw" SOMETHING 0', "\x00\xff"):
        notifier.line(line)
    assert RoleFile(settings.role_file).read() == {"role": "unknown"}
    assert sum("ignored" in r.message for r in caplog.records) == 3


def test_the_role_file_is_read_again_only_when_replaced(tmp_path):
    settings = ha_settings(tmp_path)
    roles = RoleFile(settings.role_file)
    assert roles.read() == {"role": "unknown"}
    Notifier(settings, run=Recorder(settings), clock=lambda: 5.0).line(
        'GROUP "oakestra_gw" FAULT 0')
    assert roles.read() == {"role": "fault", "since": 5.0}
    (tmp_path / "role").write_text("not json")
    assert roles.read()["problem"] == "the role file is not JSON"
    assert json.loads(he.role_record("backup", 6.0))["role"] == "backup"


def test_notify_without_ha_says_why_in_its_log(tmp_path):
    """keepalived discards the script's stderr: a refusal must reach the log."""
    from click.testing import CliRunner

    from gw.cli import main

    config = tmp_path / "gateway.toml"
    config.write_text('[network]\ninternal_ipv4 = "10.30.255.254"\n')
    log = tmp_path / "notify.log"
    result = CliRunner().invoke(main, ["ha", "notify", "--config", str(config), "--log-file",
                                       str(log), str(tmp_path / "fifo")])
    assert result.exit_code == 1
    assert "ha.enabled is not true" in log.read_text()
    assert not (tmp_path / "fifo").exists()  # nothing created
    config.write_text('[ha]\nenabled = "yes"\n')
    result = CliRunner().invoke(main, ["ha", "notify", "--config", str(config), "--log-file",
                                       str(log)])
    assert result.exit_code == 2 and "ha.enabled" in log.read_text().splitlines()[-1]


def test_the_hold_script_drops_only_outside_traffic_to_the_floating_addresses():
    import ipaddress

    from gw.core import ha_hold

    text = ha_hold.hold_script([ipaddress.ip_address("198.18.0.10"),
                                ipaddress.ip_address("2001:db8::10"),
                                ipaddress.ip_address("10.30.255.254")])
    assert text.startswith("table inet oakestra_gw_ha\ndelete table inet oakestra_gw_ha\n")
    assert "elements = { 198.18.0.10, 10.30.255.254 }" in text
    assert "elements = { 2001:db8::10 }" in text
    assert text.index('iifname "lo" accept') < text.index("@held_v4 counter drop")
    v4_only = ha_hold.hold_script([ipaddress.ip_address("198.18.0.10")])
    assert "held_v6" not in v4_only
    assert ha_hold.lift_script().splitlines()[-1] == "delete table inet oakestra_gw_ha"
