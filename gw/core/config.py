"""The configuration file (TOML): parsing and validation into typed, frozen settings.

`parse_config` is pure (a dict in, `Settings` out); `load_config` reads the file. Every error
is a `ConfigError` whose field is the dotted key, so a bad config is one line naming the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, InvalidInput
from .exposure import (DEFAULT_RESERVED, DEFAULT_SERVICE_RANGES, IPNetwork, Policy,
                       parse_port, parse_reserved)

DEFAULT_CONFIG_PATH = "/etc/oakestra-gw/gateway.toml"
DEFAULT_STORE_PATH = "/var/lib/oakestra-gw/exposures.json"
# The unit's StateDirectory: under ProtectSystem=strict the only place the store can be written.
UNIT_STATE_DIRECTORY = "/var/lib/oakestra-gw"
# A first start may wait this long for the cluster, then loads the table and binds the API:
# the unit's TimeoutStartSec (180 s) must cover both, so the bound stays 30 s below it.
GIVE_UP_AFTER_MAX = 150
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
# A gateway (node) id: it names MQTT topics and URL paths, so no '/', '+', '#' or spaces.
GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MQTT_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True)
class ApiSettings:
    host: str | None = None  # None: the internal IPv4 address
    port: int = 11022
    token_file: str = ""
    allowed_sources: tuple[IPNetwork, ...] = tuple(
        ipaddress.ip_network(n) for n in ("10.30.0.0/16", "fdff::/16"))
    threads: int = 8
    per_exposure_metrics: bool = False


@dataclass(frozen=True)
class StoreSettings:
    path: str = DEFAULT_STORE_PATH


@dataclass(frozen=True)
class NetworkSettings:
    public_interfaces: tuple[str, ...] = ()  # empty: the default route's interface
    tunnel_interface: str = "goProxyTun"
    bridge_interface: str = "oakgw0"
    internal_ipv4: ipaddress.IPv4Address | None = None
    internal_ipv6: ipaddress.IPv6Address | None = None
    service_ranges: tuple[IPNetwork, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_SERVICE_RANGES)
    reserved_ports: tuple[tuple[int, str], ...] = tuple(parse_reserved(r) for r in DEFAULT_RESERVED)


@dataclass(frozen=True)
class OakestraSettings:
    # The cluster orchestrator and its replicas, in order of preference (empty: standalone).
    cluster_urls: tuple[str, ...] = ()
    gateway_id: str = ""
    public_ipv4: str = ""
    public_ipv6: str = ""
    give_up_after: float = 120.0  # first start: seconds of failed registration before exit 1
    backoff_max: float = 30.0     # cap of the exponential backoff between tries (from 0.5 s)
    probe_interval: float = 5.0   # how often the active orchestrator is checked once joined
    # MQTT mode: the cluster's brokers (the first that answers is used) and this node's id,
    # which names the topics nodes/<node_id>/net/gateway/...
    mqtt_urls: tuple[str, ...] = ()
    node_id: str = ""
    mqtt_client_id: str = ""      # default oakestra-gw-<node_id>: never the NetManager's id
    mqtt_username: str = ""
    mqtt_password_file: str = ""
    mqtt_ca_file: str = ""        # mqtts:// without it: the system's CA store

    @property
    def cluster_url(self) -> str:
        """The preferred orchestrator ("" in standalone and MQTT mode)."""
        return self.cluster_urls[0] if self.cluster_urls else ""

    @property
    def client_id(self) -> str:
        return self.mqtt_client_id or f"oakestra-gw-{self.node_id}"


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"  # json: one JSON object per line, the audit record's fields as keys


# Oakestra's container networks (NetManager's defaults): what services send from.
DEFAULT_EGRESS_SOURCES = ("10.16.0.0/12", "fc00::/7")


@dataclass(frozen=True)
class EgressSettings:
    """Services reaching the Internet through the gateway, masqueraded to the public address
    of the interface they leave by."""

    enabled: bool | None = None  # None: on in Oakestra mode (workers route through us), else off
    sources: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_EGRESS_SOURCES)
    deny_destinations: tuple[IPNetwork, ...] = ()
    deny_ports: tuple[tuple[int, str], ...] = ()
    # Concurrent connections one source address may hold through the NAT, so that one service
    # cannot use up the public address's ports or the conntrack table.
    max_connections_per_source: int = 1024


@dataclass(frozen=True)
class Settings:
    api: ApiSettings = field(default_factory=ApiSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    oakestra: OakestraSettings = field(default_factory=OakestraSettings)
    log: LogSettings = field(default_factory=LogSettings)
    egress: EgressSettings = field(default_factory=EgressSettings)

    @property
    def standalone(self) -> bool:
        return not self.oakestra.cluster_urls and not self.oakestra.mqtt_urls

    @property
    def mqtt_mode(self) -> bool:
        return bool(self.oakestra.mqtt_urls)

    @property
    def egress_enabled(self) -> bool:
        return self.egress.enabled if self.egress.enabled is not None else not self.standalone

    def policy(self, listening: Callable = lambda: (), gateway_id: str | None = None) -> Policy:
        """`gateway_id`: the id the cluster registered this gateway under, when it has one;
        else the configured one (node_id in MQTT mode, oakestra.gateway_id)."""
        reserved = frozenset(self.network.reserved_ports) | {(self.api.port, "tcp")}
        own = frozenset(ip for ip in (self.network.internal_ipv4, self.network.internal_ipv6) if ip)
        gid = gateway_id or self.oakestra.node_id or self.oakestra.gateway_id or None
        return Policy(self.network.service_ranges, reserved, listening, own, gid)

    def with_internal_ips(self, ipv4: str, ipv6: str) -> "Settings":
        """The settings once the cluster has handed out the internal addresses."""
        net = replace(self.network, internal_ipv4=_ip(ipv4, "network.internal_ipv4", 4),
                      internal_ipv6=_ip(ipv6, "network.internal_ipv6", 6))
        return replace(self, network=net)

    @property
    def api_host(self) -> str:
        if self.api.host:
            return self.api.host
        if self.network.internal_ipv4 is None:
            raise ConfigError("api.host is not set and there is no internal IPv4 to bind to",
                              field="api.host")
        return str(self.network.internal_ipv4)

    def require_internal_ips(self) -> None:
        for name in ("internal_ipv4", "internal_ipv6"):
            if getattr(self.network, name) is None:
                raise ConfigError(f"network.{name} must be set in standalone mode "
                                  "(no oakestra.cluster_url)", field=f"network.{name}")


SECTIONS: dict[str, set[str]] = {
    "api": {"host", "port", "token_file", "allowed_sources", "threads", "per_exposure_metrics"},
    "store": {"path"},
    "network": {"public_interfaces", "tunnel_interface", "bridge_interface", "internal_ipv4",
                "internal_ipv6", "service_ranges", "reserved_ports"},
    "oakestra": {"cluster_url", "gateway_id", "public_ipv4", "public_ipv6", "give_up_after",
                 "backoff_max", "probe_interval", "mqtt_url", "node_id", "mqtt_client_id",
                 "mqtt_username", "mqtt_password_file", "mqtt_ca_file"},
    "log": {"level", "format"},
    "egress": {"enabled", "sources", "deny_destinations", "deny_ports",
               "max_connections_per_source"},
}


def load_config(path: str | Path) -> Settings:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> Settings:
    for section, value in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] (known: "
                              f"{', '.join(sorted(SECTIONS))})", field=section)
        if not isinstance(value, dict):
            raise ConfigError(f"{section} must be a table", field=section)
        for key in value:
            if key not in SECTIONS[section]:
                raise ConfigError(f"unknown key {section}.{key}", field=f"{section}.{key}")
    api, store, net, oak, logs, egress = (raw.get(s, {}) for s in (
        "api", "store", "network", "oakestra", "log", "egress"))
    settings = Settings(
        api=ApiSettings(
            host=_str(api, "host", "api", "") or None,
            port=_port(api, "port", "api", 11022),
            token_file=_str(api, "token_file", "api", ""),
            allowed_sources=_nets(api, "allowed_sources", "api", ApiSettings.allowed_sources),
            threads=_int(api, "threads", "api", 8, 1, 256),
            per_exposure_metrics=_bool(api, "per_exposure_metrics", "api", False)),
        store=StoreSettings(path=_str(store, "path", "store", DEFAULT_STORE_PATH) or
                            DEFAULT_STORE_PATH),
        network=NetworkSettings(
            public_interfaces=tuple(_ifname(v, "network.public_interfaces")
                                    for v in _list(net, "public_interfaces", "network", [])),
            tunnel_interface=_ifname(_str(net, "tunnel_interface", "network", "goProxyTun"),
                                     "network.tunnel_interface"),
            bridge_interface=_ifname(_str(net, "bridge_interface", "network", "oakgw0"),
                                     "network.bridge_interface"),
            internal_ipv4=_ip(_str(net, "internal_ipv4", "network", ""),
                              "network.internal_ipv4", 4),
            internal_ipv6=_ip(_str(net, "internal_ipv6", "network", ""),
                              "network.internal_ipv6", 6),
            service_ranges=_nets(net, "service_ranges", "network",
                                 NetworkSettings.service_ranges),
            reserved_ports=tuple(_wrap(parse_reserved, r, "network.reserved_ports") for r in
                                 _list(net, "reserved_ports", "network", list(DEFAULT_RESERVED)))),
        oakestra=OakestraSettings(
            cluster_urls=_urls(oak, "cluster_url", HTTP_URL_RE, "an http(s) URL"),
            gateway_id=_str(oak, "gateway_id", "oakestra", ""),
            public_ipv4=_str(oak, "public_ipv4", "oakestra", ""),
            public_ipv6=_str(oak, "public_ipv6", "oakestra", ""),
            give_up_after=_seconds(oak, "give_up_after", "oakestra", 120.0, 0,
                                   GIVE_UP_AFTER_MAX),
            backoff_max=_seconds(oak, "backoff_max", "oakestra", 30.0, 0.1, 3600),
            probe_interval=_seconds(oak, "probe_interval", "oakestra", 5.0, 0.1, 3600),
            mqtt_urls=_urls(oak, "mqtt_url", MQTT_URL_RE, "an mqtt:// or mqtts:// URL"),
            node_id=_str(oak, "node_id", "oakestra", ""),
            mqtt_client_id=_str(oak, "mqtt_client_id", "oakestra", ""),
            mqtt_username=_str(oak, "mqtt_username", "oakestra", ""),
            mqtt_password_file=_str(oak, "mqtt_password_file", "oakestra", ""),
            mqtt_ca_file=_str(oak, "mqtt_ca_file", "oakestra", "")),
        log=LogSettings(level=_choice(logs, "level", "log", "info", LOG_LEVELS),
                        format=_choice(logs, "format", "log", "text", LOG_FORMATS)),
        egress=EgressSettings(
            enabled=_bool(egress, "enabled", "egress", None) if "enabled" in egress else None,
            sources=_nets(egress, "sources", "egress", EgressSettings.sources),
            deny_destinations=_nets(egress, "deny_destinations", "egress", ()),
            deny_ports=tuple(_wrap(parse_reserved, r, "egress.deny_ports")
                             for r in _list(egress, "deny_ports", "egress", [])),
            max_connections_per_source=_int(egress, "max_connections_per_source", "egress",
                                            1024, 1, 1_000_000)),
    )
    _check_mqtt(settings.oakestra)
    if not settings.network.service_ranges:
        raise ConfigError("network.service_ranges must name at least one network",
                          field="network.service_ranges")
    if settings.egress_enabled and not settings.egress.sources:
        raise ConfigError("egress.sources must name at least one network while egress is on "
                          "(or set egress.enabled = false)", field="egress.sources")
    if settings.network.tunnel_interface == settings.network.bridge_interface:
        raise ConfigError("network.bridge_interface must differ from network.tunnel_interface",
                          field="network.bridge_interface")
    return settings


# -- typed getters: each names the key it complains about -------------------------------------

def _get(table: dict, key: str, section: str, default: Any, kind: type | tuple, what: str):
    value = table.get(key, default)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{section}.{key} must be {what}, not a boolean", field=f"{section}.{key}")
    if not isinstance(value, kind):
        raise ConfigError(f"{section}.{key} must be {what}, not {type(value).__name__}",
                          field=f"{section}.{key}")
    return value


def _str(table, key, section, default) -> str:
    return _get(table, key, section, default, str, "a string").strip()


def _choice(table, key, section, default, choices) -> str:
    value = _str(table, key, section, default).lower()
    if value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}, not {value!r}",
                          field=f"{section}.{key}")
    return value


def _bool(table, key, section, default) -> bool:
    return _get(table, key, section, default, bool, "true or false")


def _int(table, key, section, default, low, high) -> int:
    value = _get(table, key, section, default, int, "an integer")
    if not low <= value <= high:
        raise ConfigError(f"{section}.{key} must be from {low} to {high}, not {value}",
                          field=f"{section}.{key}")
    return value


def check_state_directory(settings: "Settings", state_dirs: str) -> None:
    """Pure: raise ConfigError naming store.path when it lies outside the state directories
    (`state_dirs`: colon-separated, as systemd's $STATE_DIRECTORY)."""
    store = Path(os.path.normpath(settings.store.path))
    dirs = [Path(os.path.normpath(d)) for d in state_dirs.split(":") if d]
    if not any(store.is_relative_to(d) and store != d for d in dirs):
        shown = ", ".join(str(d) for d in dirs)
        raise ConfigError(f"store.path {store} is outside the unit's StateDirectory ({shown}): "
                          "under ProtectSystem=strict it cannot be written there",
                          field="store.path")


def _seconds(table, key, section, default, low, high) -> float:
    value = _get(table, key, section, default, (int, float), "a number of seconds")
    if not low <= value <= high:
        raise ConfigError(f"{section}.{key} must be from {low} to {high} seconds, not {value}",
                          field=f"{section}.{key}")
    return float(value)


def _port(table, key, section, default) -> int:
    value = _get(table, key, section, default, int, "a port number")
    return _wrap(parse_port, value, f"{section}.{key}")


def _list(table, key, section, default) -> list:
    return _get(table, key, section, default, list, "a list")


def _nets(table, key, section, default) -> tuple[IPNetwork, ...]:
    if key not in table:
        return default
    nets = []
    for item in _list(table, key, section, []):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{section}.{key}: {item!r} is not a network (e.g. 10.30.0.0/16)",
                              field=f"{section}.{key}") from None
    return tuple(nets)


def _ip(text: str, name: str, version: int):
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not an IP address", field=name) from None
    if ip.version != version:
        raise ConfigError(f"{name}: {text} is not an IPv{version} address", field=name)
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        raise ConfigError(f"{name}: {text} cannot be the gateway's internal address", field=name)
    return ip


def _ifname(value: Any, name: str) -> str:
    if not isinstance(value, str) or not IFNAME_RE.fullmatch(value):
        raise ConfigError(f"{name}: {value!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)",
                          field=name)
    return value


HTTP_URL_RE = re.compile(r"https?://[^\s/]+(/\S*)?")
MQTT_URL_RE = re.compile(r"mqtts?://(\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]]+)(:\d{1,5})?/?")


def _urls(table, key, pattern: re.Pattern, what: str) -> tuple[str, ...]:
    """One URL or a list of them (the orchestrator and its replicas, in order)."""
    value = _get(table, key, "oakestra", "", (str, list), f"{what} or a list of them")
    items = ([value] if value.strip() else []) if isinstance(value, str) else value
    urls = []
    for item in items:
        if not isinstance(item, str) or not pattern.fullmatch(item.strip()):
            raise ConfigError(f"oakestra.{key}: {item!r} is not {what}", field=f"oakestra.{key}")
        url = item.strip().rstrip("/")
        if url in urls:
            raise ConfigError(f"oakestra.{key}: {url} is listed twice", field=f"oakestra.{key}")
        urls.append(url)
    return tuple(urls)


def _check_mqtt(oak: OakestraSettings) -> None:
    if not oak.mqtt_urls:
        return
    if oak.cluster_urls:
        raise ConfigError("oakestra.mqtt_url and oakestra.cluster_url exclude each other: the "
                          "gateway joins either over MQTT or over HTTP", field="oakestra.mqtt_url")
    if not GATEWAY_ID_RE.fullmatch(oak.node_id):
        raise ConfigError(f"oakestra.node_id must be set with oakestra.mqtt_url: the node's id "
                          f"(1-128 of A-Z a-z 0-9 and . _ : -), not {oak.node_id!r}",
                          field="oakestra.node_id")
    if not MQTT_CLIENT_ID_RE.fullmatch(oak.client_id):
        raise ConfigError(f"oakestra.mqtt_client_id {oak.mqtt_client_id!r} is not a client id "
                          "(1-128 of A-Z a-z 0-9 and . _ : -)", field="oakestra.mqtt_client_id")
    if oak.client_id == oak.node_id:
        raise ConfigError("oakestra.mqtt_client_id must differ from oakestra.node_id: the "
                          "node's NetManager connects with that id, and the broker would "
                          "disconnect one of the two", field="oakestra.mqtt_client_id")
    if oak.mqtt_password_file and not oak.mqtt_username:
        raise ConfigError("oakestra.mqtt_password_file needs oakestra.mqtt_username",
                          field="oakestra.mqtt_password_file")


def _wrap(parse, value, name):
    try:
        return parse(value, name)
    except InvalidInput as exc:
        raise ConfigError(exc.message, field=name) from None
