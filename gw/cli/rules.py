"""`oakestra-gw rules show|diff`: the nftables ruleset the gateway loads, and how the kernel
differs from the store. Neither needs the daemon."""

from __future__ import annotations

import sys

import click

from ..core.settings import DEFAULT_CONFIG_PATH, Settings
from ..core.errors import ConfigError, GatewayError
from . import output
from ..kernel.netlink import bridge_address
from .common import CONTEXT, Failure, config_failure, config_option, echo_json, load, reason, warn
from .store import stored_exposures


def _default_interfaces(settings: Settings) -> list[str]:
    """The default route's interfaces, which egress leaves by when the config names none
    (none when they cannot be read: the rendered egress then matches nothing)."""
    if settings.network.public_interfaces:
        return []
    try:
        from ..kernel import netlink  # noqa: PLC0415 - pyroute2, only when needed

        return netlink.default_interfaces()
    except Exception:  # noqa: BLE001 - showing the rules does not need the routes
        return []


def _with_internal_ips(settings: Settings) -> Settings:
    """Oakestra mode: the internal IPs are the cluster's; read them off the bridge."""
    if settings.network.internal_ipv4 and settings.network.internal_ipv6:
        return settings
    v4, v6 = (bridge_address(settings.network.bridge_interface, v) for v in (4, 6))
    if v4 and v6:
        return settings.with_internal_ips(v4, v6)
    return settings


@click.group(context_settings=CONTEXT)
def rules():
    """The nftables ruleset: what the gateway loads, and how the kernel differs from it.

    \b
    Examples:
      oakestra-gw rules show --config /etc/oakestra-gw/gateway.toml
      oakestra-gw rules diff --config /etc/oakestra-gw/gateway.toml
    """


@rules.command("show", context_settings=CONTEXT)
@config_option
@click.option("--no-exposures", is_flag=True, help="Only the skeleton, without map elements")
@click.option("--json", "as_json", is_flag=True,
              help="Print {\"ruleset\": <the nft script>, \"exposures\": <count>}")
def rules_show(config_path, no_exposures, as_json):
    """Print the ruleset the gateway would load: its table (skeleton with the configured
    values) and the stored exposures as map elements. Needs no root when the store is
    readable; changes nothing. The output is an nft script (`nft -c -f` checks it).

    \b
    Examples:
      oakestra-gw rules show --config /etc/oakestra-gw/gateway.toml
      oakestra-gw rules show --config gateway.toml --no-exposures | nft -c -f -
    """
    from ..core import ruleset

    settings = _with_internal_ips(load(config_path))
    exposures = []
    if not no_exposures:
        try:
            exposures = stored_exposures(settings)
        except (GatewayError, Failure) as exc:
            warn(f"without exposures: {reason(exc)}")
    try:
        text = ruleset.render(settings, exposures,
                              default_interfaces=_default_interfaces(settings))
    except ConfigError as exc:
        if not settings.standalone:
            raise Failure("the internal IPs are not known yet: in Oakestra mode the cluster "
                          "assigns them, and bridge "
                          f"{settings.network.bridge_interface} carries none") from None
        raise config_failure(exc, config_path or DEFAULT_CONFIG_PATH) from None
    if as_json:
        echo_json({"ruleset": text, "exposures": len(exposures)})
        return
    click.echo(text, nl=False)


@rules.command("diff", context_settings=CONTEXT)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
def rules_diff(config_path, as_json):
    """Compare the exposures in the kernel (our nftables maps) with the store.

    Reads the store under a shared lock, or asks the daemon when it holds the store. Lists
    the maps, so it takes longer the more exposures there are. Needs root. Repair a difference with
    `systemctl reload oakestra-gw` (SIGHUP: reconcile).

    \b
    Example:
      oakestra-gw rules diff --config /etc/oakestra-gw/gateway.toml

    \b
    Exit codes (like diff(1)): 0 equal; 1 different; 2 trouble.
    """
    from ..kernel import firewall

    settings = load(config_path)
    try:
        desired = stored_exposures(settings)
        from ..kernel.nft import NftSession

        diff = firewall.check(NftSession(), desired, _with_internal_ips(settings),
                              _default_interfaces(settings))
    except Failure as exc:
        raise Failure(exc.message, code=2) from None
    except (GatewayError, ImportError, OSError) as exc:
        raise Failure(reason(exc), code=2) from None
    if as_json:
        echo_json({
            "in_sync": not diff, "stored": len(desired),
            "missing": [e.to_dict() for e in diff.missing],
            "wrong": [e.to_dict() for e in diff.wrong],
            "unexpected": [{"family": f, "protocol": p, "exposed_port": n}
                           for f, p, n in diff.unexpected],
            "chains_edited": diff.chains_changed})
        sys.exit(1 if diff else 0)
    if not diff:
        click.echo(f"in sync: {len(desired)} exposure(s) in the store and the kernel")
        return
    click.echo(f"kernel differs from the store: {diff.summary()}")
    for e in diff.missing:
        click.echo(f"  missing     {output.line(e, label=False)}")
    for e in diff.wrong:
        click.echo(f"  wrong       {output.line(e, label=False)} (kernel has another target)")
    for family, protocol, port in diff.unexpected:
        click.echo(f"  unexpected  {port}/{protocol}  {family}")
    sys.exit(1)
