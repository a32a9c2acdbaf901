"""The cluster orchestrator's side of the gateway contract over HTTP (docs/oakestra.md,
"Joining the cluster"): one call per step, each answer validated before it is used. A failure
that may work later raises `Retryable` (and moves to the next replica); one that will not, a
`ClusterError`."""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

from ... import __version__
from ...core.errors import GatewayError
from ...core.config import GATEWAY_ID_RE
from ...core.exposure import address_flaw

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (3.05, 10.0)  # connect, read
RETRY_STATUS = {408, 425, 429}


class ClusterError(GatewayError):
    """Joining the cluster failed; the message says at which step and why."""

    code = "cluster_error"


class ClusterUnreachable(ClusterError):
    """No usable answer before `oakestra.give_up_after` ran out."""

    code = "cluster_unreachable"


class ClusterRefused(ClusterError):
    """The cluster answered with a client error (4xx): trying again will not help."""

    code = "cluster_refused"


class ClusterGarbage(ClusterError):
    """The cluster answered 2xx with something the contract does not allow."""

    code = "cluster_invalid_answer"


class Retryable(Exception):
    """A failed try that may work later (connection refused, timeout, 5xx)."""


# -- the HTTP client ---------------------------------------------------------------------------

class ClusterClient:
    """One call per contract step; each returns validated values or raises `Retryable`,
    `ClusterRefused` or `ClusterGarbage`.

    `url` may be a list: the orchestrator and the replicas that take over when it fails
    (Oakestra's gateway error-handling design). Calls go to the current one; a failure that
    may work elsewhere (connection refused, timeout, 5xx) moves to the next before the
    caller's retry."""

    def __init__(self, url: str | tuple[str, ...], timeout=REQUEST_TIMEOUT, session=None):
        import requests

        self.urls = tuple(u.rstrip("/") for u in ((url,) if isinstance(url, str) else url))
        self._index = 0
        self.timeout = timeout
        self._requests = requests
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"oakestra-gw/{__version__}"

    @property
    def url(self) -> str:
        """The orchestrator in use."""
        return self.urls[self._index]

    def advance(self, why: str) -> None:
        """Move to the next orchestrator of the list (a list of one stays)."""
        if len(self.urls) < 2:
            return
        old = self.url
        self._index = (self._index + 1) % len(self.urls)
        log.warning("cluster orchestrator %s failed (%s): switching to %s", old, why, self.url)

    def probe(self) -> None:
        """Whether the orchestrator in use answers at all: any answer below 500 to
        ``GET /`` counts (the contract has no side-effect-free call to use instead)."""
        self._call("GET", "/", None, want_json=False, probe=True)

    def register(self, gateway_id: str, public_ipv4: str, public_ipv6: str) -> str:
        body = {"gateway_id": gateway_id, "gateway_ipv4": public_ipv4,
                "gateway_ipv6": public_ipv6}
        answer = self._call("POST", "/api/gateway/register", body)
        new_id = _field(answer, "gateway_id", "POST /api/gateway/register")
        if not isinstance(new_id, str) or not GATEWAY_ID_RE.fullmatch(new_id):
            raise ClusterGarbage(f"the cluster's answer to POST /api/gateway/register holds "
                                 f"gateway_id {show(new_id)}, not an id (1-128 of A-Z a-z 0-9 "
                                 "and . _ : -)")
        return new_id

    def internal_ips(self, gateway_id: str) -> tuple[str, str]:
        what = f"GET /api/gateway/{gateway_id}/ip"
        answer = self._call("GET", f"/api/gateway/{gateway_id}/ip", None)
        return (_internal(answer, "oakestra_gateway_ipv4", 4, what),
                _internal(answer, "oakestra_gateway_ipv6", 6, what))

    def ready(self, gateway_id: str, ipv4: str, ipv6: str, api_port: int,
              token: str | None) -> None:
        self._call("POST", f"/api/gateway/{gateway_id}/ready",
                   {"oakestra_gateway_ipv4": ipv4, "oakestra_gateway_ipv6": ipv6,
                    "api_port": api_port, "api_token": token}, want_json=False)

    def _call(self, method: str, path: str, body: dict | None, want_json: bool = True,
              probe: bool = False) -> Any:
        try:
            return self._call_one(method, path, body, want_json, probe)
        except Retryable as exc:
            self.advance(str(exc))
            raise

    def _call_one(self, method: str, path: str, body: dict | None, want_json: bool,
                  probe: bool) -> Any:
        what = f"{method} {path}"
        try:
            resp = self.session.request(method, self.url + path, json=body,
                                        timeout=self.timeout, allow_redirects=False)
        except self._requests.Timeout:
            raise Retryable(f"{what}: no answer within {self.timeout[1]:g} s") from None
        except self._requests.ConnectionError as exc:
            raise Retryable(f"{what}: cannot connect to {self.url} ({_conn_reason(exc)})") \
                from None
        except self._requests.RequestException as exc:
            raise Retryable(f"{what}: {exc}") from None
        status = resp.status_code
        if status >= 500 or status in RETRY_STATUS:
            raise Retryable(f"{what}: the cluster answered {status} {resp.reason}"
                             f"{_excerpt(resp.text)}")
        if probe:
            return None  # it answers: alive, whatever it thinks of GET /
        if status >= 300:
            raise ClusterRefused(f"the cluster refused {what}: {status} {resp.reason}"
                                 f"{_excerpt(resp.text)}")
        if not want_json:
            return None
        try:
            answer = resp.json()
        except ValueError:
            raise ClusterGarbage(f"the cluster's answer to {what} is not JSON"
                                 f"{_excerpt(resp.text) or ' (empty body)'}") from None
        if not isinstance(answer, dict):
            raise ClusterGarbage(f"the cluster's answer to {what} is not a JSON object "
                                 f"but {show(answer)}")
        return answer


def _field(answer: dict, name: str, what: str) -> Any:
    if name not in answer:
        raise ClusterGarbage(f"the cluster's answer to {what} has no {name!r} "
                             f"(it has: {', '.join(sorted(map(str, answer))) or 'nothing'})")
    return answer[name]


def _internal(answer: dict, name: str, version: int, what: str) -> str:
    value = _field(answer, name, what)
    try:
        ip = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        ip = None
    if ip is None or ip.version != version:
        raise ClusterGarbage(f"the cluster's answer to {what} holds {name} {show(value)}, "
                             f"not an IPv{version} address")
    if flaw := address_flaw(ip):
        raise ClusterGarbage(f"the cluster's answer to {what} holds {name} {ip}, which cannot "
                             f"be the gateway's internal address (a {flaw} address)")
    return str(ip)


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _excerpt(text: str) -> str:
    text = " ".join((text or "").split())
    if not text:
        return ""
    return ": " + (text if len(text) <= 160 else text[:157] + "...")


def _conn_reason(exc: BaseException) -> str:
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return m[1].strip() if m else "connection failed"
