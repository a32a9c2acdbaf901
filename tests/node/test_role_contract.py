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
# etcd over TLS: files on the controller ({tls}: a directory the fixture makes). What they hold
# does not matter here (the checks and the templates only name them); the node test
# (tests/node/test_node.py) runs etcd and the daemon with real ones.
TLS = {"oakestra_gateway_etcd_ca_file": "{tls}/ca.pem",
       "oakestra_gateway_etcd_cert_file": "{tls}/member.pem",
       "oakestra_gateway_etcd_key_file": "{tls}/member.key"}
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
    # etcd over TLS: all three files or none, each an existing file on the controller.
    "tls_without_key": ({**TLS, "oakestra_gateway_etcd_key_file": ""},
                        "oakestra_gateway_etcd_key_file is empty"),
    "tls_ca_alone": ({"oakestra_gateway_etcd_ca_file": TLS["oakestra_gateway_etcd_ca_file"]},
                     "oakestra_gateway_etcd_cert_file and oakestra_gateway_etcd_key_file "
                     "are empty"),
    "tls_key_alone": ({"oakestra_gateway_etcd_key_file": TLS["oakestra_gateway_etcd_key_file"]},
                      "oakestra_gateway_etcd_ca_file and oakestra_gateway_etcd_cert_file "
                      "are empty"),
    "tls_relative_key": ({**TLS, "oakestra_gateway_etcd_key_file": "member.key"},
                         "oakestra_gateway_etcd_key_file must name a file"),
    "tls_cert_not_there": ({**TLS, "oakestra_gateway_etcd_cert_file": "{tls}/nothing.pem"},
                           "oakestra_gateway_etcd_cert_file must name a file"),
}


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """One real ansible-playbook run on the controller alone (connection local, no facts): each
    host checks the pair's variables as the role does before installing anything, and the good
    one also renders gateway.toml (validated by `oakestra-gw config check`, as on a node) and
    etcd's environment."""
    tmp = tmp_path_factory.mktemp("pair")
    tls = tmp / "tls"
    tls.mkdir()
    for path in TLS.values():
        Path(path.format(tls=tls)).write_text("placeholder\n")

    def host(*overrides: dict) -> dict:
        merged = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                  **PAIR}
        for extra in overrides:
            merged.update({k: v.format(tls=tls) if isinstance(v, str) else v
                           for k, v in extra.items()})
        return merged
    hosts = {"good": host(), "good_tls": host(TLS)}
    hosts.update({name: host(bad) for name, (bad, _) in BAD.items()})
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
    etcd = rendered_etcd_env(tmp, "good")
    assert etcd["ETCD_NAME"] == "gw1"
    assert etcd["ETCD_INITIAL_CLUSTER"] == ("witness=http://192.0.2.9:2380,gw1=http://192.0.2.1:2380,"
                                            "gw2=http://[2001:db8:1::2]:2380")
    assert etcd["ETCD_LISTEN_CLIENT_URLS"] == "http://192.0.2.1:2379,http://127.0.0.1:2379"


def rendered_etcd_env(tmp: Path, host: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (tmp / f"{host}.etcd").read_text().splitlines()
                if line and not line.startswith("#"))


def test_a_plain_pair_names_no_tls_file(pair_run):
    tmp, _ = pair_run
    store = tomllib.loads((tmp / "good.toml").read_text())["store"]
    assert not {"ca_file", "cert_file", "key_file"} & set(store), store
    assert not [k for k in rendered_etcd_env(tmp, "good") if "CERT" in k or "CA_FILE" in k]


def test_a_tls_pair_speaks_https_to_clients_and_peers(pair_run):
    tmp, report = pair_run
    assert "good_tls" not in failures(report), failures(report).get("good_tls")
    # The daemon: https endpoints (its own member first) and its copies of the member's files
    # on the node, the member's certificate as its client certificate; `oakestra-gw config
    # check` accepted it (the template's validate).
    store = tomllib.loads((tmp / "good_tls.toml").read_text())["store"]
    assert store["endpoints"] == ["https://192.0.2.1:2379", "https://192.0.2.9:2379",
                                  "https://[2001:db8:1::2]:2379"]
    assert {k: store.get(k) for k in ("ca_file", "cert_file", "key_file")} == {
        "ca_file": "/etc/oakestra-gw/etcd-ca.pem", "cert_file": "/etc/oakestra-gw/etcd.pem",
        "key_file": "/etc/oakestra-gw/etcd.key"}
    # etcd: its own copies (Debian runs it as the user etcd), for clients and peers.
    member = {"ca_file": "/etc/etcd/oakestra-gw/ca.pem",
              "cert_file": "/etc/etcd/oakestra-gw/member.pem",
              "key_file": "/etc/etcd/oakestra-gw/member.key"}
    etcd = rendered_etcd_env(tmp, "good_tls")
    assert etcd["ETCD_LISTEN_CLIENT_URLS"] == "https://192.0.2.1:2379,https://127.0.0.1:2379"
    assert etcd["ETCD_ADVERTISE_CLIENT_URLS"] == "https://192.0.2.1:2379"
    assert etcd["ETCD_LISTEN_PEER_URLS"] == etcd["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == \
        "https://192.0.2.1:2380"
    assert etcd["ETCD_INITIAL_CLUSTER"] == ("witness=https://192.0.2.9:2380,"
                                            "gw1=https://192.0.2.1:2380,"
                                            "gw2=https://[2001:db8:1::2]:2380")
    for side in ("", "PEER_"):
        assert etcd[f"ETCD_{side}TRUSTED_CA_FILE"] == member["ca_file"]
        assert etcd[f"ETCD_{side}CERT_FILE"] == member["cert_file"]
        assert etcd[f"ETCD_{side}KEY_FILE"] == member["key_file"]
        assert etcd[f"ETCD_{side}CLIENT_CERT_AUTH"] == "true"


def test_etcd_takes_a_batch_in_one_transaction():
    assert load("defaults/main.yml")["oakestra_gateway_etcd_max_txn_ops"] >= MAX_BATCH


def tasks_of(items: list) -> list[dict]:
    """Every task of a tasks file, those inside blocks too."""
    found = []
    for task in items or []:
        found.append(task)
        found.extend(tasks_of(task.get("block", [])))
    return found


def test_no_private_key_reaches_the_diff():
    """--diff prints what a copy would write: a task that copies a key must turn it off."""
    copies = [(path.name, task) for path in (ROLE / "tasks").glob("*.yml")
              for task in tasks_of(load(f"tasks/{path.name}")) if "ansible.builtin.copy" in task]
    keys = [(name, task) for name, task in copies if "_key_file" in json.dumps(task)]
    assert len(keys) == 2, [name for name, _ in keys]  # etcd's own copy, and the daemon's
    for name, task in keys:
        assert task.get("diff") is False, f"{name}: {task['name']}"
