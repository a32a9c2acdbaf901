"""`oakestra-gw`: through click's CliRunner (in process) and as a real subprocess against a
running daemon in its namespace."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from click.testing import CliRunner

from gw.cli import main
from gw.core.exposure import Exposure
from tests.api.harness import (API_PORT, INTERNAL_V4, INTERNAL_V6, PUBLIC_V4, GatewayTestbed,
                               docs_set, gw_command, in_netns, require_root, running)
from tests.helpers import doc, wait_for

COMMANDS = [[], ["serve"], ["expose"], ["expose", "add"], ["expose", "delete"],
            ["expose", "list"], ["status"], ["rules"], ["rules", "show"], ["rules", "diff"],
            ["config"], ["config", "check"], ["store"], ["store", "check"], ["teardown"],
            ["demo"], ["ha"], ["ha", "render"]]


def invoke(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[api]
host = "127.0.0.1"
[store]
path = "{tmp_path}/state/exposures.json"
[network]
internal_ipv4 = "{INTERNAL_V4}"
internal_ipv6 = "{INTERNAL_V6}"
{extra}""")
    return str(path)


# -- without a daemon: CliRunner ------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_help_reads_like_a_man_page(command):
    r = invoke(*command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage: " in r.output
    assert "Example" in r.output, r.output


def test_config_check(tmp_path):
    good = write_config(tmp_path)
    r = invoke("config", "check", good, "--state-directory", str(tmp_path))
    assert r.exit_code == 0 and "ok: standalone" in r.output, r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[api]\nport = 0\n")
    r = invoke("config", "check", bad)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "api.port" in r.stderr, r.stderr
    bad.write_text("[network]\ninternal_ipv4 = '10.30.255.1'\n")
    r = invoke("config", "check", bad)
    assert r.exit_code == 2 and "network.internal_ipv6" in r.stderr
    r = invoke("config", "check", tmp_path / "missing.toml")
    assert r.exit_code == 2 and "no such file" in r.stderr
    mqtt = tmp_path / "mqtt.toml"
    mqtt.write_text('[oakestra]\nmqtt_url = ["mqtt://10.30.0.1:10003", "mqtt://10.30.0.2:10003"]\n'
                    'node_id = "node-1"\n')
    r = invoke("config", "check", mqtt)
    assert r.exit_code == 0, r.output
    assert "Oakestra MQTT mode (node node-1, mqtt://10.30.0.1:10003, mqtt://10.30.0.2:10003)" \
        in r.output
    mqtt.write_text('[oakestra]\nmqtt_url = "mqtt://10.30.0.1:10003"\n')
    r = invoke("config", "check", mqtt)
    assert r.exit_code == 2 and "oakestra.node_id" in r.stderr
    # A pair in Oakestra mode without the pair's id: one line naming the key.
    pair = tmp_path / "pair.toml"
    pair.write_text('[api]\nhost = "0.0.0.0"\n'
                    '[network]\ninternal_ipv4 = "10.30.255.254"\ninternal_ipv6 = "fdff::fe"\n'
                    '[oakestra]\ncluster_url = "http://10.30.0.5:10100"\n'
                    '[ha]\nenabled = true\npublic_interface = "pub0"\n'
                    'public_addresses = ["198.18.0.10/24"]\nsync_interface = "sync0"\n'
                    'sync_address = "192.168.100.1"\nsync_peer = "192.168.100.2"\n')
    r = invoke("config", "check", pair)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "oakestra.gateway_id must be set with ha.enabled" in r.stderr, r.stderr
    pair.write_text(pair.read_text().replace('cluster_url = "http://10.30.0.5:10100"',
                                             'cluster_url = "http://10.30.0.5:10100"\n'
                                             'gateway_id = "pair-1"'))
    r = invoke("config", "check", pair)
    assert r.exit_code == 0, r.output


def test_rules_show_renders_skeleton_and_stored_exposures(tmp_path):
    from gw.store.local import LocalStore

    config = write_config(tmp_path, 'reserved_ports = ["22/tcp"]\n')
    r = invoke("rules", "show", "--config", config)
    assert r.exit_code == 0, r.output
    assert "table inet oakestra_gw {" in r.stdout and "add element" not in r.stdout
    assert f"redefine internal_ipv4 = {INTERNAL_V4}" in r.stdout
    assert not (tmp_path / "state").exists()  # nothing stored yet, nothing created
    with LocalStore(tmp_path / "state" / "exposures.json") as store:
        store.commit(put=map(Exposure.from_dict, [
            {"exposed_port": 8080, "protocol": "tcp", "service_ip": "10.30.0.1",
             "service_port": 80, "family": "ipv4"},
            {"exposed_port": 53, "protocol": "udp", "service_ip": "fdff::1",
             "service_port": 53, "family": "ipv6"}]))
    r = invoke("rules", "show", "--config", config)
    assert r.exit_code == 0, r.output
    assert "add element inet oakestra_gw expose_v4 { tcp . 8080 : 10.30.0.1 . 80 }" in r.stdout
    assert "add element inet oakestra_gw expose_v6 { udp . 53 : fdff::1 . 53 }" in r.stdout
    r = invoke("rules", "show", "--config", config, "--no-exposures")
    assert "add element" not in r.stdout


@pytest.mark.kernel
def test_rules_show_is_a_valid_nft_script(tmp_path):
    require_root()
    r = invoke("rules", "show", "--config", write_config(tmp_path))
    check = subprocess.run(["nft", "-c", "-f", "-"], input=r.stdout, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr


def test_store_check(tmp_path):
    from gw.store.local import LocalStore

    config = write_config(tmp_path)
    r = invoke("store", "check", "--config", config)
    assert r.exit_code == 0 and "no store yet" in r.output
    path = tmp_path / "state" / "exposures.json"
    with LocalStore(path) as store:
        store.commit(put=[Exposure.from_dict({"exposed_port": 8080, "protocol": "tcp",
                                              "service_ip": "10.30.0.1", "service_port": 80})])
    r = invoke("store", "check", "--config", config)
    assert r.exit_code == 0 and "ok: 1 exposure(s)" in r.output, r.output
    with LocalStore(path):  # held for writing, as by the daemon
        r = invoke("store", "check", "--config", config)
        assert r.exit_code == 1 and "in use" in r.stderr
    path.write_text(path.read_text()[:-10])
    before = path.read_bytes()
    r = invoke("store", "check", "--config", config)
    assert r.exit_code == 1, r.output
    assert str(path) in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert path.read_bytes() == before  # never repaired behind the operator's back


@pytest.mark.parametrize("args, message", [
    (["expose", "add"], "give PORT and TARGET"),
    (["expose", "add", "8080"], "give PORT and TARGET"),
    (["expose", "add", "8080", "10.30.0.1"], "is not IP:PORT"),
    (["expose", "add", "8080", "10.30.0.1:http"], "is not IP:PORT"),
    (["expose", "add", "--ports", "8080:80"], "--ports needs --service-ip"),
    (["expose", "add", "8080", "10.30.0.1:80", "--ports", "1:1", "--service-ip", "10.30.0.1"],
     "not both"),
    (["expose", "add", "--ports", "80;x:y", "--service-ip", "10.30.0.1"], "entry 2"),
    (["expose", "delete"], "Missing argument"),
    (["expose", "delete", "8080", "--family", "ipv5"], "ipv5"),
])
def test_usage_errors_exit_2(args, message):
    r = invoke(*args, "--api", "http://127.0.0.1:1")
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_unreachable_daemon_is_one_line_and_exit_1(tmp_path):
    r = invoke("expose", "list", "--api", "http://127.0.0.1:9", "--timeout", "2")
    assert r.exit_code == 1
    assert r.stderr.startswith("oakestra-gw: cannot reach the gateway at http://127.0.0.1:9")
    assert r.stderr.count("\n") == 1


def test_demo_is_wired_lazily(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("gw.lab.demo")
    fake.main = lambda keep=False: calls.append(keep) or 0
    monkeypatch.setitem(sys.modules, "gw.lab.demo", fake)
    assert invoke("demo", "--keep").exit_code == 0
    assert calls == [True]


# -- against a running daemon ----------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with running(tmp_path_factory.mktemp("gwcli"), drift_watch=False) as gateway:
        yield gateway


@pytest.fixture
def clean(gw):
    yield
    api = gw.http()
    if gw.proc is not None and gw.proc.poll() is None:
        for d in api.list():
            api.delete({"exposed_port": d["exposed_port"], "protocol": d["protocol"]})


def cli(gw, *args, check=None):
    """The real console script, in the daemon's namespace, configured by its config file."""
    proc = gw.ns.run(*gw_command(), *[str(a) for a in args], check=False, timeout=60)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.mark.kernel
def test_subprocess_add_list_delete(gw, clean):
    c = ["--config", gw.config_path]
    p = cli(gw, "expose", "add", 8080, "10.30.0.1:80", *c, check=0)
    assert p.stdout.strip() == "created    8080/tcp -> 10.30.0.1:80  ipv4"
    p = cli(gw, "expose", "add", 8080, "10.30.0.1:80", "--service-id", "web", *c, check=0)
    assert p.stdout.startswith("relabelled 8080/tcp -> 10.30.0.1:80  ipv4  (web)")
    cli(gw, "expose", "add", 8443, "[fdff::1]:443", *c, check=0)
    p = cli(gw, "expose", "add", "--ports", "9000:90/tcp;5353:53/udp", "--service-ip",
            "10.30.0.2", *c, check=0)
    assert p.stdout.splitlines() == ["created    9000/tcp -> 10.30.0.2:90  ipv4",
                                     "created    5353/udp -> 10.30.0.2:53  ipv4"]
    four = {doc(8080), doc(8443, "fdff::1", 443), doc(9000, "10.30.0.2", 90),
            doc(5353, "10.30.0.2", 53, "udp")}
    assert gw.kernel_docs() == docs_set(gw.http().list()) == four

    p = cli(gw, "expose", "list", *c, check=0)
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["FAMILY", "PROTO", "PORT", "TARGET", "SERVICE"]
    assert lines[1].split() == ["ipv4", "tcp", "8080", "10.30.0.1:80", "web"]
    assert lines[-1].split() == ["ipv6", "tcp", "8443", "[fdff::1]:443", "-"]
    p = cli(gw, "expose", "list", "--json", *c, check=0)
    assert docs_set(json.loads(p.stdout)["exposures"]) == four

    p = cli(gw, "expose", "delete", 5353, "--udp", *c, check=0)
    assert p.stdout.strip() == "deleted    5353/udp -> 10.30.0.2:53  ipv4"
    p = cli(gw, "expose", "delete", 8443, "--family", "ipv6", *c, check=0)
    two = {doc(8080), doc(9000, "10.30.0.2", 90)}
    assert gw.kernel_docs() == docs_set(gw.http().list()) == two


@pytest.mark.kernel
def test_subprocess_errors_are_one_line(gw, clean):
    c = ["--config", gw.config_path]
    cli(gw, "expose", "add", 8080, "10.30.0.1:80", *c, check=0)
    p = cli(gw, "expose", "add", 8080, "10.30.0.9:80", *c, check=1)
    assert p.stderr == ("oakestra-gw: 409 conflict: 8080/tcp (ipv4) is already exposed to "
                        "10.30.0.1:80; delete it first [field exposed_port]\n")
    p = cli(gw, "expose", "add", 8081, "192.0.2.1:80", *c, check=1)
    assert p.stderr.count("\n") == 1 and "[field service_ip]" in p.stderr
    p = cli(gw, "expose", "add", "--ports", "22:22", "--service-ip", "10.30.0.1", *c, check=1)
    assert "[field exposures[0].exposed_port]" in p.stderr
    p = cli(gw, "expose", "add", 70000, "10.30.0.1:80", *c, check=1)
    assert "[field exposed_port]" in p.stderr
    p = cli(gw, "expose", "delete", 9999, *c, check=1)
    assert p.stderr.startswith("oakestra-gw: 404 not_found: 9999/tcp is not exposed")
    # Without the token (another config pointing at no token file): 401 in one line.
    other = gw.dir / "notoken.toml"
    other.write_text(f'[api]\nhost = "127.0.0.1"\n[store]\npath = "{gw.dir}/x/e.json"\n')
    p = cli(gw, "expose", "list", "--config", other, check=1)
    assert p.stderr.startswith("oakestra-gw: 401 unauthorized: ")
    # An explicit URL and token file work without a config.
    p = cli(gw, "expose", "list", "--api", f"http://127.0.0.1:{API_PORT}", "--token-file",
            gw.dir / "token", "--config", other, check=0)
    assert "8080" in p.stdout


@pytest.mark.kernel
def test_status(gw, clean):
    cli(gw, "expose", "add", 8080, "10.30.0.1:80", "--config", gw.config_path, check=0)
    p = cli(gw, "status", "--config", gw.config_path, check=0)
    assert "state:     ready" in p.stdout and "exposures: 1 (1 ipv4/tcp)" in p.stdout
    gw.ns.run("ip", "link", "set", "goProxyTun", "down")
    try:
        p = cli(gw, "status", "--config", gw.config_path, check=1)
        assert "NOT READY" in p.stdout and "tunnel: " in p.stdout
    finally:
        gw.ns.run("ip", "link", "set", "goProxyTun", "up")
        gw.ns.run("ip", "route", "replace", "10.30.0.0/16", "dev", "goProxyTun")
        gw.ns.run("ip", "-6", "route", "replace", "fdff::/16", "dev", "goProxyTun")


@pytest.mark.kernel
def test_cli_runner_against_the_daemon(gw, clean):
    """The in-process CLI, its sockets opened inside the daemon's namespace."""
    c = ["--config", str(gw.config_path)]
    r = in_netns(gw.ns.name, invoke, "expose", "add", "5353", "10.30.0.1:53", "--udp", *c)
    assert r.exit_code == 0 and r.output.startswith("created    5353/udp"), r.output
    r = in_netns(gw.ns.name, invoke, "expose", "list", "--json", *c)
    assert json.loads(r.output)["exposures"][0]["protocol"] == "udp"
    r = in_netns(gw.ns.name, invoke, "expose", "add", "5353", "10.30.0.2:53", "--udp", *c)
    assert r.exit_code == 1 and "409 conflict" in r.stderr
    r = in_netns(gw.ns.name, invoke, "expose", "delete", "5353", "--udp", "--json", *c)
    assert r.exit_code == 0
    assert docs_set(json.loads(r.output)["deleted"]) == {doc(5353, "10.30.0.1", 53, "udp")}
    assert gw.kernel_docs() == docs_set(gw.http().list()) == set()


@pytest.mark.kernel
def test_rules_diff_while_the_daemon_runs(gw, clean):
    c = ["--config", gw.config_path]
    cli(gw, "expose", "add", 8080, "10.30.0.1:80", *c, check=0)
    cli(gw, "expose", "add", 8081, "10.30.0.1:81", *c, check=0)
    p = cli(gw, "rules", "diff", *c, check=0)
    assert p.stdout.startswith("in sync: 2 exposure(s)")
    gw.nft("delete", "element", "inet", "oakestra_gw", "expose_v4", "{ tcp . 8080 }")
    gw.nft("add", "element", "inet", "oakestra_gw", "expose_v4", "{ udp . 7 : 10.30.0.7 . 7 }")
    p = cli(gw, "rules", "diff", *c, check=1)
    assert "1 missing, 1 unexpected" in p.stdout
    assert "missing     8080/tcp -> 10.30.0.1:80  ipv4" in p.stdout
    assert "unexpected  7/udp  ipv4" in p.stdout
    gw.send(signal.SIGHUP)
    gw.wait_log("reconcile: repaired")
    cli(gw, "rules", "diff", *c, check=0)


@pytest.mark.kernel
def test_rules_diff_names_an_edited_chain(gw, clean):
    """The chains are judged against the skeleton rendered from the config, so a rule someone
    added to one of ours shows, by chain, and a reload repairs it."""
    c = ["--config", gw.config_path]
    cli(gw, "expose", "add", 8080, "10.30.0.1:80", *c, check=0)
    cli(gw, "rules", "diff", *c, check=0)
    gw.nft("add", "rule", "inet", "oakestra_gw", "forward", "tcp", "dport", "9", "accept")
    p = cli(gw, "rules", "diff", *c, check=1)
    assert "kernel differs from the store: chains edited (forward)" in p.stdout, p.stdout
    p = cli(gw, "rules", "diff", "--json", *c, check=1)
    assert json.loads(p.stdout)["chains_edited"] == ["forward"]
    gw.send(signal.SIGHUP)
    gw.wait_log("reconcile: repaired")
    p = cli(gw, "rules", "diff", *c, check=0)
    assert p.stdout.startswith("in sync: 1 exposure(s)")


# -- lifecycle with the CLI: stop, diff from the store, teardown --------------------------------

@pytest.mark.kernel
def test_teardown(tmp_path):
    require_root()
    gw = GatewayTestbed(tmp_path / "gw")
    flows = []
    try:
        gw.start()
        gw.open_path()
        c = ["--config", gw.config_path]
        cli(gw, "expose", "add", 8080, "10.30.0.1:80", *c, check=0)
        # Open flows through the exposure, held established across the stop.
        for _ in range(OPEN_FLOWS):
            flows.append(gw.client.popen("socat", "-", f"TCP:{PUBLIC_V4}:8080",
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        wait_for(lambda: len(natted(gw)) == OPEN_FLOWS, what="the flows' conntrack entries")
        p = cli(gw, "teardown", *c, check=1)
        assert "stop it first" in p.stderr
        p = cli(gw, "store", "check", *c, check=1)
        assert "in use" in p.stderr
        assert gw.kernel() is not None

        assert gw.stop() == 0
        p = cli(gw, "rules", "diff", *c, check=0)  # from the store, under a shared lock
        assert "in sync: 1" in p.stdout
        cli(gw, "store", "check", *c, check=0)
        assert "oakgw0" in gw.ns.run("ip", "link").stdout

        assert len(natted(gw)) == OPEN_FLOWS  # the stop left them alone
        p = cli(gw, "teardown", *c, check=0)
        assert "table inet oakestra_gw: removed" in p.stdout
        assert f"conntrack: {OPEN_FLOWS} NATed entries removed" in p.stdout
        assert natted(gw) == []
        assert gw.kernel() is None
        assert "oakgw0" not in gw.ns.run("ip", "link").stdout
        assert "bridge oakgw0: removed" in p.stdout
        p = cli(gw, "teardown", *c, check=0)
        assert "was not there" in p.stdout
        p = cli(gw, "rules", "diff", *c, check=1)
        assert "table is missing" in p.stdout
        # The store stays: a new start brings everything back.
        gw.start()
        assert gw.kernel_docs() == {("ipv4", "tcp", 8080, "10.30.0.1", 80)}
    finally:
        for flow in flows:
            flow.kill()
            flow.wait()
        gw.close()


OPEN_FLOWS = 3


def natted(gw) -> list[str]:
    """The gateway's conntrack entries of flows to the exposure (the conntrack tool's view)."""
    return gw.ns.run("conntrack", "-L", "-p", "tcp", "--orig-dst", PUBLIC_V4,
                     "--orig-port-dst", "8080").stdout.splitlines()
