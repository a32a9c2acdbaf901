"""`oakestra-gw store check`, and reading the store without the daemon (a shared lock; when the
daemon holds the store, its API answers instead)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..core.settings import Settings
from ..core.errors import GatewayError, StoreLocked
from ..core.exposure import Exposure
from ..store.files import store_exists
from . import output
from .client import settings_client
from .common import CONTEXT, Failure, config_option, echo_json, load


def stored_exposures(settings: Settings) -> list[Exposure]:
    """The stored exposures: the store read under a shared lock; when the daemon holds it,
    from the daemon's API (its in-memory copy of the store)."""
    from ..store.local import LocalStore

    path = Path(settings.store.path)
    if not store_exists(path):
        return []
    try:
        with LocalStore(path, shared=True) as store:
            return store.exposures()
    except StoreLocked:
        docs = settings_client(settings).call("GET", "/api/service/exposure")[1]["exposures"]
    return [output.exposure(d) for d in docs]


@click.group("store", context_settings=CONTEXT)
def store_group():
    """Inspect the exposure store.

    \b
    Example:
      oakestra-gw store check --config /etc/oakestra-gw/gateway.toml
    """


@store_group.command("check", context_settings=CONTEXT)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
def store_check(config_path, as_json):
    """Read the store's snapshot and journal and report damage; changes nothing.

    The daemon holds the store exclusively: stop it first (`systemctl stop oakestra-gw`;
    traffic keeps flowing). When the store is damaged, the message names the file; the
    recovery steps are in docs/cli.md.

    \b
    Example:
      oakestra-gw store check --config /etc/oakestra-gw/gateway.toml

    \b
    Exit codes: 0 healthy (or no store yet); 1 damaged, locked or unreadable.
    """
    from ..store.local import LocalStore

    settings = load(config_path)
    path = Path(settings.store.path)
    if not store_exists(path):
        if as_json:
            echo_json({"store": str(path), "exists": False, "problems": []})
            return
        click.echo(f"{path}: no store yet (nothing was ever stored)")
        return
    try:
        with LocalStore(path, shared=True) as store:
            problems = store.check()
            count = len(store.exposures())
    except GatewayError as exc:
        raise Failure(exc.message) from None
    if as_json:
        echo_json({"store": str(path), "exists": True, "exposures": count,
                   "problems": problems})
        if problems:
            sys.exit(1)
        return
    if problems:
        for problem in problems:
            click.echo(f"{path}: {problem}", err=True)
        raise Failure(f"{path}: {len(problems)} problem(s) found")
    click.echo(f"{path}: ok: {count} exposure(s)")
