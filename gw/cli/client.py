"""The client of the daemon's management API, and where to find the daemon and its token."""

from __future__ import annotations


import click

from ..core import hosts
from ..core.settings import Settings
from ..core.errors import ConfigError
from ..kernel.netlink import bridge_address
from .common import Failure, config_option, load

DEFAULT_URL = "http://127.0.0.1:11022"


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
            raise Failure(f"cannot reach the gateway at {self.url}: {_transport(exc)}") from None
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


def _transport(exc) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known",
                   "No route to host"):
        if marker in text:
            return marker.lower()
    return text[:200]


def default_url(settings: Settings | None) -> str:
    """From the configuration: api.host (default: the internal IPv4, from the config or from
    the bridge's address) and api.port; http://127.0.0.1:11022 without a configuration. In a
    pair, loopback: the API's own address floats, and this node's daemon is the one asked."""
    if settings is None:
        return DEFAULT_URL
    host = settings.api.host or (str(settings.network.internal_ipv4)
                                 if settings.network.internal_ipv4 else None)
    host = host or bridge_address(settings.network.bridge_interface, 4) or "127.0.0.1"
    if settings.ha.enabled:
        host = hosts.node_local_extra(host) or host
    return f"http://{hosts.in_url(hosts.reachable(host))}:{settings.api.port}"


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
    """The client the API options describe; an unreadable token file is a Failure."""
    from ..daemon import auth

    settings = load(config_path, required=config_path is not None)
    try:
        token = auth.client_token(settings, token_file)
    except ConfigError as exc:
        raise Failure(f"cannot read the API token: {exc.message}") from None
    return Client(api_url or default_url(settings), token, timeout)


def settings_client(settings: Settings) -> Client:
    """The daemon's client as the configuration finds it, for commands that fall back to the
    API; without a readable token it asks without one (the daemon's answer says why)."""
    from ..daemon import auth

    try:
        token = auth.client_token(settings)
    except ConfigError:
        token = None
    return Client(default_url(settings), token, 10.0)
