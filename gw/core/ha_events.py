"""keepalived's notify fifo, understood: its lines as events, the events as this gateway's role,
and what each new role asks of conntrackd. Pure; `gw.service.ha_notify` reads the fifo, runs
the steps and writes the role file the daemon reads (`gw.service.ha_role`).

A fifo line (keepalived.conf(5), "vrrp_notify_fifo") is `TYPE "NAME" STATE PRIORITY`, e.g.
`GROUP "oakestra_gw" MASTER 0` or `INSTANCE "public_v4" BACKUP 100`, in the order the changes
happened. Only the sync group's lines decide the role: its instances move together, and
keepalived writes the group's line once they have (instance lines come first).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .ha import SYNC_GROUP

# The roles the daemon reports. "unknown": no role file yet (keepalived has said nothing since
# boot); "promoting": the group went MASTER and conntrackd's commit has not finished.
ROLES = ("unknown", "backup", "promoting", "master", "fault", "stopped")
# The group's states that change the role, and the role each one means.
GROUP_ROLES = {"MASTER": "master", "BACKUP": "backup", "FAULT": "fault", "STOP": "stopped"}
# What else keepalived may write: instance-only states and priority changes. Known, not used.
OTHER_STATES = frozenset({"DELETED", "MASTER_RX_LOWER_PRI", "MASTER_PRIORITY",
                          "BACKUP_PRIORITY"})
TYPES = ("GROUP", "INSTANCE")

_LINE = re.compile(r'(?P<type>[A-Z]+) "(?P<name>[^"\n]*)" (?P<state>[A-Z_]+)(?: (?P<prio>\d+))?')


class BadLine(ValueError):
    """A line that is not a VRRP notify event (logged and skipped by the reader)."""


@dataclass(frozen=True)
class Event:
    kind: str        # GROUP or INSTANCE
    name: str
    state: str       # MASTER, BACKUP, FAULT, STOP, ...
    priority: int | None = None


def parse_line(line: str) -> Event:
    """One fifo line (its newline optional) as an Event; BadLine says why it is not one."""
    text = line.rstrip("\r\n")
    m = _LINE.fullmatch(text)
    if m is None:
        raise BadLine(f"not a VRRP notify line: {text[:120]!r}")
    if m["type"] not in TYPES:
        raise BadLine(f"unknown notify type {m['type']!r} (expected GROUP or INSTANCE)")
    state = m["state"]
    if state not in GROUP_ROLES and state not in OTHER_STATES:
        raise BadLine(f"unknown state {state!r} for {m['type']} {m['name']!r}")
    return Event(m["type"], m["name"], state, int(m["prio"]) if m["prio"] is not None else None)


def role_of(event: Event, group: str = SYNC_GROUP) -> str | None:
    """The role this event gives the gateway, None if it changes nothing (an instance's line,
    another group's, a priority change)."""
    if event.kind != "GROUP" or event.name != group:
        return None
    return GROUP_ROLES.get(event.state)


@dataclass(frozen=True)
class Step:
    """Tell the daemon a role (`role`), set or lift the promotion hold (`hold`: True, False;
    gw.core.ha_hold), or run conntrackd with `args` (`why` is logged)."""

    role: str | None = None
    args: tuple[str, ...] = ()
    why: str = ""
    hold: bool | None = None


def _conntrackd(*args: str, why: str) -> Step:
    return Step(args=args, why=why)


def steps(role: str, external_cache: bool) -> list[Step]:
    """What a new role asks for, in order, after conntrackd's primary-backup.sh.

    Promotion: conntrackd first (the synced flows in the kernel, then this node's caches
    rebuilt from it and sent to the peer), the daemon last, so that "master" means the flows
    are there. Demotion: the daemon first (it stops claiming the addresses at once), then
    conntrackd asks the new master for its flows.

    Without the external cache (ha.conntrack_external_cache false, the default) conntrackd
    writes synced flows straight into this node's kernel: there is nothing to commit (-c), and
    `-t`, which flushes the kernel's table PurgeTimeout seconds later to clear an old
    master's leftovers, would also remove every flow the peer synced here, so neither runs.
    With it, the flows reach the kernel only with the commit: traffic to the floating
    addresses is held (dropped) whenever this node is not master, and the hold is lifted as
    soon as the commit is done (gw.core.ha_hold). Lifting is also how a stale hold goes.
    """
    if role == "master":
        found = [Step(role="promoting")]
        if external_cache:
            found.append(_conntrackd("-c", why="commit the external cache into the kernel"))
        found += [Step(hold=False),
                  _conntrackd("-f", why="flush the internal and external caches"),
                  _conntrackd("-R", why="resync the internal cache with the kernel"),
                  _conntrackd("-B", why="bulk-send this node's flows to the peer"),
                  Step(role="master")]
        return found
    # The hold first: it must be in place before keepalived may promote this node again.
    found = [Step(hold=True)] if external_cache else []
    found.append(Step(role=role))
    if role in ("backup", "fault") and external_cache:
        found.append(_conntrackd("-t", why="shorten the kernel's timers (an old master's "
                                           "leftover flows)"))
    if role == "backup":
        found.append(_conntrackd("-n", why="ask the master to resync its flows"))
    return found


# -- the role file: the notify writes it, the daemon reads it --------------------------------

def role_record(role: str, since: float, event: str = "", failed: str = "") -> str:
    """The role file's content: one JSON object. `failed`: "" when the role's steps
    (conntrackd's, the hold) succeeded, else what failed (the operator sees it in status)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    doc = {"role": role, "since": round(since, 3), "event": event}
    if failed:
        doc["failed"] = failed
    return json.dumps(doc) + "\n"


def read_record(text: str) -> dict:
    """The role file's content as {"role", "since", ...}; anything unreadable is role
    "unknown" with a "problem" saying why (the daemon reports it, never fails on it)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return {"role": "unknown", "problem": "the role file is not JSON"}
    if not isinstance(doc, dict) or doc.get("role") not in ROLES:
        return {"role": "unknown", "problem": "the role file names no known role"}
    since = doc.get("since")
    found = {"role": doc["role"],
             "since": since if isinstance(since, (int, float)) and not isinstance(since, bool)
             else None}
    if isinstance(doc.get("failed"), str) and doc["failed"]:
        found["failed"] = doc["failed"]
    return found
