"""`oakestra-gw teardown`: remove what the gateway put into the kernel, to decommission a node."""

from __future__ import annotations

import click

from ..core.errors import GatewayError, StoreLocked
from ..core.ha_hold import HOLD_TABLE, lift_script
from .common import CONTEXT, Failure, config_option, echo_json, load, reason, warn


@click.command(context_settings=CONTEXT)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
def teardown(config_path, as_json):
    """Remove everything the gateway put into the kernel, to decommission a node: our
    nftables table (table inet oakestra_gw, both maps, all its chains), our bridge with the
    internal addresses, and the conntrack entries of every flow it NATed (their established
    flows stop); in a gateway pair (ha.enabled) also the promotion hold (table inet
    oakestra_gw_ha, see `ha notify`). The store and the configuration stay. Needs root; stop
    the daemon (and keepalived) first.

    \b
    Example:
      systemctl disable --now oakestra-gw
      oakestra-gw teardown --config /etc/oakestra-gw/gateway.toml
    """
    from ..kernel import conntrack, firewall, netlink
    from ..store.local import LocalStore

    settings = load(config_path)
    try:
        with LocalStore(settings.store.path, shared=True) as store:
            meta = store.meta()
    except StoreLocked:
        raise Failure("the daemon holds the store: stop it first (systemctl stop oakestra-gw); "
                      "it would restore the table otherwise") from None
    except GatewayError as exc:
        warn(f"cannot read the store ({exc.message})")
        meta = {}
    try:
        from ..kernel.nft import NftSession

        existed = firewall.teardown(NftSession())
    except (GatewayError, ImportError, OSError) as exc:
        raise Failure(f"cannot remove the table: {reason(exc)}") from None
    from ..core.ruleset import TABLE

    if not as_json:
        click.echo(f"table {TABLE}: {'removed' if existed else 'was not there'}")
    # Every flow we NATed answers to an internal address (standalone: the config's; Oakestra
    # mode: the ones the cluster assigned, kept in the store).
    internal = {str(ip) for ip in (settings.network.internal_ipv4,
                                   settings.network.internal_ipv6) if ip}
    internal |= {meta[k] for k in ("internal_ipv4", "internal_ipv6") if meta.get(k)}
    removed = conntrack.delete_snatted_to(sorted(internal))
    if not as_json:
        click.echo(f"conntrack: {removed} NATed entries removed")
    bridge = settings.network.bridge_interface
    bridge_removed = netlink.remove_bridge(settings)
    held = _remove_hold() if settings.ha.enabled else {}
    if as_json:
        echo_json({"table_removed": existed, "conntrack_removed": removed,
                   "bridge_removed": bridge_removed, **held})
        return
    if held:
        click.echo(f"table inet {HOLD_TABLE}: "
                   f"{'removed' if held['ha_hold_removed'] else 'was not there'}")
    click.echo(f"bridge {bridge}: {'removed' if bridge_removed else 'was not there'}")


def _remove_hold() -> dict:
    """The promotion hold `ha notify` may have left (it would keep dropping traffic to the
    floating addresses)."""
    from ..kernel.nft import NftSession

    nft = NftSession()
    try:
        existed = f"table inet {HOLD_TABLE}" in nft.run("list tables")
        nft.run(lift_script())
    except GatewayError as exc:
        raise Failure(f"cannot remove the table inet {HOLD_TABLE}: {reason(exc)}") from None
    finally:
        nft.close()
    return {"ha_hold_removed": existed}
