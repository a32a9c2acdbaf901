"""`oakestra-gw expose add|delete|list`: exposures through the running daemon's API."""

from __future__ import annotations

import click

from . import output
from .client import Client, api_options, make_client
from .common import CONTEXT, echo_json

LIST_PAGE = 1000

@click.group(context_settings=CONTEXT)
def expose():
    """Add, delete and list exposures through the running daemon's API.

    An exposure maps a public port of the gateway to a service inside the cluster:
    exposed_port/protocol -> service_ip:service_port. Its identity is (family, protocol,
    exposed_port): a port may be exposed once for IPv4 and once for IPv6.

    The daemon is found from the configuration (api.host, api.port) or --api; the token from
    api.token_file, the token the daemon generated next to its store, or --token-file.

    \b
    Examples:
      oakestra-gw expose add 8080 10.30.0.1:80
      oakestra-gw expose add 5353 10.30.0.1:53 --udp --service-id dns
      oakestra-gw expose add 8443 [fdff::1]:443
      oakestra-gw expose add --ports "8080:80/tcp;5353:53/udp" --service-ip 10.30.0.1
      oakestra-gw expose list
      oakestra-gw expose delete 8080
    """


def _target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"{text!r} is not IP:PORT (e.g. 10.30.0.1:80 or [fdff::1]:80)",
                                 param_hint="TARGET")
    return host.strip("[]"), int(port)


class PortProto(click.ParamType):
    """PORT or PORT/PROTO (`8080`, `5353/udp`): the port as an int (the daemon checks its
    range), the protocol or None when not written."""

    name = "PORT[/PROTO]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        port, sep, proto = str(value).strip().partition("/")
        proto = proto.lower()
        if not port.isdigit() or len(port) > 10 or (sep and proto not in ("tcp", "udp")):
            self.fail(f"{value!r} is not PORT or PORT/PROTO (e.g. 8080 or 5353/udp)",
                      param, ctx)
        return int(port), (proto or None)


def _protocol(port_proto: tuple[int, str | None], udp: bool) -> str:
    """The protocol from PORT/PROTO and --udp; a contradiction is a usage error."""
    written = port_proto[1]
    if written == "tcp" and udp:
        raise click.UsageError(f"{port_proto[0]}/tcp contradicts --udp")
    return written or ("udp" if udp else "tcp")


@expose.command("add", context_settings=CONTEXT)
@click.argument("port", type=PortProto(), required=False)
@click.argument("target", required=False)
@click.option("--udp", is_flag=True, help="UDP instead of TCP")
@click.option("--service-id", metavar="ID", help="A label for the exposure (e.g. Oakestra's "
              "service id); an existing exposure with the same target gets the new label")
@click.option("--ports", metavar="SPEC", help="Oakestra's port notation host[:container][/proto]"
              ", ';'-separated, tcp by default, e.g. \"8080:80/tcp;5353:53/udp\" (with "
              "--service-ip, instead of PORT TARGET)")
@click.option("--service-ip", metavar="IP", help="The service IP for --ports")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer")
@api_options
def expose_add(port, target, udp, service_id, ports, service_ip, as_json, **api):
    """Expose PORT (TCP; PORT/udp or --udp for UDP) on the gateway's public addresses,
    forwarded to TARGET (IP:PORT).

    TARGET is a service IP in the service ranges (default 10.30.0.0/16, fdff::/16) and its
    port; IPv6 targets are written [IP]:PORT. With --ports and --service-ip, several ports
    of one service are added in one request, all or none.

    Adding an exposure that exists with the same target changes nothing (or only updates its
    label); a port exposed to another target is a conflict: delete it first.

    \b
    Examples:
      oakestra-gw expose add 8080 10.30.0.1:80
      oakestra-gw expose add 5353/udp 10.30.0.1:53
      oakestra-gw expose add 8443 [fdff::1]:443 --service-id web
      oakestra-gw expose add --ports "8080:80/tcp;5353:53/udp" --service-ip 10.30.0.1

    \b
    Exit codes: 0 added or already there; 1 refused (the message says why and names the
    field) or the daemon unreachable; 2 usage error.
    """
    if ports is not None:
        if port is not None or target is not None or udp:
            raise click.UsageError("give either PORT TARGET [--udp] or --ports with "
                                   "--service-ip, not both")
        if not service_ip:
            raise click.UsageError("--ports needs --service-ip")
        body = {"exposures": _port_notation(ports, service_ip, service_id)}
    else:
        if port is None or target is None:
            raise click.UsageError("give PORT and TARGET (e.g. 8080 10.30.0.1:80), or --ports "
                                   "with --service-ip")
        if service_ip:
            raise click.UsageError("--service-ip goes with --ports; give TARGET as IP:PORT")
        ip, service_port = _target(target)
        body = {"exposed_port": port[0], "service_ip": ip, "service_port": service_port,
                "protocol": _protocol(port, udp)}
        if service_id is not None:
            body["service_id"] = service_id
    status, doc = make_client(**api).call("POST", "/api/service/exposure/add", body)
    if as_json:
        echo_json(doc)
        return
    for exposure, outcome in zip(doc["exposures"], doc["outcomes"]):
        click.echo(output.line(output.exposure(exposure), outcome))


def _port_notation(spec: str, service_ip: str, service_id: str | None) -> list[dict]:
    """Split Oakestra's notation client-side (syntax only; the daemon validates values)."""
    from ..core.errors import InvalidInput  # noqa: PLC0415
    from ..core.exposure import split_port_notation  # noqa: PLC0415

    try:
        return split_port_notation(spec, service_ip, service_id)
    except InvalidInput as exc:
        raise click.BadParameter(exc.message, param_hint="--ports") from None


@expose.command("delete", context_settings=CONTEXT)
@click.argument("port", type=PortProto())
@click.option("--udp", is_flag=True, help="The UDP exposure instead of the TCP one")
@click.option("--family", type=click.Choice(["ipv4", "ipv6"]),
              help="Only this family [default: both]")
@click.option("--ignore-not-found", is_flag=True,
              help="Succeed (exit 0, nothing deleted) when PORT is not exposed")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer")
@api_options
def expose_delete(port, udp, family, ignore_not_found, as_json, **api):
    """Stop exposing PORT (TCP unless PORT/udp or --udp), for both families unless --family.

    New connections stop at once; established ones through it are cut right after (usually
    within a second).

    \b
    Examples:
      oakestra-gw expose delete 8080
      oakestra-gw expose delete 5353/udp
      oakestra-gw expose delete 8443 --family ipv6
      oakestra-gw expose delete 8080 --ignore-not-found   # idempotent, for scripts

    \b
    Exit codes: 0 deleted (or, with --ignore-not-found, not exposed); 1 not exposed, refused
    or the daemon unreachable.
    """
    body = {"exposed_port": port[0], "protocol": _protocol(port, udp)}
    if family:
        body["family"] = family
    ok = (200, 404) if ignore_not_found else (200,)
    status, doc = make_client(**api).call("POST", "/api/service/exposure/delete", body, ok=ok)
    if status == 404:
        doc = {"deleted": []}
    if as_json:
        echo_json(doc)
        return
    for exposure in doc["deleted"]:
        click.echo(output.line(output.exposure(exposure), "deleted"))


@expose.command("list", context_settings=CONTEXT)
@click.option("--family", type=click.Choice(["ipv4", "ipv6"]), help="Only this family")
@click.option("--protocol", type=click.Choice(["tcp", "udp"]), help="Only this protocol")
@click.option("--service-id", metavar="ID", help="Only exposures with this label")
@click.option("--port", "ports", metavar="PORT[-PORT]", help="Only this port or port range")
@click.option("--json", "as_json", is_flag=True, help="Print the exposures as JSON "
              "({\"exposures\": [...]})")
@api_options
def expose_list(family, protocol, service_id, ports, as_json, **api):
    """List the exposures the daemon holds, by family, protocol and port.

    The filters are applied by the daemon; the list is fetched in pages of 1000 (the API's
    `limit` and `cursor`), so a large table never travels in one answer.

    \b
    Examples:
      oakestra-gw expose list
      oakestra-gw expose list --protocol udp --port 5000-5999
      oakestra-gw expose list --service-id web --json | jq '.exposures[].exposed_port'
    """
    query = {"family": family, "protocol": protocol, "service_id": service_id, "port": ports}
    rows = list(_pages(make_client(**api), {k: v for k, v in query.items() if v}))
    if as_json:
        echo_json({"exposures": rows})
        return
    if not rows:
        click.echo("no exposures", err=True)
        return
    click.echo(output.TABLE_HEADER)
    for d in rows:
        click.echo(output.row(output.exposure(d)))


def _pages(client: Client, query: dict):
    """Every exposure matching `query`, page by page along the API's cursor."""
    from urllib.parse import urlencode

    params = {**query, "limit": LIST_PAGE}
    while True:
        _, doc = client.call("GET", "/api/service/exposure?" + urlencode(params))
        yield from doc["exposures"]
        if not doc.get("next_cursor"):
            return
        params["cursor"] = doc["next_cursor"]
