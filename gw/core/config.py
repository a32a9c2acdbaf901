"""The configuration file (TOML): read it and validate it into the typed, frozen `Settings`.

`parse_config` is pure (a dict in, `Settings` out); `load_config` reads the file. Every error
is a `ConfigError` whose field is the dotted key, so a bad config is one line naming the key.
The settings and their defaults are in `settings`, the typed getters in `config_fields`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import config_fields as f
from .errors import ConfigError
from .ha import HA_KEYS, parse_ha
from .exposure import DEFAULT_RESERVED, parse_reserved
from .settings import (DEFAULT_STORE_PATH, GIVE_UP_AFTER_MAX, LOG_FORMATS, LOG_LEVELS,
                       ApiSettings, EgressSettings, LogSettings, NetworkSettings,
                       OakestraSettings, Settings, StoreSettings)

# A gateway (node) id: it names MQTT topics and URL paths, so no '/', '+', '#' or spaces.
GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MQTT_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

SECTIONS: dict[str, set[str]] = {
    "api": {"host", "port", "token_file", "allowed_sources", "threads", "per_exposure_metrics"},
    "store": {"path", "backend", "endpoints", "prefix", "ca_file", "cert_file", "key_file",
              "timeout", "group_commit"},
    "network": {"public_interfaces", "tunnel_interface", "bridge_interface", "internal_ipv4",
                "internal_ipv6", "service_ranges", "reserved_ports"},
    "oakestra": {"cluster_url", "gateway_id", "public_ipv4", "public_ipv6", "give_up_after",
                 "backoff_max", "probe_interval", "mqtt_url", "node_id", "mqtt_client_id",
                 "mqtt_username", "mqtt_password_file", "mqtt_ca_file"},
    "log": {"level", "format"},
    "egress": {"enabled", "sources", "deny_destinations", "deny_ports",
               "max_connections_per_source"},
    "ha": HA_KEYS,
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


STORE_BACKENDS = ("tinydb", "etcd")
ETCD_PREFIX_RE = re.compile(r"/[A-Za-z0-9._/-]*[A-Za-z0-9._-]")


def _store(store: dict) -> StoreSettings:
    backend = f.choice(store, "backend", "store", "tinydb", STORE_BACKENDS)
    endpoints = f.urls(store, "endpoints", f.HTTP_URL_RE, "an http(s) URL", section="store")
    prefix = f.text(store, "prefix", "store", StoreSettings.prefix)
    if not ETCD_PREFIX_RE.fullmatch(prefix) or "//" in prefix:
        raise ConfigError(f"store.prefix must be an absolute key path such as /oakestra-gw "
                          f"(letters, digits, . _ - and /, no trailing /), not {prefix!r}",
                          field="store.prefix")
    tls = {name: f.text(store, name, "store", "") for name in ("ca_file", "cert_file",
                                                               "key_file")}
    if bool(tls["cert_file"]) != bool(tls["key_file"]):
        missing = "key_file" if tls["cert_file"] else "cert_file"
        raise ConfigError(f"store.{missing} is needed with store.cert_file and store.key_file "
                          "(a client certificate needs its key)", field=f"store.{missing}")
    if backend == "etcd" and not endpoints:
        raise ConfigError('store.endpoints must name at least one etcd client URL with '
                          'backend = "etcd"', field="store.endpoints")
    if backend != "etcd" and (endpoints or any(tls.values())):
        field = "store.endpoints" if endpoints else next(
            f"store.{k}" for k, v in tls.items() if v)
        raise ConfigError(f'{field} is for backend = "etcd" (store.backend is {backend})',
                          field=field)
    return StoreSettings(path=f.text(store, "path", "store", DEFAULT_STORE_PATH) or
                         DEFAULT_STORE_PATH, backend=backend, endpoints=endpoints,
                         prefix=prefix, timeout=f.seconds(store, "timeout", "store", 2.0,
                                                          0.1, 60),
                         group_commit=f.integer(store, "group_commit", "store",
                                                StoreSettings.group_commit, 1, 1024), **tls)


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
    api, store, net, oak, logs, egress, ha = (raw.get(s, {}) for s in (
        "api", "store", "network", "oakestra", "log", "egress", "ha"))
    settings = Settings(
        api=ApiSettings(
            host=f.text(api, "host", "api", "") or None,
            port=f.port(api, "port", "api", 11022),
            token_file=f.text(api, "token_file", "api", ""),
            allowed_sources=f.networks(api, "allowed_sources", "api", ApiSettings.allowed_sources),
            threads=f.integer(api, "threads", "api", 8, 1, 256),
            per_exposure_metrics=f.boolean(api, "per_exposure_metrics", "api", False)),
        store=_store(store),
        network=NetworkSettings(
            public_interfaces=tuple(f.ifname(v, "network.public_interfaces")
                                    for v in f.items(net, "public_interfaces", "network", [])),
            tunnel_interface=f.ifname(f.text(net, "tunnel_interface", "network", "goProxyTun"),
                                     "network.tunnel_interface"),
            bridge_interface=f.ifname(f.text(net, "bridge_interface", "network", "oakgw0"),
                                     "network.bridge_interface"),
            internal_ipv4=f.internal_ip(f.text(net, "internal_ipv4", "network", ""),
                              "network.internal_ipv4", 4),
            internal_ipv6=f.internal_ip(f.text(net, "internal_ipv6", "network", ""),
                              "network.internal_ipv6", 6),
            service_ranges=f.networks(net, "service_ranges", "network",
                                 NetworkSettings.service_ranges),
            reserved_ports=tuple(
                f.wrapped(parse_reserved, r, "network.reserved_ports")
                for r in f.items(net, "reserved_ports", "network", list(DEFAULT_RESERVED)))),
        oakestra=OakestraSettings(
            cluster_urls=f.urls(oak, "cluster_url", f.HTTP_URL_RE, "an http(s) URL"),
            gateway_id=f.text(oak, "gateway_id", "oakestra", ""),
            public_ipv4=f.text(oak, "public_ipv4", "oakestra", ""),
            public_ipv6=f.text(oak, "public_ipv6", "oakestra", ""),
            give_up_after=f.seconds(oak, "give_up_after", "oakestra", 120.0, 0,
                                   GIVE_UP_AFTER_MAX),
            backoff_max=f.seconds(oak, "backoff_max", "oakestra", 30.0, 0.1, 3600),
            probe_interval=f.seconds(oak, "probe_interval", "oakestra", 5.0, 0.1, 3600),
            mqtt_urls=f.urls(oak, "mqtt_url", f.MQTT_URL_RE, "an mqtt:// or mqtts:// URL"),
            node_id=f.text(oak, "node_id", "oakestra", ""),
            mqtt_client_id=f.text(oak, "mqtt_client_id", "oakestra", ""),
            mqtt_username=f.text(oak, "mqtt_username", "oakestra", ""),
            mqtt_password_file=f.text(oak, "mqtt_password_file", "oakestra", ""),
            mqtt_ca_file=f.text(oak, "mqtt_ca_file", "oakestra", "")),
        log=LogSettings(level=f.choice(logs, "level", "log", "info", LOG_LEVELS),
                        format=f.choice(logs, "format", "log", "text", LOG_FORMATS)),
        egress=EgressSettings(
            enabled=f.boolean(egress, "enabled", "egress", None) if "enabled" in egress else None,
            sources=f.networks(egress, "sources", "egress", EgressSettings.sources),
            deny_destinations=f.networks(egress, "deny_destinations", "egress", ()),
            deny_ports=tuple(f.wrapped(parse_reserved, r, "egress.deny_ports")
                             for r in f.items(egress, "deny_ports", "egress", [])),
            max_connections_per_source=f.integer(egress, "max_connections_per_source", "egress",
                                            1024, 1, 1_000_000)),
    )
    settings = replace(settings, ha=parse_ha(ha, settings.network.internal_ipv4,
                                             settings.network.internal_ipv6,
                                             settings.network.bridge_interface))
    _check_mqtt(settings.oakestra)
    _check_pair(settings)
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


def _check_pair(settings: Settings) -> None:
    """A pair (ha.enabled) in Oakestra mode is ONE gateway to the cluster: both nodes carry
    the same id and the same floating addresses in their configs. Nothing the cluster hands
    out at a first start can serve, because each node keeps its own store metadata: two
    first registrations would make two gateways. (parse_ha already requires the floating
    internal addresses, network.internal_ipv4/6.)"""
    ha, oak = settings.ha, settings.oakestra
    if not ha.enabled or settings.standalone:
        return
    if oak.cluster_urls and not GATEWAY_ID_RE.fullmatch(oak.gateway_id):
        raise ConfigError(f"oakestra.gateway_id must be set with ha.enabled in Oakestra mode, "
                          f"the same on both nodes (1-128 of A-Z a-z 0-9 and . _ : -, not "
                          f"{oak.gateway_id!r}): the pair is one gateway to the cluster, and "
                          "an id handed out at each node's first registration would make two",
                          field="oakestra.gateway_id")
    if oak.mqtt_urls and not oak.mqtt_client_id:
        raise ConfigError("oakestra.mqtt_client_id must be set with ha.enabled in MQTT mode, "
                          "another one on each node: both follow node_id's topics, and with "
                          f"the default ({oak.client_id}) on both the broker would disconnect "
                          "one whenever the other connects", field="oakestra.mqtt_client_id")
    floating = {a.ip for a in ha.public_addresses}
    for family in ("ipv4", "ipv6"):
        value = getattr(oak, f"public_{family}")
        if value and _ip_or_none(value) not in floating:
            raise ConfigError(f"oakestra.public_{family} {value} must be one of "
                              "ha.public_addresses with ha.enabled: the cluster reaches the "
                              "pair at its floating public address, whichever node holds it",
                              field=f"oakestra.public_{family}")


def _ip_or_none(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
