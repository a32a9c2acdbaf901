"""`oakestra-gw`: the daemon, a client of its API, and tools that work without it.

Exit codes: 0 success; 1 failure (an API error, the daemon unreachable, not ready, the kernel
differs from the store for `rules diff`); 2 a usage or configuration error (one line naming the
key) or, for `rules diff`, trouble.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import click

from .core.config import (DEFAULT_CONFIG_PATH, UNIT_STATE_DIRECTORY, Settings, check_state_directory,
                     load_config)
from .core.errors import ConfigError, GatewayError, StoreLocked

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Failure(click.ClickException):
    """One line on stderr, exit code 1 (or the given one)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code

    def show(self, file=None):
        click.echo(f"oakestra-gw: {self.format_message()}", err=True)


def _config_failure(exc: ConfigError, path) -> Failure:
    from .daemon.server import one_line

    return Failure(f"config error: {one_line(exc)}" + ("" if str(path) in exc.message
                                                        else f" ({path})"), code=2)


def _load(path: str | None, required: bool = True) -> Settings | None:
    """The settings of `path`; the default path may be missing when not `required`."""
    if path is None:
        path = os.environ.get("OAKESTRA_GW_CONFIG") or DEFAULT_CONFIG_PATH
        if not required and not Path(path).exists():
            return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _config_failure(exc, path) from None


config_option = click.option(
    "--config", "-c", "config_path", metavar="FILE", envvar="OAKESTRA_GW_CONFIG",
    help=f"The gateway's configuration [default: {DEFAULT_CONFIG_PATH}; env OAKESTRA_GW_CONFIG]")


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

    Run `oakestra-gw COMMAND --help` for the details of each command.
    """


# == the daemon ===================================================================================

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
    from .daemon.server import serve as run

    sys.exit(run(config_path))


# == API client ===================================================================================

class Client:
    def __init__(self, url: str, token: str | None, timeout: float):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body=None, ok=(200, 201)):
        """The decoded JSON answer; API errors and transport errors become a Failure."""
        import requests

        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            with requests.Session() as session:
                session.trust_env = False  # no proxies or .netrc for a management API
                response = session.request(method, self.url + path, json=body,
                                           headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise Failure(f"cannot reach the gateway at {self.url}: {_reason(exc)}") from None
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.status_code in ok:
            return response.status_code, doc
        if isinstance(doc, dict) and "message" in doc:
            field = f" [field {doc['field']}]" if doc.get("field") else ""
            raise Failure(f"{response.status_code} {doc.get('error', 'error')}: "
                          f"{doc['message']}{field}")
        raise Failure(f"{response.status_code} from {self.url}{path}: "
                      f"{response.text.strip()[:200]}")


def _reason(exc) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known",
                   "No route to host"):
        if marker in text:
            return marker.lower()
    return text[:200]


def _bridge_ipv4(ifname: str) -> str | None:
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", ifname],
                             capture_output=True, text=True, timeout=5)
        for link in json.loads(out.stdout or "[]"):
            for addr in link.get("addr_info", []):
                return addr.get("local")
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return None


def default_url(settings: Settings | None) -> str:
    """From the configuration: api.host (default: the internal IPv4, from the config or from
    the bridge's address) and api.port; http://127.0.0.1:11022 without a configuration."""
    if settings is None:
        return "http://127.0.0.1:11022"
    host = settings.api.host or (str(settings.network.internal_ipv4)
                                 if settings.network.internal_ipv4 else None)
    host = host or _bridge_ipv4(settings.network.bridge_interface) or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{settings.api.port}"


def api_options(f):
    f = click.option("--timeout", type=click.FloatRange(0.1, 600), default=10.0,
                     show_default=True, help="Seconds to wait for the daemon")(f)
    f = click.option("--token-file", metavar="FILE", envvar="OAKESTRA_GW_TOKEN_FILE",
                     help="File holding the bearer token [default: api.token_file of the "
                          "configuration, or the token the daemon generated next to the store; "
                          "env OAKESTRA_GW_TOKEN_FILE]")(f)
    f = click.option("--api", "api_url", metavar="URL", envvar="OAKESTRA_GW_API",
                     help="The daemon's API [default: from the configuration's api.host and "
                          "api.port, else http://127.0.0.1:11022; env OAKESTRA_GW_API]")(f)
    f = config_option(f)
    return f


def make_client(config_path, api_url, token_file, timeout) -> Client:
    from .daemon import auth

    settings = _load(config_path, required=config_path is not None)
    try:
        token = auth.client_token(settings, token_file)
    except ConfigError as exc:
        raise Failure(f"cannot read the API token: {exc.message}") from None
    return Client(api_url or default_url(settings), token, timeout)


def _line(doc: dict, outcome: str | None = None) -> str:
    ip = doc["service_ip"]
    target = f"[{ip}]:{doc['service_port']}" if ":" in ip else f"{ip}:{doc['service_port']}"
    label = f"  ({doc['service_id']})" if doc.get("service_id") else ""
    text = f"{doc['exposed_port']}/{doc['protocol']} -> {target}  {doc['family']}{label}"
    return f"{outcome:<10} {text}" if outcome else text


@main.group(context_settings=CONTEXT)
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
        click.echo(json.dumps(doc, indent=2))
        return
    for exposure, outcome in zip(doc["exposures"], doc["outcomes"]):
        click.echo(_line(exposure, outcome))


def _port_notation(spec: str, service_ip: str, service_id: str | None) -> list[dict]:
    """Split Oakestra's notation client-side (syntax only; the daemon validates values)."""
    from .core.exposure import split_port_notation  # noqa: PLC0415
    from .core.errors import InvalidInput  # noqa: PLC0415

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
        click.echo(json.dumps(doc, indent=2))
        return
    for exposure in doc["deleted"]:
        click.echo(_line(exposure, "deleted"))


LIST_PAGE = 1000


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
        click.echo(json.dumps({"exposures": rows}, indent=2))
        return
    if not rows:
        click.echo("no exposures", err=True)
        return
    click.echo(f"{'FAMILY':<7}{'PROTO':<6}{'PORT':>5}  {'TARGET':<40} SERVICE")
    for d in rows:
        ip = d["service_ip"]
        target = f"[{ip}]:{d['service_port']}" if ":" in ip else f"{ip}:{d['service_port']}"
        click.echo(f"{d['family']:<7}{d['protocol']:<6}{d['exposed_port']:>5}  {target:<40} "
                   f"{d.get('service_id') or '-'}")


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


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the API's status as JSON")
@api_options
def status(as_json, **api):
    """Whether the daemon is alive and ready, its version and mode, configuration changes
    that wait for a restart, and how many exposures it holds (by family and protocol).

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
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"gateway:   {client.url} (version {doc['version']}, {doc['mode']} mode)")
        click.echo(f"state:     {'ready' if doc['ready'] else 'NOT READY'}")
        for cause, reason in sorted(doc["reasons"].items()):
            click.echo(f"  {cause}: {reason}")
        if cluster := doc.get("cluster"):
            link = {True: ", connected", False: ", NOT connected"}.get(cluster.get("connected"), "")
            others = [u for u in cluster.get("configured", []) if u != cluster.get("active")]
            click.echo(f"cluster:   {cluster['mode']} {cluster.get('active') or '(none)'}{link}"
                       + (f" (replicas: {', '.join(others)})" if others else ""))
        if doc["restart_needed"]:
            click.echo(f"restart needed: {', '.join(doc['restart_needed'])} changed "
                       "(systemctl restart oakestra-gw applies them)")
        counts = {k: n for k, n in doc["exposures"].items() if k != "total" and n}
        detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        click.echo(f"exposures: {doc['exposures']['total']}" +
                   (f" ({detail})" if detail else ""))
    if not doc["ready"]:
        sys.exit(1)


# == without the daemon ===========================================================================

def _stored_exposures(settings: Settings, *, api_fallback: bool = True) -> list[dict]:
    """The stored exposures: the store read under a shared lock; when the daemon holds it,
    from the daemon's API (its in-memory copy of the store)."""
    from .store.local import Store

    path = Path(settings.store.path)
    if not _store_exists(path):
        return []
    try:
        with Store(path, shared=True) as store:
            return store.exposures()
    except StoreLocked:
        if not api_fallback:
            raise
        client = Client(default_url(settings), _client_token(settings), 10.0)
        return client.call("GET", "/api/service/exposure")[1]["exposures"]


def _store_exists(path: Path) -> bool:
    """Whether anything was ever stored: the snapshot or a journal (a daemon that never
    compacted has only a journal)."""
    return path.parent.is_dir() and any(p.name == path.name or
                                        p.name.startswith(path.name + ".journal")
                                        for p in path.parent.iterdir())


def _client_token(settings):
    from .daemon import auth

    try:
        return auth.client_token(settings)
    except ConfigError:
        return None


def _default_interfaces(settings: Settings) -> list[str]:
    """The default route's interfaces, which egress leaves by when the config names none
    (none when they cannot be read: the rendered egress then matches nothing)."""
    if settings.network.public_interfaces:
        return []
    try:
        from .kernel import netlink  # noqa: PLC0415 - pyroute2, only when needed

        return netlink.default_interfaces()
    except Exception:  # noqa: BLE001 - showing the rules does not need the routes
        return []


def _with_internal_ips(settings: Settings) -> Settings:
    """Oakestra mode: the internal IPs are the cluster's; read them off the bridge."""
    if settings.network.internal_ipv4 and settings.network.internal_ipv6:
        return settings
    v4 = _bridge_ipv4(settings.network.bridge_interface)
    v6 = None
    try:
        out = subprocess.run(["ip", "-j", "-6", "addr", "show", "dev",
                              settings.network.bridge_interface, "scope", "global"],
                             capture_output=True, text=True, timeout=5)
        for link in json.loads(out.stdout or "[]"):
            for addr in link.get("addr_info", []):
                v6 = v6 or addr.get("local")
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    if v4 and v6:
        return settings.with_internal_ips(v4, v6)
    return settings


@main.group(context_settings=CONTEXT)
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
    from .core import ruleset
    from .core.exposure import Exposure

    settings = _with_internal_ips(_load(config_path))
    exposures = []
    if not no_exposures:
        try:
            exposures = [Exposure.from_dict(d) for d in _stored_exposures(settings)]
        except (GatewayError, Failure) as exc:
            click.echo(f"oakestra-gw: warning: without exposures: "
                       f"{getattr(exc, 'message', None) or exc.format_message()}", err=True)
    try:
        text = ruleset.render(settings, exposures,
                              default_interfaces=_default_interfaces(settings))
    except ConfigError as exc:
        if not settings.standalone:
            raise Failure("the internal IPs are not known yet: in Oakestra mode the cluster "
                          "assigns them, and bridge "
                          f"{settings.network.bridge_interface} carries none") from None
        raise _config_failure(exc, config_path or DEFAULT_CONFIG_PATH) from None
    if as_json:
        click.echo(json.dumps({"ruleset": text, "exposures": len(exposures)}, indent=2))
        return
    click.echo(text, nl=False)


@rules.command("diff", context_settings=CONTEXT)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
def rules_diff(config_path, as_json):
    """Compare the exposures in the kernel (our nftables maps) with the store.

    Reads the store under a shared lock, or asks the daemon when it holds the store. Lists
    the maps (about a second at 50,000 exposures). Needs root. Repair a difference with
    `systemctl reload oakestra-gw` (SIGHUP: reconcile).

    \b
    Example:
      oakestra-gw rules diff --config /etc/oakestra-gw/gateway.toml

    \b
    Exit codes (like diff(1)): 0 equal; 1 different; 2 trouble.
    """
    from .core.exposure import Exposure
    from .kernel.firewall import Firewall

    settings = _load(config_path)
    try:
        desired = [Exposure.from_dict(d) for d in _stored_exposures(settings)]
        from .kernel.nft import NftSession

        diff = Firewall(NftSession(), {}).diff(desired)
    except Failure as exc:
        exc.exit_code = 2
        raise
    except (GatewayError, ImportError, OSError) as exc:
        raise Failure(getattr(exc, "message", None) or str(exc), code=2) from None
    if as_json:
        click.echo(json.dumps({
            "in_sync": not diff, "stored": len(desired),
            "missing": [e.to_dict() for e in diff.missing],
            "wrong": [e.to_dict() for e in diff.wrong],
            "unexpected": [{"family": f, "protocol": p, "exposed_port": n}
                           for f, p, n in diff.unexpected]}, indent=2))
        sys.exit(1 if diff else 0)
    if not diff:
        click.echo(f"in sync: {len(desired)} exposure(s) in the store and the kernel")
        return
    click.echo(f"kernel differs from the store: {diff.summary()}")
    for e in diff.missing:
        click.echo(f"  missing     {e}  {e.family}")
    for e in diff.wrong:
        click.echo(f"  wrong       {e}  {e.family} (kernel has another target)")
    for family, protocol, port in diff.unexpected:
        click.echo(f"  unexpected  {port}/{protocol}  {family}")
    sys.exit(1)


@main.group("config", context_settings=CONTEXT)
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
        raise _config_failure(exc, file) from None
    oak = settings.oakestra
    mode = ("standalone" if settings.standalone
            else f"Oakestra MQTT mode (node {oak.node_id}, {', '.join(oak.mqtt_urls)})"
            if settings.mqtt_mode else f"Oakestra mode ({', '.join(oak.cluster_urls)})")
    try:
        if settings.standalone:
            settings.require_internal_ips()
        check_state_directory(settings, state_directory)
    except ConfigError as exc:
        raise _config_failure(exc, file) from None
    host = settings.api.host or "the internal IPv4"
    if as_json:
        click.echo(json.dumps({"file": str(file), "valid": True,
                               "mode": "standalone" if settings.standalone else "oakestra",
                               "api_host": settings.api.host, "api_port": settings.api.port,
                               "store_path": settings.store.path}, indent=2))
        return
    click.echo(f"{file}: ok: {mode}, API on {host}:{settings.api.port}, store "
               f"{settings.store.path}")


@main.group("store", context_settings=CONTEXT)
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
    from .store.local import Store

    settings = _load(config_path)
    path = Path(settings.store.path)
    if not _store_exists(path):
        if as_json:
            click.echo(json.dumps({"store": str(path), "exists": False, "problems": []}))
            return
        click.echo(f"{path}: no store yet (nothing was ever stored)")
        return
    try:
        with Store(path, shared=True) as store:
            problems = store.check()
            count = len(store.exposures())
    except GatewayError as exc:
        raise Failure(exc.message) from None
    if as_json:
        click.echo(json.dumps({"store": str(path), "exists": True, "exposures": count,
                               "problems": problems}, indent=2))
        if problems:
            sys.exit(1)
        return
    if problems:
        for problem in problems:
            click.echo(f"{path}: {problem}", err=True)
        raise Failure(f"{path}: {len(problems)} problem(s) found")
    click.echo(f"{path}: ok: {count} exposure(s)")


@main.command(context_settings=CONTEXT)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON")
def teardown(config_path, as_json):
    """Remove everything the gateway put into the kernel, to decommission a node: our
    nftables table (table inet oakestra_gw, both maps, all its chains), our bridge with the
    internal addresses, and the conntrack entries of every flow it NATed (their established
    flows stop). The store and the configuration stay. Needs root; stop the daemon first.

    \b
    Example:
      systemctl disable --now oakestra-gw
      oakestra-gw teardown --config /etc/oakestra-gw/gateway.toml
    """
    from .kernel import conntrack, netlink
    from .kernel.firewall import Firewall
    from .store.local import Store

    settings = _load(config_path)
    try:
        with Store(settings.store.path, shared=True) as store:
            meta = store.meta()
    except StoreLocked:
        raise Failure("the daemon holds the store: stop it first (systemctl stop oakestra-gw); "
                      "it would restore the table otherwise") from None
    except GatewayError as exc:
        click.echo(f"oakestra-gw: warning: cannot read the store ({exc.message})", err=True)
        meta = {}
    try:
        from .kernel.nft import NftSession

        existed = Firewall(NftSession(), {}).remove_table()
    except (GatewayError, ImportError, OSError) as exc:
        raise Failure(f"cannot remove the table: {getattr(exc, 'message', None) or exc}") from None
    from .core.ruleset import TABLE

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
    if as_json:
        click.echo(json.dumps({"table_removed": existed, "conntrack_removed": removed,
                               "bridge_removed": bridge_removed}, indent=2))
        return
    click.echo(f"bridge {bridge}: {'removed' if bridge_removed else 'was not there'}")


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
        from .lab.demo import main as run_demo
    except ImportError:
        raise Failure("the demo is not installed (gw/lab/demo.py)") from None
    sys.exit(run_demo(keep=keep) or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
