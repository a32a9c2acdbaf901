"""In a pair the API listens where the cluster calls it, the floating internal IPv4, on the
backup as well (bound with IP_FREEBIND, so it answers as soon as keepalived brings the address),
and on loopback, where this node's own clients (the watchdog, the CLI) reach this node's daemon
and not whichever gateway holds the floating address."""

from __future__ import annotations

import sys

import pytest

from gw.lab.http import NetnsHttp
from tests.api.harness import INTERNAL_V4, ROOT, GatewayTestbed, gw_command, require_root
from tests.helpers import wait_for

from .test_ha_notify import ha_table

pytestmark = [pytest.mark.kernel]


@pytest.fixture
def backup(tmp_path):
    """A daemon of a pair whose floating addresses are elsewhere: none of them is local."""
    require_root()
    gw = GatewayTestbed(tmp_path, config={"api": {"host": INTERNAL_V4},
                                          "ha": ha_table(tmp_path / "ha")})
    try:
        gw.open_path()  # the worker: SERVICE_V4 on the tunnel's segment, the cluster's side
        gw.start()
        yield gw
    finally:
        gw.close()


def from_the_worker(gw, timeout: float = 1.0) -> NetnsHttp:
    return NetnsHttp(gw.worker.name, host=INTERNAL_V4, port=gw.api_port, timeout=timeout,
                     token=None)


def health_from_the_worker(gw) -> int | None:
    try:
        return from_the_worker(gw).get("/api/health").status
    except OSError:
        return None


def test_the_backup_listens_on_the_floating_address_and_answers_once_it_holds_it(backup):
    gw = backup
    assert INTERNAL_V4 not in gw.ns.run("ip", "-o", "addr").stdout  # keepalived's to add
    assert "http://10.30.255.1:11022, http://127.0.0.1:11022" in gw.log()
    assert health_from_the_worker(gw) is None  # nobody holds the address yet
    # What keepalived does when this gateway becomes master.
    gw.ns.run("ip", "addr", "add", f"{INTERNAL_V4}/32", "dev", "goProxyTun")
    wait_for(lambda: health_from_the_worker(gw) == 200, timeout=10,
             what="the API on the floating address, from the cluster's side",
             log=gw.log_tail)
    assert gw.proc.poll() is None  # the same process: no restart was needed


def test_on_the_node_the_cli_and_the_watchdog_reach_this_nodes_daemon(backup):
    gw = backup
    assert gw.api_host == "127.0.0.1"
    status = gw.ns.run(*gw_command(), "status", "--config", str(gw.config_path), check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "ha:" in status.stdout, status.stdout
    # The watchdog's probe (Daemon.healthy) asks where a client on this node asks: it gets
    # this daemon's answer, while the floating address answers nothing here (and on a real
    # pair would reach the master's daemon).
    probe = ("import sys; from gw.core.config import load_config; "
             "from gw.daemon.systemd import api_answers; s = load_config(sys.argv[1]); "
             "print(api_answers(s.api_local_host, s.api.port, 2), "
             "api_answers(s.api_host, s.api.port, 1))")
    out = gw.ns.run(sys.executable, "-c", probe, str(gw.config_path), cwd=ROOT).stdout
    assert out.split() == ["True", "False"], out
