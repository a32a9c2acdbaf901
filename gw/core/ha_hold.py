"""The promotion hold: while a gateway of a pair is not master, traffic to the floating
addresses is dropped, and `ha notify` lifts the hold once conntrackd has committed the synced
flows into the kernel. Pure: the nft scripts; `gw.service.ha_notify` runs them.

Why: keepalived raises the addresses (and sends gratuitous ARP) before the notify hears of
it (keepalived issue #2254). With conntrackd's external cache (ha.conntrack_external_cache)
the kernel does not know the synced flows until the commit: a packet of an established flow
that comes first is answered with a reset by the service or the gateway. Dropped instead, it
is sent again and then finds its flow. Without the external cache the flows are in the kernel
already and no hold is needed (none is set).

A table of its own, not a chain of the daemon's: the notify alone knows when the commit is
done, it applies the hold while the daemon may be restarting, and a master carries no rule at
all (the table is deleted). The daemon's drift watcher only looks at `inet oakestra_gw`.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

HOLD_TABLE = "oakestra_gw_ha"


def hold_script(addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    """Replace the hold table (one transaction) with one that drops traffic to `addresses`
    arriving from outside (the node's own traffic over lo, e.g. the CLI to the API, passes).
    Before conntrack (priority raw): a dropped packet leaves no entry behind."""
    by_family = {4: [], 6: []}
    for a in addresses:
        by_family[a.version].append(str(a))
    lines = [f"table inet {HOLD_TABLE}", f"delete table inet {HOLD_TABLE}",
             f"table inet {HOLD_TABLE} {{"]
    for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        if by_family[version]:
            lines.append(f"\tset held_v{version} {{ type {kind}; "
                         f"elements = {{ {', '.join(by_family[version])} }} }}")
    lines += ["\tchain hold {",
              "\t\ttype filter hook prerouting priority raw; policy accept;",
              '\t\tiifname "lo" accept']
    for version, match in ((4, "ip daddr"), (6, "ip6 daddr")):
        if by_family[version]:
            lines.append(f"\t\t{match} @held_v{version} counter drop")
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def lift_script() -> str:
    """Delete the hold table, whether it is there or not."""
    return f"table inet {HOLD_TABLE}\ndelete table inet {HOLD_TABLE}\n"
