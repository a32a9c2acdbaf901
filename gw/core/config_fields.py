"""The typed getters of the configuration file: each reads one key of a TOML table, checks its
type and range, and raises a ConfigError that names the dotted key. Pure."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from .errors import ConfigError, InvalidInput
from .exposure import IPNetwork, address_flaw, parse_port

IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
HTTP_URL_RE = re.compile(r"https?://[^\s/]+(/\S*)?")
MQTT_URL_RE = re.compile(r"mqtts?://(\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]]+)(:\d{1,5})?/?")


def typed(table: dict, key: str, section: str, default: Any, kind: type | tuple, what: str):
    """`table[key]` (or `default`) when it is of `kind` (a bool is never an int here)."""
    value = table.get(key, default)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{section}.{key} must be {what}, not a boolean", field=f"{section}.{key}")
    if not isinstance(value, kind):
        raise ConfigError(f"{section}.{key} must be {what}, not {type(value).__name__}",
                          field=f"{section}.{key}")
    return value


def text(table, key, section, default) -> str:
    return typed(table, key, section, default, str, "a string").strip()


def choice(table, key, section, default, choices) -> str:
    value = text(table, key, section, default).lower()
    if value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}, not {value!r}",
                          field=f"{section}.{key}")
    return value


def boolean(table, key, section, default) -> bool:
    return typed(table, key, section, default, bool, "true or false")


def integer(table, key, section, default, low, high) -> int:
    value = typed(table, key, section, default, int, "an integer")
    if not low <= value <= high:
        raise ConfigError(f"{section}.{key} must be from {low} to {high}, not {value}",
                          field=f"{section}.{key}")
    return value


def seconds(table, key, section, default, low, high) -> float:
    value = typed(table, key, section, default, (int, float), "a number of seconds")
    if not low <= value <= high:
        raise ConfigError(f"{section}.{key} must be from {low} to {high} seconds, not {value}",
                          field=f"{section}.{key}")
    return float(value)


def port(table, key, section, default) -> int:
    value = typed(table, key, section, default, int, "a port number")
    return wrapped(parse_port, value, f"{section}.{key}")


def items(table, key, section, default) -> list:
    return typed(table, key, section, default, list, "a list")


def networks(table, key, section, default) -> tuple[IPNetwork, ...]:
    if key not in table:
        return default
    nets = []
    for item in items(table, key, section, []):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{section}.{key}: {item!r} is not a network (e.g. 10.30.0.0/16)",
                              field=f"{section}.{key}") from None
    return tuple(nets)


def internal_ip(value: str, name: str, version: int):
    """The gateway's internal address of `version` written as `value` ("": not set, None)."""
    if not value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an IP address", field=name) from None
    if ip.version != version:
        raise ConfigError(f"{name}: {value} is not an IPv{version} address", field=name)
    if flaw := address_flaw(ip):
        raise ConfigError(f"{name}: {value} cannot be the gateway's internal address (a {flaw} "
                          "address)", field=name)
    return ip


def ifname(value: Any, name: str) -> str:
    if not isinstance(value, str) or not IFNAME_RE.fullmatch(value):
        raise ConfigError(f"{name}: {value!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)",
                          field=name)
    return value


def urls(table, key, pattern: re.Pattern, what: str,
         section: str = "oakestra") -> tuple[str, ...]:
    """One URL or a list of them (the orchestrator and its replicas, in order)."""
    value = typed(table, key, section, "", (str, list), f"{what} or a list of them")
    given = ([value] if value.strip() else []) if isinstance(value, str) else value
    found = []
    for item in given:
        if not isinstance(item, str) or not pattern.fullmatch(item.strip()):
            raise ConfigError(f"{section}.{key}: {item!r} is not {what}",
                              field=f"{section}.{key}")
        url = item.strip().rstrip("/")
        if url in found:
            raise ConfigError(f"{section}.{key}: {url} is listed twice",
                              field=f"{section}.{key}")
        found.append(url)
    return tuple(found)


def wrapped(parse, value, name):
    try:
        return parse(value, name)
    except InvalidInput as exc:
        raise ConfigError(exc.message, field=name) from None
