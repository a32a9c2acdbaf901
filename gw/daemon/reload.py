"""Configuration changes of a running daemon (SIGHUP): which keys apply live, which wait for a
restart, and the reloaded settings a daemon adopts (docs/configuration.md, "Reload").

Pure except `read`, which reads the file and the token and logs why a reload is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from ..core.config import EgressSettings, Settings, load_config
from ..core.errors import ConfigError, one_line
from ..core.exposure import Exposure
from . import auth

log = logging.getLogger("gw.daemon.server")  # the reload's lines read as the daemon's

# Keys a reload applies live; any other change is logged as "restart needed".
LIVE = {"api.allowed_sources", "api.token_file", "network.reserved_ports",
        "network.service_ranges", "network.tunnel_interface", "network.public_interfaces",
        "log.level", "log.format",
        *(f"egress.{name}" for name in EgressSettings.__dataclass_fields__)}

# Settings held under another name than their key in gateway.toml (a key that takes a list).
FIELD_KEYS = {"oakestra.cluster_urls": "oakestra.cluster_url",
              "oakestra.mqtt_urls": "oakestra.mqtt_url"}
SETTINGS_SECTIONS = ("api", "store", "network", "oakestra", "log", "egress", "ha")


def config_changes(before: Settings, after: Settings) -> list[str]:
    """Pure: the dotted keys (as written in the file) whose values differ."""
    changed = []
    for section in SETTINGS_SECTIONS:
        a, b = getattr(before, section), getattr(after, section)
        for name in a.__dataclass_fields__:
            if getattr(a, name) != getattr(b, name):
                key = f"{section}.{name}"
                changed.append(FIELD_KEYS.get(key, key))
    return changed


def restart_needed(started: Settings, now: Settings) -> list[str]:
    """Pure: the keys whose value in the file (`now`) differs from the one the process started
    with and that only a restart applies."""
    return [key for key in config_changes(started, now) if key not in LIVE]


def apply_live(running: Settings, new: Settings) -> Settings:
    """Pure: the running settings with the live keys of `new`."""
    return replace(
        running,
        api=replace(running.api, allowed_sources=new.api.allowed_sources,
                    token_file=new.api.token_file),
        network=replace(running.network, reserved_ports=new.network.reserved_ports,
                        service_ranges=new.network.service_ranges,
                        tunnel_interface=new.network.tunnel_interface,
                        public_interfaces=new.network.public_interfaces),
        log=new.log, egress=new.egress)


@dataclass(frozen=True)
class Reloaded:
    settings: Settings            # the running settings with the file's live keys
    token: str | None
    variables: dict[str, str]     # the skeleton's values for them
    pending: list[str]            # keys that changed and wait for a restart
    changed: list[str]            # live keys that changed


def read(path: str, started: Settings, running: Settings,
         skeleton_vars: Callable[[Settings], dict[str, str]]) -> Reloaded | None:
    """The configuration file again, as the running daemon would adopt it; None (logged, the
    running configuration kept) when the file, the token or the skeleton's values are bad."""
    log.info("reload: reading %s", path)
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("reload: %s; keeping the running configuration", one_line(exc))
        return None
    pending = restart_needed(started, new)
    for key in pending:
        log.warning("reload: %s changed: restart needed to apply it", key)
    settings = apply_live(running, new)
    try:
        token = auth.daemon_token(settings)
    except ConfigError as exc:
        log.error("reload: %s; keeping the running token and configuration", one_line(exc))
        return None
    try:
        variables = skeleton_vars(settings)
    except ConfigError as exc:
        log.error("reload: %s; keeping the running configuration", one_line(exc))
        return None
    return Reloaded(settings, token, variables, pending, config_changes(running, settings))


def warn_outside_ranges(exposures: Iterable[Exposure], settings: Settings) -> None:
    """Stored exposures a narrowed network.service_ranges no longer admits stay until deleted."""
    outside = [e for e in exposures
               if not any(e.service_ip in net for net in settings.network.service_ranges)]
    if outside:
        log.warning("reload: %d stored exposure(s) lie outside network.service_ranges "
                    "(e.g. %s); they stay until deleted", len(outside), outside[0])
