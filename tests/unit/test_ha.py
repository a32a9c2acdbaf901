"""The [ha] settings and the keepalived and conntrackd configurations they render: golden files
for a pair with both families, and a clear error naming the key for each bad value. (The tools'
own checks of the rendered files run in tests/ha/test_ha_configs.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gw.core import ha
from gw.core.config import parse_config
from gw.core.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"
NOTIFY = "/usr/bin/oakestra-gw ha notify --config /etc/oakestra-gw/gateway.toml"
NETWORK = {"internal_ipv4": "10.30.255.254", "internal_ipv6": "fdff::fe"}
PAIR = {"enabled": True, "router_id": "gw-a", "priority": 150, "advert_interval": 0.1,
        "preempt_delay": 2, "public_interface": "pub0",
        "public_addresses": ["198.18.0.10/24", "2001:db8::10/64"],
        "sync_interface": "sync0", "sync_address": "192.168.100.1",
        "sync_peer": "192.168.100.2", "state_dir": "/run/oakestra-gw/ha"}


def settings(**changes):
    return parse_config({"network": NETWORK, "ha": {**PAIR, **changes}}).ha


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs (UPDATE_GOLDEN=1 rewrites it)"


def test_keepalived_conf_is_the_golden_file():
    golden("keepalived.conf", ha.render_keepalived(settings(), NOTIFY))


def test_conntrackd_conf_is_the_golden_file():
    golden("conntrackd.conf", ha.render_conntrackd(settings()))


def test_one_instance_per_family_on_the_public_segment_all_in_the_sync_group():
    text = ha.render_keepalived(settings(), NOTIFY)
    names = [n for n, _, _ in settings().instances()]
    assert names == ["public_v4", "public_v6"]
    # Adverts only where the pair shares a link; the internal addresses go on their own
    # interface with the public ones of their family.
    assert {i for _, i, _ in settings().instances()} == {settings().public_interface}
    assert f"10.30.255.254/32 dev {settings().internal_interface}" in text.split(
        "vrrp_instance public_v4")[1].split("vrrp_instance")[0]
    group = text.split("vrrp_sync_group oakestra_gw {")[1].split("}")[0]
    assert group.split() == ["group", "{", *names]
    # No instance mixes the families (keepalived refuses that in one list).
    for block in text.split("vrrp_instance ")[1:]:
        addrs = block.split("virtual_ipaddress {")[1].split("}")[0].split()[::3]
        assert len({":" in a for a in addrs}) == 1, block


def test_the_internal_addresses_default_to_the_snat_addresses_as_hosts():
    assert [str(a) for a in settings().internal_addresses] == ["10.30.255.254/32", "fdff::fe/128"]
    assert settings().internal_interface == "oakgw0"  # network.bridge_interface


def test_conntrackd_syncs_udp_and_icmp_and_never_ignores_a_floating_address():
    text = ha.render_conntrackd(settings())
    accept = text.split("Protocol Accept {")[1].split("}")[0].split()
    assert accept == ["TCP", "UDP", "ICMP", "IPv6-ICMP"]
    ignored = text.split("Address Ignore {")[1].split("}")[0]
    for ip in settings().floating:
        assert str(ip) not in ignored
    assert "DisableExternalCache on" in text
    assert "DisableExternalCache off" in ha.render_conntrackd(
        settings(conntrack_external_cache=True))


def test_conntrackd_leaves_the_etcd_members_traffic_alone_but_never_a_floating_address():
    full = parse_config({"network": NETWORK, "ha": PAIR, "store": {
        "backend": "etcd", "endpoints": ["http://192.168.200.1:2379", "https://[fd00::2]:2379",
                                         "http://etcd-witness.example:2379",
                                         "http://198.18.0.10:2379"]}})
    assert [str(a) for a in full.etcd_addresses] == ["192.168.200.1", "fd00::2", "198.18.0.10"]
    text = ha.render_conntrackd(full.ha, local=full.etcd_addresses)
    ignored = text.split("Address Ignore {")[1].split("}")[0].split()
    assert ["IPv4_address", "192.168.200.1", "IPv6_address", "fd00::2"] == ignored[-4:]
    assert "198.18.0.10" not in ignored
    assert parse_config({"network": NETWORK, "ha": PAIR}).etcd_addresses == []


def test_under_systemd_conntrackd_notifies_and_logs_to_the_journal():
    text = ha.render_conntrackd(settings(), systemd=True)
    assert "Systemd on" in text and "Syslog on" in text and "LogFile off" in text


def test_ipv6_sync_link():
    text = ha.render_conntrackd(settings(sync_address="fd00:5::1", sync_peer="fd00:5::2"))
    assert "IPv6_address fd00:5::1" in text and "IPv6_Destination_Address fd00:5::2" in text


def test_the_commands_use_the_state_dir_for_pid_files_and_socket():
    s = settings(state_dir="/run/gw-b")
    argv = ha.keepalived_command(s)
    assert argv[argv.index("--pid") + 1] == "/run/gw-b/keepalived.pid"
    assert argv[argv.index("--vrrp_pid") + 1] == "/run/gw-b/keepalived-vrrp.pid"
    assert "Path /run/gw-b/conntrackd.ctl" in ha.render_conntrackd(s)
    assert ha.conntrackd_command(s, "-c") == ["conntrackd", "-C", "/run/gw-b/conntrackd.conf", "-c"]


def test_disabled_ha_needs_nothing():
    assert parse_config({}).ha == ha.HaSettings()
    assert not parse_config({"ha": {"public_interface": "pub0"}}).ha.enabled


@pytest.mark.parametrize("changes, field", [
    ({"public_interface": ""}, "ha.public_interface"),
    ({"public_addresses": []}, "ha.public_addresses"),
    ({"public_addresses": ["198.18.0.300/24"]}, "ha.public_addresses"),
    ({"public_addresses": ["198.18.0.10/24", "198.18.0.10/24"]}, "ha.public_addresses"),
    ({"sync_interface": ""}, "ha.sync_interface"),
    ({"sync_interface": "pub0"}, "ha.sync_interface"),
    ({"sync_address": "nope"}, "ha.sync_address"),
    ({"sync_peer": "fd00::2"}, "ha.sync_peer"),
    ({"sync_peer": "192.168.100.1"}, "ha.sync_peer"),
    ({"sync_address": "198.18.0.10"}, "ha.sync_address"),
    ({"internal_addresses": ["10.30.255.1/16"]}, "ha.internal_addresses"),
    ({"internal_interface": "pub0"}, "ha.public_interface"),
    ({"priority": 255}, "ha.priority"),
    ({"virtual_router_id": 0}, "ha.virtual_router_id"),
    ({"advert_interval": 0.001}, "ha.advert_interval"),
    ({"advert_interval": True}, "ha.advert_interval"),
    ({"router_id": "two words"}, "ha.router_id"),
    ({"state_dir": "relative"}, "ha.state_dir"),
    ({"bogus": 1}, "ha.bogus"),
])
def test_a_bad_value_names_its_key(changes, field):
    with pytest.raises(ConfigError) as err:
        settings(**changes)
    assert err.value.field == field


def test_enabled_needs_the_internal_addresses():
    with pytest.raises(ConfigError) as err:
        parse_config({"ha": PAIR})
    assert err.value.field == "network.internal_ipv4"


def test_the_cli_prints_the_renderer_and_refuses_without_ha(tmp_path):
    from click.testing import CliRunner

    from gw.cli.root import main

    on, off = tmp_path / "on.toml", tmp_path / "off.toml"
    on.write_text('[network]\ninternal_ipv4 = "10.30.255.254"\ninternal_ipv6 = "fdff::fe"\n'
                  '[ha]\n' + "".join(f"{k} = {v!r}\n".replace("True", "true")
                                     for k, v in PAIR.items()).replace("'", '"'))
    off.write_text("")
    r = CliRunner().invoke(main, ["ha", "render", "conntrackd", "--config", str(on)])
    assert r.exit_code == 0 and r.output == ha.render_conntrackd(settings())
    r = CliRunner().invoke(main, ["ha", "render", "keepalived", "--config", str(on),
                                  "--notify-command", NOTIFY])
    assert r.exit_code == 0 and r.output == ha.render_keepalived(settings(), NOTIFY)
    r = CliRunner().invoke(main, ["ha", "render", "keepalived", "--config", str(off)])
    assert r.exit_code == 1 and "ha.enabled" in r.output


# -- a pair in Oakestra mode: one gateway to the cluster ---------------------------------------

HTTP = {"cluster_url": "http://10.30.0.5:10100", "gateway_id": "pair-1"}
MQTT = {"mqtt_url": "mqtt://10.30.0.5:10003", "node_id": "node-7f3a",
        "mqtt_client_id": "oakestra-gw-node-7f3a-a"}


def in_oakestra(oakestra: dict, **ha_changes):
    return parse_config({"network": NETWORK, "ha": {**PAIR, **ha_changes},
                         "oakestra": oakestra})


def test_a_pair_in_oakestra_mode_with_its_id_and_client_id_is_coherent():
    assert in_oakestra(HTTP).oakestra.gateway_id == "pair-1"
    assert in_oakestra(MQTT).oakestra.client_id == "oakestra-gw-node-7f3a-a"
    # The floating public addresses, in any spelling, may be named as the ones reported.
    assert in_oakestra({**HTTP, "public_ipv4": "198.18.0.10",
                        "public_ipv6": "2001:db8:0::10"}).oakestra.public_ipv6


@pytest.mark.parametrize("oakestra, field, words", [
    ({**HTTP, "gateway_id": ""}, "oakestra.gateway_id", "the pair is one gateway"),
    ({**HTTP, "gateway_id": "a/b"}, "oakestra.gateway_id", "not 'a/b'"),
    ({**MQTT, "mqtt_client_id": ""}, "oakestra.mqtt_client_id", "oakestra-gw-node-7f3a"),
    ({**HTTP, "public_ipv4": "198.18.0.11"}, "oakestra.public_ipv4", "ha.public_addresses"),
    ({**MQTT, "public_ipv6": "2001:db8::11"}, "oakestra.public_ipv6", "ha.public_addresses"),
])
def test_an_incoherent_pair_in_oakestra_mode_names_the_key(oakestra, field, words):
    with pytest.raises(ConfigError) as err:
        in_oakestra(oakestra)
    assert err.value.field == field and words in err.value.message, err.value.message


def test_the_rules_of_a_pair_bind_only_a_pair_in_oakestra_mode():
    # A single gateway in Oakestra mode gets its id from the cluster; MQTT its default client id.
    single = {"network": NETWORK}
    assert parse_config({**single, "oakestra": {**HTTP, "gateway_id": ""}}).oakestra
    assert parse_config({**single, "oakestra": {**MQTT, "mqtt_client_id": ""}}).oakestra
    # A pair in standalone mode speaks to no cluster.
    assert parse_config({"network": NETWORK, "ha": PAIR}).ha.enabled
    # Without the floating internal addresses, a pair in Oakestra mode is refused too.
    with pytest.raises(ConfigError) as err:
        parse_config({"ha": PAIR, "oakestra": HTTP})
    assert err.value.field == "network.internal_ipv4"
