"""The role's contract, without a node: its variables as Ansible sees them (meta/argument_specs.yml,
`ansible-doc -t role`) and the settings whose change makes it restart instead of reload."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from gw.core.config import SECTIONS
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
