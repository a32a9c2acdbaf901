"""The smaller findings of issue 12 (item 10), each against the real daemon:

- a drift repair that fails is tried again until it succeeds;
- `/api/ready` never shows what the monitor saw (map elements);
- a store outside the unit's StateDirectory is refused (`config check`, and the daemon under
  the unit), since ProtectSystem=strict would make it read-only;
- the unit's TimeoutStartSec covers the longest `oakestra.give_up_after` the config accepts;
- stored exposures are checked against reserved and listening ports at start, not only at add.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gw.daemon.faults import REFUSE_ENV
from tests.api.harness import gw_command
from tests.helpers import wait_for
from tests.reliability.daemon import docs_set, gateway

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "oakestra-gw.service"
FOREIGN = "tcp . 9999 : 10.30.7.7 . 8777"
WEB = {"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80}


def test_a_failed_drift_repair_is_retried_and_ready_hides_the_monitor_lines(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        # The two repairs after the start fail as a kernel refusal would; the third may work.
        gw.start(env={REFUSE_ENV: "2"})
        api = gw.http()
        assert api.add(WEB).status == 201
        want = docs_set(api.list())
        gw.nft("add", "element", "inet", "oakestra_gw", "expose_v4", "{ " + FOREIGN + " }")
        gw.wait_log("drift: repair failed")
        public = api.get("/api/ready", token=None)
        private = api.get("/api/ready")
        print("ready without the token:", public.body.decode())
        assert public.status == private.status == 503
        assert "drift" in public.json["reasons"]
        # What the monitor printed (the foreign element) stays in the log, not in the answer.
        assert "10.30.7.7" in gw.log()
        for answer in (public, private):
            assert "10.30.7.7" not in answer.body.decode(), answer
            assert "8777" not in answer.body.decode(), answer
        # Retried without any new event: the table comes back, ready again.
        wait_for(lambda: gw.kernel_docs() == want, timeout=30, what="the repair, retried",
                 log=gw.log)
        wait_for(lambda: api.get("/api/ready").status == 200, timeout=10, what="ready",
                 log=gw.log)
        log = gw.log(since_start=True)
        assert len(re.findall(r"drift: repair failed", log)) == 2, log
        assert "drift: repaired" in log, log
        assert gw.stop() == 0


# -- the store under the unit's StateDirectory --------------------------------------------------

def write(tmp_path, store: str, extra: str = "") -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[api]\nhost = "127.0.0.1"\n[store]\npath = "{store}"\n[network]\n'
                    f'internal_ipv4 = "10.30.255.1"\ninternal_ipv6 = "fdff::ffff:1"\n{extra}')
    return str(path)


def test_config_check_refuses_a_store_outside_the_state_directory(tmp_path):
    """ProtectSystem=strict leaves only the StateDirectory writable (and a private /tmp that
    vanishes): a store elsewhere cannot be written under the unit."""
    for store in ("/srv/oakestra-gw/exposures.json", "/tmp/exposures.json",
                  "/var/lib/oakestra-gw-other/exposures.json", "/var/lib/exposures.json"):
        r = cli("config", "check", write(tmp_path, store), check=False)
        assert r.returncode == 2, (store, r)
        assert r.stderr.count("\n") == 1 and "store.path" in r.stderr, r.stderr
        assert "/var/lib/oakestra-gw" in r.stderr, r.stderr
    ok = cli("config", "check", write(tmp_path, "/var/lib/oakestra-gw/sub/exposures.json"))
    assert ok.returncode == 0 and "ok:" in ok.stdout, ok
    # Another state directory (as systemd tells the daemon in $STATE_DIRECTORY).
    other = tmp_path / "state"
    ok = cli("config", "check", write(tmp_path, f"{other}/exposures.json"),
             "--state-directory", str(other))
    assert ok.returncode == 0, ok


def test_the_daemon_under_the_unit_refuses_a_store_outside_its_state_directory(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        state = tmp_path / "unit-state"
        state.mkdir()
        gw.start(wait=False, env={"STATE_DIRECTORY": str(state)})
        assert gw.proc.wait(timeout=60) == 2, gw.log()
        assert "store.path" in gw.log() and str(state) in gw.log(), gw.log()
        assert not gw.store_dir.exists() or gw.store_files() == {}, gw.store_files()
        # Inside it, the daemon starts.
        gw.config["store"]["path"] = str(state / "exposures.json")
        gw.write_config()
        gw.start(env={"STATE_DIRECTORY": str(state)})
        assert gw.http().add(WEB).status == 201
        assert gw.stop() == 0


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*gw_command(), *args], capture_output=True, text=True, timeout=60,
                          check=check)


# -- TimeoutStartSec covers the longest first start ----------------------------------------

def unit_value(key: str) -> str:
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key} not in {UNIT}")


def test_the_unit_waits_longer_than_the_longest_allowed_first_start(tmp_path):
    """A first start retries the cluster for up to oakestra.give_up_after, then loads the
    table and binds the API: systemd must not kill it first (TimeoutStartSec)."""
    timeout = float(unit_value("TimeoutStartSec").removesuffix("s"))
    accepted = []
    for seconds in (60, 120, 150, 170, 300, 86400):
        r = cli("config", "check", write(tmp_path, "/var/lib/oakestra-gw/exposures.json",
                                          f'[oakestra]\ncluster_url = "http://10.30.0.9:10000"\n'
                                          f"give_up_after = {seconds}\n"), check=False)
        if r.returncode == 0:
            accepted.append(seconds)
        else:
            assert r.returncode == 2 and "oakestra.give_up_after" in r.stderr, r
    print(f"TimeoutStartSec={timeout:g}; give_up_after accepted: {accepted}")
    assert 120 in accepted  # the default
    # What is left of the start after giving up (store, table, bind) needs its margin too.
    assert max(accepted) + 20 <= timeout, (accepted, timeout)


# -- stored exposures against local ports, at start --------------------------------------------

def test_stored_exposures_are_checked_against_local_ports_at_start(tmp_path):
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        api = gw.http()
        for port in (8080, 8081, 8082):
            assert api.add({**WEB, "exposed_port": port}).status == 201
        assert gw.stop() == 0
        # While the daemon is down, a local service starts on 8080, and the operator reserves
        # 8081. 8082 stays clean (the control).
        listener = gw.ns.popen(sys.executable, "-c", LISTEN, "8080", stdout=subprocess.PIPE,
                               text=True)
        try:
            assert listener.stdout.readline().strip() == "listening"
            gw.config["network"]["reserved_ports"] = ["22/tcp", "50103/udp", "8081/tcp"]
            gw.write_config()
            gw.start()
            log = gw.wait_log("shadow", timeout=20)
            page = api.get("/metrics").body.decode()
        finally:
            listener.kill()
            listener.wait()
        print([line for line in log.splitlines() if "shadow" in line or "reserved" in line])
        assert re.search(r"8080/tcp.*in use by a process on the gateway", log), log
        assert re.search(r"8081/tcp.*reserved", log), log
        assert "8082/tcp" not in log, log
        assert re.search(r"^oakestra_gw_exposures_conflicting 2\.0$", page, re.M), page
        # Kept (the store is the truth, traffic goes on), and the answer says what to do.
        assert {d["exposed_port"] for d in api.list()} == {8080, 8081, 8082}
        assert gw.stop() == 0


LISTEN = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("listening", flush=True)
time.sleep(600)
"""
