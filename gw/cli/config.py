"""`oakestra-gw config check`: validate a configuration file as the daemon would at start."""

from __future__ import annotations

import click

from ..core.config import check_state_directory, load_config
from ..core.settings import UNIT_STATE_DIRECTORY
from ..core.errors import ConfigError
from .common import CONTEXT, config_failure, echo_json


@click.group("config", context_settings=CONTEXT)
def config_group():
    """Check a configuration file.

    \b
    Example:
      oakestra-gw config check /etc/oakestra-gw/gateway.toml
    """


@config_group.command("check", context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
@click.option("--state-directory", metavar="DIR", envvar="STATE_DIRECTORY",
              default=UNIT_STATE_DIRECTORY, show_default=True,
              help="The unit's StateDirectory: store.path must lie inside it (the unit makes "
                   "everything else read-only)")
def config_check(file, as_json, state_directory):
    """Validate FILE (TOML) as the daemon would at start, without starting anything.

    \b
    Example:
      oakestra-gw config check /etc/oakestra-gw/gateway.toml && systemctl reload oakestra-gw

    \b
    Exit codes: 0 valid; 2 invalid, with one line naming the key.
    """
    try:
        settings = load_config(file)
    except ConfigError as exc:
        raise config_failure(exc, file) from None
    oak = settings.oakestra
    mode = ("standalone" if settings.standalone
            else f"Oakestra MQTT mode (node {oak.node_id}, {', '.join(oak.mqtt_urls)})"
            if settings.mqtt_mode else f"Oakestra mode ({', '.join(oak.cluster_urls)})")
    try:
        if settings.standalone:
            settings.require_internal_ips()
        check_state_directory(settings, state_directory)
    except ConfigError as exc:
        raise config_failure(exc, file) from None
    host = settings.api.host or "the internal IPv4"
    if as_json:
        echo_json({"file": str(file), "valid": True,
                   "mode": "standalone" if settings.standalone else "oakestra",
                   "api_host": settings.api.host, "api_port": settings.api.port,
                   "store_path": settings.store.path})
        return
    click.echo(f"{file}: ok: {mode}, API on {host}:{settings.api.port}, store "
               f"{settings.store.path}")
