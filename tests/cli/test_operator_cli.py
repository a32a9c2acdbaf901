"""The CLI as scripts and operators use it, against a real daemon: `--json` on every command
that prints, `PORT/udp`, `expose delete --ignore-not-found`, list filters, and `status` from
the status route, including configuration changes that wait for a restart."""

from __future__ import annotations

import json
import signal

import pytest

from tests.api.harness import running
from tests.helpers import wait_for
from tests.cli.test_cli import cli, invoke, write_config

pytestmark = [pytest.mark.kernel]


@pytest.fixture
def gw(tmp_path):
    with running(tmp_path / "gw", drift_watch=False) as gateway:
        yield gateway


def test_port_slash_udp_and_ignore_not_found(gw):
    c = ["--config", gw.config_path]
    p = cli(gw, "expose", "add", "5353/udp", "10.30.0.1:53", *c, check=0)
    assert p.stdout.strip() == "created    5353/udp -> 10.30.0.1:53  ipv4"
    assert ("ipv4", "udp", 5353, "10.30.0.1", 53) in gw.kernel_docs()
    p = cli(gw, "expose", "add", "5353/tcp", "10.30.0.1:53", "--udp", *c, check=2)
    assert "contradicts --udp" in p.stderr
    p = cli(gw, "expose", "add", "5353/sctp", "10.30.0.1:53", *c, check=2)
    assert "PORT/PROTO" in p.stderr
    p = cli(gw, "expose", "delete", "5353/udp", "--json", *c, check=0)
    assert [d["exposed_port"] for d in json.loads(p.stdout)["deleted"]] == [5353]
    assert gw.kernel_docs() == set()
    # Gone already: an error without the flag, success (and nothing deleted) with it.
    p = cli(gw, "expose", "delete", "5353/udp", *c, check=1)
    assert "404 not_found" in p.stderr
    p = cli(gw, "expose", "delete", "5353/udp", "--ignore-not-found", "--json", *c, check=0)
    assert json.loads(p.stdout) == {"deleted": []}
    p = cli(gw, "expose", "delete", "5353/udp", "--ignore-not-found", *c, check=0)
    assert p.stdout == ""


def test_list_filters(gw):
    c = ["--config", gw.config_path]
    cli(gw, "expose", "add", "--ports", "8080:80;8081:81;5353:53/udp", "--service-ip",
        "10.30.0.1", "--service-id", "web", *c, check=0)
    cli(gw, "expose", "add", "8443", "[fdff::1]:443", *c, check=0)

    def ports(*args):
        p = cli(gw, "expose", "list", "--json", *args, *c, check=0)
        return [(d["family"], d["protocol"], d["exposed_port"])
                for d in json.loads(p.stdout)["exposures"]]

    assert ports("--protocol", "udp") == [("ipv4", "udp", 5353)]
    assert ports("--family", "ipv6") == [("ipv6", "tcp", 8443)]
    assert ports("--service-id", "web", "--port", "8000-8080") == [("ipv4", "tcp", 8080)]
    assert len(ports()) == 4
    p = cli(gw, "expose", "list", "--port", "9-1", *c, check=1)
    assert "[field port]" in p.stderr


def test_status_and_restart_needed(gw):
    c = ["--config", gw.config_path]
    cli(gw, "expose", "add", "8080", "10.30.0.1:80", *c, check=0)
    p = cli(gw, "status", *c, check=0)
    assert "state:     ready" in p.stdout and "exposures: 1 (1 ipv4/tcp)" in p.stdout
    assert "standalone mode" in p.stdout and "restart needed" not in p.stdout
    doc = json.loads(cli(gw, "status", "--json", *c, check=0).stdout)
    assert doc["restart_needed"] == [] and doc["exposures"]["total"] == 1

    # A key that only a restart applies, plus a live one: the reload applies the live one and
    # reports the other everywhere an operator or an alert would look.
    gw.config["api"]["threads"] = 3
    gw.config["network"]["reserved_ports"] = ["22/tcp", "9999/tcp"]
    gw.write_config()
    reload(gw)
    p = cli(gw, "status", *c, check=0)
    assert "restart needed: api.threads changed" in p.stdout, p.stdout
    assert json.loads(cli(gw, "status", "--json", *c, check=0).stdout)["restart_needed"] == \
        ["api.threads"]
    ready = gw.http().get("/api/ready")
    assert ready.status == 200 and ready.json["restart_needed"] == ["api.threads"]
    metrics = gw.http().get("/metrics").body.decode()
    assert any(line == "oakestra_gw_restart_needed 1.0" for line in metrics.splitlines()), metrics
    # The live key did apply: 9999/tcp is reserved now.
    p = cli(gw, "expose", "add", "9999", "10.30.0.1:80", *c, check=1)
    assert "[field exposed_port]" in p.stderr

    # The file back as it was started: nothing waits any more.
    gw.config["api"]["threads"] = 8
    gw.write_config()
    reload(gw)
    assert json.loads(cli(gw, "status", "--json", *c, check=0).stdout)["restart_needed"] == []
    metrics = gw.http().get("/metrics").body.decode()
    assert any(line == "oakestra_gw_restart_needed 0.0" for line in metrics.splitlines()), metrics


def reload(gw):
    """SIGHUP, and wait until the daemon logged one more finished reload."""
    before = gw.log().count("reload: applied")
    gw.send(signal.SIGHUP)
    wait_for(lambda: gw.log().count("reload: applied") > before, 30, "the reload")


def test_json_without_a_daemon(tmp_path):
    config = write_config(tmp_path)
    r = invoke("config", "check", config, "--json", "--state-directory", str(tmp_path))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["valid"] is True and doc["mode"] == "standalone" and doc["api_port"] == 11022
    r = invoke("store", "check", "--config", config, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["exists"] is False, r.output
    r = invoke("rules", "show", "--config", config, "--no-exposures", "--json")
    assert r.exit_code == 0, r.output
    assert "table inet oakestra_gw {" in json.loads(r.stdout)["ruleset"]
