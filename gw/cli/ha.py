"""`oakestra-gw ha`: gateway pairs. `render` prints keepalived's and conntrackd's configuration
for this gateway from its `[ha]` settings (the Ansible role writes the same text); `notify`
is the script keepalived runs to hand over its role changes (gw.service.ha_notify)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import sys
from pathlib import Path

import click

from ..core import ha
from ..core.settings import DEFAULT_CONFIG_PATH
from ..daemon.logs import LEVELS, TextFormatter
from .common import CONTEXT, Failure, config_option, load


@click.group("ha", context_settings=CONTEXT)
def ha_group():
    """Gateway pairs: keepalived moves the floating addresses, conntrackd syncs the flows.

    \b
    Examples:
      oakestra-gw ha render keepalived --config /etc/oakestra-gw/gateway.toml
      oakestra-gw ha render conntrackd --config /etc/oakestra-gw/gateway.toml --systemd
      oakestra-gw status    # the role keepalived gave this gateway (ha:)
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
        text = ha.render_conntrackd(settings.ha, systemd=systemd, local=settings.etcd_addresses)
    click.echo(text, nl=False)


@ha_group.command("notify", context_settings=CONTEXT)
@click.argument("fifo", required=False, metavar="[FIFO]")
@config_option
@click.option("--log-file", metavar="FILE",
              help="Append the log to FILE [default: syslog (the journal) when /dev/log "
                   "exists, else stderr]")
def notify(fifo, config_path, log_file):
    """Follow keepalived's notify FIFO: tell the daemon this gateway's role and run
    conntrackd's failover steps. keepalived starts it (the rendered keepalived.conf names it in
    vrrp_notify_fifo_script and passes FIFO, default ha.state_dir/keepalived.fifo) and stops
    it with SIGTERM; it is not run by hand, except to test.

    \b
    On each change of the sync group "oakestra_gw", in order:
      MASTER   role "promoting"; conntrackd -c (only with ha.conntrack_external_cache),
               lift the hold, -f, -R, -B (conntrackd's primary-backup.sh); role "master"
      BACKUP   the hold*, role "backup"; then conntrackd -t*, -n
      FAULT    the hold*, role "fault"; then conntrackd -t*
      STOP     the hold*, role "stopped" (keepalived stopped: the addresses are gone)
    (* only with the external cache.) Without the external cache (the default) conntrackd
    writes the peer's flows straight into this kernel: nothing to commit, and -t would
    flush them. With it, the hold (table inet oakestra_gw_ha) drops traffic to the floating
    addresses until the commit is done: keepalived raises them before this hears of it.

    \b
    The role goes to ha.state_dir/role (JSON, replaced atomically), which the daemon reads
    for /api/ready, /api/status, `oakestra-gw status` and the metric oakestra_gw_ha_role; the
    file outlives restarts of the daemon and of this command. A conntrackd step that fails
    (or a missing conntrackd, or nft refusing the hold) is logged and noted in the role file
    ("failed"); the role changes anyway.
    Lines that are not VRRP events are logged and skipped.

    \b
    Examples:
      oakestra-gw ha notify -c /etc/oakestra-gw/gateway.toml /run/oakestra-gw/ha/keepalived.fifo
      cat /run/oakestra-gw/ha/role

    \b
    Exit codes: 0 keepalived closed the FIFO (stop, reload); 1 ha is not enabled or the FIFO
    cannot be opened; 2 configuration error naming the key.
    """
    from ..service import ha_notify  # noqa: PLC0415

    _notify_logging(log_file)
    try:
        settings = load(config_path)
        logging.getLogger().setLevel(LEVELS.get(settings.log.level, logging.INFO))
        if not settings.ha.enabled:
            raise Failure("ha.enabled is not true in the configuration: no role to follow")
        try:
            ha_notify.serve(settings.ha, fifo)
        except OSError as exc:
            raise Failure(f"cannot read the notify fifo {fifo or settings.ha.notify_fifo}: "
                          f"{exc.strerror or exc}") from None
    except Failure as exc:
        # keepalived discards our stderr: the log is where the operator finds why.
        ha_notify.log.error("%s", exc.format_message())
        raise


def _notify_logging(log_file: str | None) -> None:
    """keepalived discards its scripts' output: the log goes to a file or the journal."""
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.ident = "oakestra-gw-ha-notify: "
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TextFormatter(False))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)

