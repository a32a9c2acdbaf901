"""Links, addresses, routes and sysctls via pyroute2.

STUB, being implemented (issue 6): the bridge with the internal addresses, and the readiness
checks (tunnel route to the service ranges, forwarding on)."""

from __future__ import annotations

from .config import Settings


def readiness_problems(settings: Settings) -> dict[str, str]:
    """Why the data path cannot work now, by cause; empty when it can."""
    return {}
