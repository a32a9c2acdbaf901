"""The rendered configurations pass the tools' own checks, on a namespace that has the
interfaces they name: `keepalived --config-test`, and conntrackd (which has no check mode)
parses the file, opens its sync channel and answers its control socket."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gw import lab
from gw.core import ha
from gw.core.config import load_config

pytestmark = pytest.mark.kernel

CONFIG = """
[network]
internal_ipv4 = "10.30.255.254"
internal_ipv6 = "fdff::fe"

[ha]
enabled = true
router_id = "gw-a"
public_interface = "pub0"
public_addresses = ["198.18.0.10/24", "2001:db8::10/64"]
sync_interface = "sync0"
sync_address = "192.168.100.1"
sync_peer = "192.168.100.2"
state_dir = "{state}"
"""


@pytest.fixture
def node(tmp_path):
    """A namespace with the three links the configuration names (each a veth whose peer
    stays beside it) and the sync link's address."""
    with lab.netns("oakha") as ns:
        for ifname in ("pub0", "oakgw0", "sync0"):
            ns.run("ip", "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p")
            ns.run("ip", "link", "set", ifname, "up")
            ns.run("ip", "link", "set", f"{ifname}p", "up")
        ns.run("ip", "addr", "add", "192.168.100.1/24", "dev", "sync0")
        config = tmp_path / "gateway.toml"
        config.write_text(CONFIG.format(state=tmp_path))
        yield ns, config


def render(tool: str, config: Path, *extra: str) -> str:
    cli = Path(sys.executable).parent / "oakestra-gw"
    out = subprocess.run([str(cli), "ha", "render", tool, "--config", str(config), *extra],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


def test_keepalived_accepts_the_rendered_file(node):
    ns, config = node
    settings = load_config(config).ha
    Path(settings.keepalived_conf).write_text(render("keepalived", config))
    check = ns.run("keepalived", "--config-test", "-f", settings.keepalived_conf, check=False)
    assert check.returncode == 0, check.stderr
    assert "WARNING" not in check.stderr and "Unknown" not in check.stderr, check.stderr


def test_keepalived_check_catches_a_broken_file(node):
    """The check above is a real one: a misspelt keyword or an interface the node lacks fails."""
    ns, config = node
    settings = load_config(config).ha
    text = render("keepalived", config)
    for bad in (text.replace("preempt_delay", "preempt_dleay"),
                text.replace(f"interface {settings.public_interface}", "interface nosuch0")):
        assert bad != text
        Path(settings.keepalived_conf).write_text(bad)
        assert ns.run("keepalived", "--config-test", "-f", settings.keepalived_conf,
                      check=False).returncode != 0


def test_conntrackd_runs_with_the_rendered_file(node):
    ns, config = node
    settings = load_config(config).ha
    Path(settings.conntrackd_conf).write_text(render("conntrackd", config))
    daemon = ns.popen(*ha.conntrackd_command(settings), stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert daemon.poll() is None, daemon.stderr.read()
            stats = ns.run(*ha.conntrackd_command(settings, "-s"), check=False)
            if stats.returncode == 0:
                break
            assert time.monotonic() < deadline, stats.stderr
            time.sleep(0.1)
        assert "cache internal" in stats.stdout
        ns.run(*ha.conntrackd_command(settings, "-k"))
        assert daemon.wait(timeout=10) == 0
    finally:
        lab.stop_process(daemon)
    log = Path(settings.state_dir, "conntrackd.log").read_text()
    assert "ERROR" not in log, log
