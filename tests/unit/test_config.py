"""Config parsing: defaults, every key typed, and errors that name the dotted key."""

import ipaddress

import pytest

from gw.core.config import Settings, load_config, parse_config
from gw.core.errors import ConfigError


def test_defaults():
    s = parse_config({})
    assert s.api.port == 11022 and s.api.host is None and s.standalone
    assert s.network.tunnel_interface == "goProxyTun" and s.network.bridge_interface == "oakgw0"
    assert (22, "tcp") in s.network.reserved_ports and (50103, "udp") in s.network.reserved_ports
    assert s.store.path == "/var/lib/oakestra-gw/exposures.json"
    assert s == Settings()


def test_full_config(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text("""
[api]
host = "127.0.0.1"
port = 11023
token_file = "/etc/oakestra-gw/token"
allowed_sources = ["10.30.0.0/16", "192.0.2.0/24"]
[store]
path = "/tmp/x.json"
[network]
public_interfaces = ["eth0"]
internal_ipv4 = "10.30.255.1"
internal_ipv6 = "fdff::ffff:1"
service_ranges = ["10.30.0.0/16"]
reserved_ports = ["22/tcp", "53/udp"]
[oakestra]
cluster_url = "http://cluster.example:10100/"
""")
    s = load_config(path)
    assert s.api.port == 11023 and s.api_host == "127.0.0.1"
    assert ipaddress.ip_network("192.0.2.0/24") in s.api.allowed_sources
    assert str(s.network.internal_ipv4) == "10.30.255.1"
    assert s.network.reserved_ports == ((22, "tcp"), (53, "udp"))
    assert s.oakestra.cluster_url == "http://cluster.example:10100" and not s.standalone
    policy = s.policy()
    assert (11023, "tcp") in policy.reserved and (53, "udp") in policy.reserved


@pytest.mark.parametrize("raw,field", [
    ({"api": {"port": 0}}, "api.port"),
    ({"api": {"port": "11022"}}, "api.port"),
    ({"api": {"port": True}}, "api.port"),
    ({"api": {"allowed_sources": ["nope"]}}, "api.allowed_sources"),
    ({"api": {"colour": 1}}, "api.colour"),
    ({"firewall": {}}, "firewall"),
    ({"api": 5}, "api"),
    ({"network": {"internal_ipv4": "fdff::1"}}, "network.internal_ipv4"),
    ({"network": {"internal_ipv6": "x"}}, "network.internal_ipv6"),
    ({"network": {"internal_ipv4": "127.0.0.1"}}, "network.internal_ipv4"),
    ({"network": {"tunnel_interface": "a" * 16}}, "network.tunnel_interface"),
    ({"network": {"bridge_interface": 'x"; flush ruleset'}}, "network.bridge_interface"),
    ({"network": {"bridge_interface": "goProxyTun"}}, "network.bridge_interface"),
    ({"network": {"public_interfaces": "eth0"}}, "network.public_interfaces"),
    ({"network": {"reserved_ports": ["x"]}}, "network.reserved_ports"),
    ({"network": {"service_ranges": []}}, "network.service_ranges"),
    ({"oakestra": {"cluster_url": "ftp://x"}}, "oakestra.cluster_url"),
    ({"egress": {"enabled": "yes"}}, "egress.enabled"),
    ({"egress": {"sources": ["10.16.0.0/33"]}}, "egress.sources"),
    ({"egress": {"enabled": True, "sources": []}}, "egress.sources"),
    ({"egress": {"deny_destinations": ["example.com"]}}, "egress.deny_destinations"),
    ({"egress": {"deny_ports": ["25/icmp"]}}, "egress.deny_ports"),
    ({"egress": {"deny_ports": ["smtp"]}}, "egress.deny_ports"),
    ({"egress": {"max_connections_per_source": 0}}, "egress.max_connections_per_source"),
    ({"egress": {"nat": True}}, "egress.nat"),
])
def test_errors_name_the_key(raw, field):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.field == field
    assert field.split(".")[-1] in info.value.message


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[api\nport=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_standalone_needs_internal_addresses():
    with pytest.raises(ConfigError) as info:
        parse_config({}).require_internal_ips()
    assert info.value.field == "network.internal_ipv4"
    with pytest.raises(ConfigError) as info:
        parse_config({}).api_host
    assert info.value.field == "api.host"


def test_api_binds_to_the_internal_address_by_default():
    s = parse_config({}).with_internal_ips("10.30.255.9", "fdff::9")
    assert s.api_host == "10.30.255.9"


def test_egress_defaults_on_in_oakestra_mode_off_standalone():
    standalone = parse_config({})
    assert not standalone.egress_enabled
    assert [str(n) for n in standalone.egress.sources] == ["10.16.0.0/12", "fc00::/7"]
    assert standalone.egress.max_connections_per_source == 1024
    oakestra = parse_config({"oakestra": {"cluster_url": "http://cluster:10100"}})
    assert oakestra.egress_enabled
    assert not parse_config({"oakestra": {"cluster_url": "http://cluster:10100"},
                             "egress": {"enabled": False}}).egress_enabled
    s = parse_config({"egress": {"enabled": True, "deny_ports": ["25/tcp", 53, "53/udp"],
                                 "deny_destinations": ["192.0.2.0/24", "2001:db8::/32"]}})
    assert s.egress_enabled and s.egress.deny_ports == ((25, "tcp"), (53, "tcp"), (53, "udp"))
    assert [str(n) for n in s.egress.deny_destinations] == ["192.0.2.0/24", "2001:db8::/32"]
