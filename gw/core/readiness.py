"""Why the gateway is not ready, by cause: one answer for /api/ready, /api/status and /metrics
(pure, apart from calling the checks it is given).

A reason's key names its cause, optionally followed by what it is about ("route 10.30.0.0/16").
Its text may carry details a caller without the token must not see (nft's words about a refused
transaction can quote map elements), so a public view shows a fixed sentence per cause.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

log = logging.getLogger(__name__)

# Every cause the code can report, so /metrics shows each as 0 or 1 (an alert needs the series
# to exist while all is well) and the public /api/ready has a sentence for each.
SUMMARY = {
    "firewall": "the last nftables transaction failed",
    "store": "the store and the kernel may differ",
    "drift": "another process changed our table and the repair failed",
    "tunnel": "the tunnel interface is missing or down",
    "route": "a service range is not routed through the tunnel",
    "forwarding_ipv4": "IPv4 forwarding is off",
    "forwarding_ipv6": "IPv6 forwarding is off",
    "netlink": "links and routes cannot be read",
    "readiness_check": "the readiness check failed",
    "mqtt": "not connected to the cluster's MQTT broker",
    "etcd": "the shared table on etcd cannot be reached or has no quorum: changes are refused",
}
CAUSES = tuple(SUMMARY)


def reasons(problems: Mapping[str, str], checks: Callable[[], Mapping[str, str]]) -> dict:
    """The gateway's own problems plus the data-path checks; a failing check is a reason."""
    found = dict(problems)
    try:
        found.update(checks() or {})
    except Exception as exc:  # noqa: BLE001 - a failing check is a reason, not a 500
        log.exception("readiness check failed")
        found["readiness_check"] = f"the readiness check failed: {exc}"
    return found


def cause(key: str) -> str:
    return key.split(" ", 1)[0]


def public(found: Mapping[str, str]) -> dict:
    """The reasons as anyone may see them: the key, and a fixed sentence for its cause."""
    return {key: SUMMARY.get(cause(key), "not ready") for key in found}


def by_cause(found: Mapping[str, str]) -> dict[str, int]:
    """1 for each cause present, 0 for each known cause absent."""
    flags = dict.fromkeys(CAUSES, 0)
    for key in found:
        flags[cause(key)] = 1
    return flags
