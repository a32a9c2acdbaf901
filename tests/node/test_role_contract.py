"""The role's contract, without a node: its variables as Ansible sees them (meta/argument_specs.yml,
`ansible-doc -t role`) and the settings whose change makes it restart instead of reload."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gw.core.config import SECTIONS
from gw.core.exposure import MAX_BATCH
from gw.daemon.reload import LIVE
from tests.node.test_ansible_lint import ANSIBLE, env, tool

ROLE = ANSIBLE / "roles" / "oakestra_gateway"


def load(relative: str):
    return yaml.safe_load((ROLE / relative).read_text())


def spec_options() -> dict:
    return load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]


def test_argument_specs_cover_every_default():
    defaults, options = load("defaults/main.yml"), spec_options()
    assert set(options) == set(defaults)
    for name, option in options.items():
        assert option.get("description"), name
        assert option.get("type"), name
        value = defaults[name]
        if "default" in option and not (isinstance(value, str) and "{{" in value):
            assert option["default"] == value, name


def test_ansible_doc_shows_the_variables():
    res = subprocess.run([tool("ansible-doc"), "-t", "role", "-r", "roles", "oakestra_gateway"],
                         cwd=ANSIBLE, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    assert re.search(r"ENTRY POINT: \W*main\W* - Provision", text), text[:500]
    readme = (ROLE / "README.md").read_text()
    for name, option in spec_options().items():
        assert name in text, f"ansible-doc does not show {name}"
        assert name in readme, f"README.md does not document {name}"
        for choice in option.get("choices", []):
            assert choice in text


def template_keys() -> set[str]:
    keys, section = set(), None
    for line in (ROLE / "templates" / "gateway.toml.j2").read_text().splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = m[1]
        elif m := re.match(r"(\w+) = ", line):
            keys.add(f"{section}.{m[1]}")
    return keys


def test_the_template_writes_only_config_keys():
    assert template_keys() <= {f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys}


def test_restart_settings_are_the_keys_a_reload_cannot_apply():
    restart = set(load("vars/main.yml")["oakestra_gateway_restart_settings"])
    assert restart == template_keys() - LIVE


@pytest.mark.parametrize("collection", ["ansible.posix", "community.general"])
def test_requirements_name_the_collections_the_role_uses(collection):
    names = {c["name"] for c in yaml.safe_load((ANSIBLE / "requirements.yml").read_text())
             ["collections"]}
    assert collection in names
    used = "\n".join(p.read_text() for p in (ROLE / "tasks").glob("*.yml"))
    assert f"{collection}." in used


# --- a gateway pair (oakestra_gateway_ha) ------------------------------------------------------

PAIR = {
    "oakestra_gateway_ha": True,
    "oakestra_gateway_internal_ipv4": "10.30.255.254",
    "oakestra_gateway_internal_ipv6": "fdff::fe",
    "oakestra_gateway_public_ifaces": ["eth0"],
    "oakestra_gateway_ha_public_addresses": ["198.18.0.10/24", "2001:db8::10/64"],
    "oakestra_gateway_ha_sync_interface": "sync0",
    "oakestra_gateway_ha_sync_address": "198.19.77.1",
    "oakestra_gateway_ha_sync_peer": "198.19.77.2",
    "oakestra_gateway_ha_priority": 150,
    "oakestra_gateway_etcd_name": "gw1",
    "oakestra_gateway_etcd_members": [{"name": "witness", "address": "192.0.2.9"},
                                      {"name": "gw1", "address": "192.0.2.1"},
                                      {"name": "gw2", "address": "2001:db8:1::2"}],
}
# One bad combination per host, and the variable its failure must name.
BAD = {
    "no_floating_address": ({"oakestra_gateway_ha_public_addresses": []},
                            "oakestra_gateway_ha_public_addresses"),
    "floating_without_prefix": ({"oakestra_gateway_ha_public_addresses": ["198.18.0.10"]},
                                "oakestra_gateway_ha_public_addresses"),
    "no_internal_address": ({"oakestra_gateway_internal_ipv4": ""},
                            "oakestra_gateway_internal_ipv4"),
    "sync_on_the_public_link": ({"oakestra_gateway_ha_sync_interface": "eth0"},
                                "oakestra_gateway_ha_sync_interface"),
    "no_sync_interface": ({"oakestra_gateway_ha_sync_interface": ""},
                          "oakestra_gateway_ha_sync_interface"),
    "sync_peer_is_self": ({"oakestra_gateway_ha_sync_peer": "198.19.77.1"},
                          "oakestra_gateway_ha_sync_peer"),
    "priority_out_of_range": ({"oakestra_gateway_ha_priority": 255},
                              "oakestra_gateway_ha_priority"),
    "not_an_etcd_member": ({"oakestra_gateway_etcd_name": "gw3"}, "oakestra_gateway_etcd_name"),
    "no_etcd_members": ({"oakestra_gateway_etcd_members": []}, "oakestra_gateway_etcd_members"),
    "member_named_twice": ({"oakestra_gateway_etcd_members": [
        {"name": "gw1", "address": "192.0.2.1"}, {"name": "gw1", "address": "192.0.2.2"}]},
        "oakestra_gateway_etcd_members"),
}


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """One real ansible-playbook run on the controller alone (connection local, no facts): each
    host checks the pair's variables as the role does before installing anything, and the good
    one also renders gateway.toml (validated by `oakestra-gw config check`, as on a node) and
    etcd's environment."""
    tmp = tmp_path_factory.mktemp("pair")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    hosts = {"good": {**local, **PAIR}}
    hosts.update({name: {**local, **PAIR, **bad} for name, (bad, _) in BAD.items()})
    (tmp / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    gw = Path(sys.executable).parent / "oakestra-gw"
    play = [{"hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Check the pair", "ansible.builtin.include_role": {
            "name": "oakestra_gateway", "tasks_from": "ha_check", "public": True}},
        {"name": "Render gateway.toml", "ansible.builtin.template": {
            "src": str(ROLE / "templates" / "gateway.toml.j2"), "mode": "0600",
            "dest": f"{tmp}/{{{{ inventory_hostname }}}}.toml", "validate": f"{gw} config check %s"}},
        {"name": "Render etcd's environment", "ansible.builtin.template": {
            "src": str(ROLE / "templates" / "etcd.env.j2"), "mode": "0600",
            "dest": f"{tmp}/{{{{ inventory_hostname }}}}.etcd"}},
    ]}]
    (tmp / "play.yml").write_text(yaml.safe_dump(play))
    res = subprocess.run([tool("ansible-playbook"), "-i", str(tmp / "inventory.yml"),
                          str(tmp / "play.yml")], cwd=ANSIBLE,
                         env=dict(env(), ANSIBLE_STDOUT_CALLBACK="json",
                                  ANSIBLE_ROLES_PATH=str(ROLE.parent)),
                         capture_output=True, text=True, timeout=300)
    report = json.loads(res.stdout[res.stdout.index("{"):])
    return tmp, report


def failures(report: dict) -> dict[str, str]:
    found = {}
    for task in report["plays"][0]["tasks"]:
        for host, result in task["hosts"].items():
            if result.get("failed"):
                found[host] = result.get("msg", "")
    return found


@pytest.mark.parametrize("host", sorted(BAD))
def test_a_bad_pair_fails_early_naming_the_variable(pair_run, host):
    _, report = pair_run
    failed = failures(report)
    assert host in failed, f"{host} passed the role's checks: {BAD[host][0]}"
    assert BAD[host][1] in failed[host], failed[host]
    assert not (pair_run[0] / f"{host}.toml").exists(), "rendered despite the failed check"


def test_a_good_pair_renders_a_config_the_daemon_accepts(pair_run):
    tmp, report = pair_run
    assert "good" not in failures(report), failures(report).get("good")
    config = tomllib.loads((tmp / "good.toml").read_text())
    assert config["store"]["backend"] == "etcd"
    # Its own member first, then the others (an IPv6 one in brackets).
    assert config["store"]["endpoints"] == ["http://192.0.2.1:2379", "http://192.0.2.9:2379",
                                            "http://[2001:db8:1::2]:2379"]
    assert config["ha"]["enabled"] is True and config["ha"]["public_interface"] == "eth0"
    assert config["ha"]["priority"] == 150
    etcd = dict(line.split("=", 1) for line in (tmp / "good.etcd").read_text().splitlines()
                if line and not line.startswith("#"))
    assert etcd["ETCD_NAME"] == "gw1"
    assert etcd["ETCD_INITIAL_CLUSTER"] == ("witness=http://192.0.2.9:2380,gw1=http://192.0.2.1:2380,"
                                            "gw2=http://[2001:db8:1::2]:2380")
    assert etcd["ETCD_LISTEN_CLIENT_URLS"] == "http://192.0.2.1:2379,http://127.0.0.1:2379"


def test_etcd_takes_a_batch_in_one_transaction():
    assert load("defaults/main.yml")["oakestra_gateway_etcd_max_txn_ops"] >= MAX_BATCH
