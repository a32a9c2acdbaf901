"""`oakestra-gw ha`: gateway pairs. `render` prints keepalived's and conntrackd's configuration
for this gateway from its `[ha]` settings (the Ansible role writes the same text)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from ..core import ha
from ..core.settings import DEFAULT_CONFIG_PATH
from .common import CONTEXT, Failure, config_option, load


@click.group("ha", context_settings=CONTEXT)
def ha_group():
    """Gateway pairs: keepalived moves the floating addresses, conntrackd syncs the flows.

    \b
    Examples:
      oakestra-gw ha render keepalived --config /etc/oakestra-gw/gateway.toml
      oakestra-gw ha render conntrackd --config /etc/oakestra-gw/gateway.toml --systemd
    """


def own_program() -> str:
    """The absolute path of this command (keepalived runs scripts by absolute path only)."""
    here = Path(sys.argv[0])
    if here.name == "oakestra-gw" and here.exists():
        return str(here.resolve())
    return shutil.which("oakestra-gw") or "/usr/bin/oakestra-gw"


def notify_command(config_path: str | None) -> str:
    path = os.path.abspath(config_path or os.environ.get("OAKESTRA_GW_CONFIG")
                           or DEFAULT_CONFIG_PATH)
    return f"{own_program()} ha notify --config {path}"


@ha_group.command("render", context_settings=CONTEXT)
@click.argument("tool", type=click.Choice(["keepalived", "conntrackd"]))
@config_option
@click.option("--notify-command", "notify_command_", metavar="CMD",
              help="The command keepalived starts to read its notify fifo [default: this "
                   "program's `ha notify --config FILE`]")
@click.option("--systemd", is_flag=True,
              help="conntrackd runs under a Type=notify unit and logs to the journal")
def render(tool, config_path, notify_command_, systemd):
    """Print TOOL's configuration for this gateway (ha.enabled must be true).

    \b
    Examples:
      oakestra-gw ha render keepalived > /etc/keepalived/keepalived.conf
      keepalived --config-test -f /etc/keepalived/keepalived.conf

    \b
    Exit codes: 0 printed; 1 ha is not enabled; 2 configuration error naming the key.
    """
    settings = load(config_path)
    if not settings.ha.enabled:
        raise Failure("ha.enabled is not true in the configuration: nothing to render")
    if tool == "keepalived":
        text = ha.render_keepalived(settings.ha, notify_command_ or notify_command(config_path))
    else:
        text = ha.render_conntrackd(settings.ha, systemd=systemd)
    click.echo(text, nl=False)
