"""`oakestra-gw status`: whether the running daemon is ready, and what it holds."""

from __future__ import annotations

import sys
import time

import click

from .client import api_options, make_client
from .common import CONTEXT, echo_json


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the API's status as JSON")
@api_options
def status(as_json, **api):
    """Whether the daemon is alive and ready, its version and mode, configuration changes
    that wait for a restart, and how many exposures it holds (by family and protocol).

    In a gateway pair (ha.enabled), "ha:" is the role keepalived's notify gave this gateway:
    master, promoting (taking over, conntrackd's flows not yet in), backup, fault, stopped, or
    unknown (nothing said since boot), since when, and any conntrackd step that failed; in
    Oakestra mode, "cluster:" says how often this node announced the pair as its master.

    Ready means: the last kernel transaction or reconcile succeeded, no drift is unrepaired,
    the tunnel route exists and forwarding is on. Otherwise the reasons are printed. Keys
    changed in the configuration that a reload cannot apply (api.port, store.path, ...) are
    listed under "restart needed" until `systemctl restart oakestra-gw`.

    \b
    Examples:
      oakestra-gw status
      oakestra-gw status --json | jq .restart_needed

    \b
    Exit codes: 0 ready; 1 not ready or unreachable.
    """
    client = make_client(**api)
    _, doc = client.call("GET", "/api/status")
    if as_json:
        echo_json(doc)
    else:
        click.echo(f"gateway:   {client.url} (version {doc['version']}, {doc['mode']} mode)")
        click.echo(f"state:     {'ready' if doc['ready'] else 'NOT READY'}")
        for cause, reason in sorted(doc["reasons"].items()):
            click.echo(f"  {cause}: {reason}")
        if cluster := doc.get("cluster"):
            link = {True: ", connected", False: ", NOT connected"}.get(cluster.get("connected"), "")
            others = [u for u in cluster.get("configured", []) if u != cluster.get("active")]
            # In a pair: how often this node announced the pair to the cluster as its master.
            told = (f", announced as the pair's master {cluster['announced']} time(s)"
                    if "announced" in cluster else "")
            click.echo(f"cluster:   {cluster['mode']} {cluster.get('active') or '(none)'}{link}"
                       + told + (f" (replicas: {', '.join(others)})" if others else ""))
        if ha_role := doc.get("ha"):
            click.echo(f"ha:        {_role(ha_role)}")
        if doc["restart_needed"]:
            click.echo(f"restart needed: {', '.join(doc['restart_needed'])} changed "
                       "(systemctl restart oakestra-gw applies them)")
        counts = {k: n for k, n in doc["exposures"].items() if k != "total" and n}
        detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        click.echo(f"exposures: {doc['exposures']['total']}" +
                   (f" ({detail})" if detail else ""))
    if not doc["ready"]:
        sys.exit(1)


def _role(record: dict) -> str:
    text = record["role"]
    if record.get("since"):
        text += " since " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["since"]))
    for key in ("failed", "problem"):
        if record.get(key):
            text += f" ({key}: {record[key]})"
    return text
