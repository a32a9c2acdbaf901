"""Joining the Oakestra cluster (DESIGN: 'Oakestra cluster contract').

STUB, being implemented (issue 6): Oakestra mode (register -> ip -> bridge -> ready), the
bridge via gw.netlink, background re-registration. The server calls exactly these two
functions; their signatures are the contract between gw.server and this module.
"""

from __future__ import annotations

from .config import Settings
from .errors import ConfigError


def bring_up(settings: Settings, store) -> Settings:
    """Before the table is loaded and the API binds: returns the settings with the internal
    IPs filled in (standalone: from the config; Oakestra mode: stored or from the cluster),
    after the bridge towards the Oakestra network carries them."""
    if settings.standalone:
        settings.require_internal_ips()
        return settings
    raise ConfigError("Oakestra mode is not implemented yet", field="oakestra.cluster_url")


def announce_ready(settings: Settings, store, token: str | None) -> None:
    """After the API listens: the ready callback to the cluster (Oakestra mode only; runs
    in the background with retries, never blocks serving)."""
    return None
