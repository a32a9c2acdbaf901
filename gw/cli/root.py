"""The group `oakestra-gw`: the daemon's own commands (`serve`, `demo`) and every topic's
group or command, added from its module."""

from __future__ import annotations

import sys

import click

from ..core.settings import DEFAULT_CONFIG_PATH
from . import config, expose, ha, rules, status, store, teardown
from .common import CONTEXT, Failure


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="oakestra-gw", prog_name="oakestra-gw")
def main():
    """The Oakestra gateway: exposes cluster services on this node's public addresses.

    The daemon (`serve`) keeps a table of exposed ports and lets the kernel forward them:
    nftables DNATs public-ip:exposed_port to service_ip:service_port of an Oakestra service.
    The `expose` commands and `status` talk to the running daemon over its management API;
    `rules`, `config`, `store` and `teardown` work without it.

    \b
    Examples:
      oakestra-gw serve --config /etc/oakestra-gw/gateway.toml
      oakestra-gw expose add 8080 10.30.0.1:80
      oakestra-gw expose add --ports "8080:80/tcp;5353:53/udp" --service-ip 10.30.0.1
      oakestra-gw expose list
      oakestra-gw expose delete 8080
      oakestra-gw status
      oakestra-gw config check /etc/oakestra-gw/gateway.toml
      oakestra-gw rules show --config /etc/oakestra-gw/gateway.toml
      oakestra-gw ha render keepalived --config /etc/oakestra-gw/gateway.toml

    Run `oakestra-gw COMMAND --help` for the details of each command.
    """


@main.command(context_settings=CONTEXT)
@click.option("--config", "-c", "config_path", metavar="FILE", default=DEFAULT_CONFIG_PATH,
              show_default=True, envvar="OAKESTRA_GW_CONFIG", help="The configuration file")
def serve(config_path):
    """Run the gateway daemon in the foreground (systemd runs it as oakestra-gw.service).

    At start it loads the configuration, opens the store, loads its nftables table with the
    stored exposures (traffic flows from here on), then serves the management API on
    api.host:api.port and, under systemd, reports READY=1 and pings the watchdog.

    \b
    Signals:
      SIGHUP   re-read the configuration: api.allowed_sources, api.token_file,
               network.reserved_ports, network.service_ranges and network.tunnel_interface
               apply at once; other changes are logged as "restart needed". Then the kernel
               table is reconciled with the store (a tampered table is repaired).
      SIGTERM  stop serving and exit 0. The kernel table stays: traffic keeps flowing while
               the daemon restarts or is upgraded (remove it with `oakestra-gw teardown`).

    \b
    Exit codes:
      0  stopped by SIGTERM or SIGINT
      1  could not start (store, kernel, address in use); one line on stderr says why
      2  configuration error; one line on stderr names the key

    \b
    Example:
      oakestra-gw serve --config /etc/oakestra-gw/gateway.toml
    """
    from ..daemon.server import serve as run

    sys.exit(run(config_path))


@main.command(context_settings=CONTEXT)
@click.option("--keep", is_flag=True, help="Leave the lab's namespaces up afterwards")
def demo(keep):
    """The network-namespace lab: a client reaches a service through the gateway. Needs
    root; touches only namespaces it creates.

    \b
    Example:
      oakestra-gw demo
    """
    try:
        from ..lab.demo import main as run_demo
    except ImportError:
        raise Failure("the demo is not installed (gw/lab/demo.py)") from None
    sys.exit(run_demo(keep=keep) or 0)


for command in (expose.expose, status.status, rules.rules, config.config_group,
                store.store_group, teardown.teardown, ha.ha_group):
    main.add_command(command)
