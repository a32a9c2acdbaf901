"""Stored exposures checked against what today's host and configuration allow (at start,
after a reload and on new internal addresses). A finding is logged and counted; the exposure
stays: the store is the truth, and deleting it is the operator's call."""

from __future__ import annotations

import logging
from typing import Iterable

from ..core.config import Settings
from ..core.exposure import Exposure, port_conflicts

log = logging.getLogger("gw.daemon.server")


def shadowed_ports(exposures: Iterable[Exposure], settings: Settings) -> int:
    """Exposures on a reserved port or one a local process listens on: how many."""
    from ..kernel.sockets import read_listening  # noqa: PLC0415

    found = port_conflicts(list(exposures), settings.policy(listening=read_listening))
    for exposure, reason in found:
        log.warning("stored exposure %s shadows a local port: %s; it stays, and traffic to "
                    "that port goes to the service, not to the gateway: delete the "
                    "exposure or move the local service", exposure, reason)
    return len(found)


def pointing_at_itself(found: Iterable[Exposure]) -> int:
    """Exposures to the gateway's own internal address (it changed since they were added),
    which the gateway keeps out of the kernel (Gateway.own_addresses): how many."""
    found = list(found)
    for e in found:
        log.error("stored exposure %s points at the gateway's own internal address %s: "
                  "not loaded into the kernel; delete it", e, e.service_ip)
    return len(found)


def own_ips(settings: Settings) -> frozenset[str]:
    """Pure: the gateway's internal addresses, as text."""
    return frozenset(str(ip) for ip in (settings.network.internal_ipv4,
                                        settings.network.internal_ipv6) if ip)
