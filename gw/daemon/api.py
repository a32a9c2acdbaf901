"""The management API (docs/api.md): a Flask app factory with thin views over
`gw.service.gateway.Gateway`.

Every answer is JSON; every error is ``{"error": <code>, "message": <sentence>, "field"?}``.
A request is checked in this order: route and method (404, 405), bearer token (401), content
type (415), size (413), JSON syntax (400), fields (400), then the gateway decides (201, 200,
404, 409, 503). A request that fails changes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from .. import __version__

from ..core import listing, readiness, ruleset

from . import openapi
from .auth import bearer_matches
from ..core.config import Settings
from ..core.errors import GatewayError, InvalidInput, StoreUnavailable
from ..core.exposure import FAMILIES, PROTOCOLS, Exposure, parse_delete, parse_exposures
from .admission import ChangeGate
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from ..kernel.sockets import Listening
from ..service import trace

log = logging.getLogger(__name__)
audit = logging.getLogger("gw.audit")

MAX_BODY = 64 * 1024
OPEN_ENDPOINTS = {"health", "ready"}
MUTATING_ENDPOINTS = {"add", "delete"}
JSON_TYPE = "application/json"

# Werkzeug's errors as our error codes.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
              405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
              500: "internal_error"}


class ApiError(GatewayError):
    """An error of the HTTP layer itself (auth, media type, JSON syntax)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict | None = None):
        super().__init__(message, field=field)
        self.status = status
        self.code = code
        self.headers = headers or {}


@dataclass
class _State:
    """What a reload (SIGHUP) may change while the app serves."""

    settings: Settings
    token: Any  # str | None | Callable[[], str | None]
    listening: Callable
    # Keys changed in the file since the start that only a restart applies (api.port, ...).
    restart_needed: tuple[str, ...] = ()
    gateway_id: Callable[[], str | None] = lambda: None

    def current_token(self) -> str | None:
        return self.token() if callable(self.token) else self.token

    def policy(self):
        # One procfs read per request, however many exposures it carries.
        ports = frozenset(self.listening())
        return replace(self.settings.policy(gateway_id=self.gateway_id()),
                       listening=lambda: ports)


def create_app(gateway, settings: Settings, *, token=None, metrics: Metrics | None = None,
               ready_checks: Callable[[], dict] | None = None,
               listening: Callable | None = None,
               gateway_id: Callable[[], str | None] | None = None,
               cluster: Callable[[], dict] | None = None,
               egress: Callable[[], dict] | None = None,
               ha_role: Callable[[], dict] | None = None) -> Flask:
    """The WSGI app. `token`: the bearer token (a string, None for none, or a callable giving
    either, read per request). `ready_checks()`: data-path problems by cause (normally
    ``gw.kernel.netlink.readiness_problems(settings)``). `listening()`: the (port, proto) pairs
    local processes listen on (default: procfs, gw.kernel.sockets). `gateway_id()`: the id the
    cluster knows this gateway by (an add naming another is refused). `cluster()`: which
    orchestrator or broker the gateway uses and whether it is connected, shown by /api/ready.
    `egress()`: whether egress is on and on which interfaces (default: from the settings'
    configured public interfaces). `ha_role()`: this gateway's role in its pair (ha.enabled;
    gw.service.ha_role), shown by /api/ready and /api/status; None: not in a pair."""
    app = Flask("gw.daemon.api")
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    app.json.compact = True
    state = _State(settings, token, listening or Listening(),
                   gateway_id=gateway_id or (lambda: None))
    cluster = cluster or (lambda: {})
    metrics = metrics if metrics is not None else Metrics(gateway)
    ready_checks = ready_checks or (lambda: {})
    metrics.bind(gateway, ready=lambda: _ready_reasons(), ha_role=ha_role)
    egress = egress or (lambda: ruleset.egress_status(state.settings))
    app.extensions["oakestra_gw"] = state
    app.extensions["oakestra_gw.metrics"] = metrics
    schema_cache: dict[bool, bytes] = {}
    schema_lock = threading.Lock()
    # Stuck changes leave one worker to the rest (gw.daemon.admission).
    changes = ChangeGate(max(1, settings.api.threads - 1))

    # -- request pipeline -------------------------------------------------------------------

    @app.before_request
    def _start():
        g.started = time.perf_counter()
        trace.begin()
        if request.routing_exception is not None:
            return  # 404 and 405 come first (the routes are public: see the OpenAPI document)
        token_now = state.current_token()
        if token_now and request.endpoint not in OPEN_ENDPOINTS:
            header = request.headers.get("Authorization")
            if not bearer_matches(header, token_now):
                challenge = 'Bearer realm="oakestra-gw"'
                if header:
                    challenge += ', error="invalid_token"'
                raise ApiError(401, "unauthorized", "a valid bearer token is required "
                               "(Authorization: Bearer <token>)" if not header else
                               "the bearer token is not valid",
                               headers={"WWW-Authenticate": challenge})
        if request.endpoint in MUTATING_ENDPOINTS:
            g.change_ticket = changes.enter()
        trace.mark("auth")

    @app.teardown_request
    def _release(exc):
        if (ticket := g.pop("change_ticket", None)) is not None:
            changes.leave(ticket)

    @app.after_request
    def _finish(response: Response):
        trace.mark("view")
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        route = request.url_rule.rule if request.url_rule is not None else None
        metrics.observe_request(route, request.method, response.status_code, seconds)
        if request.endpoint in MUTATING_ENDPOINTS:
            _audit(response)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        trace.end(f"{request.method} {request.path} {response.status_code}")
        return response

    def _audit(response: Response) -> None:
        what = g.get("audit_what") or f"{request.endpoint} (invalid request)"
        result = g.get("audit_result")
        if result is None:
            try:
                body = response.get_json(silent=True) or {}
            except Exception:  # noqa: BLE001
                body = {}
            result = body.get("error", "")
            if body.get("field"):
                result += f" field={body['field']}"
        who, outcome = request.remote_addr or "-", f"{response.status_code} {result}".strip()
        # The fields again as record attributes: log.format = "json" gives them keys of their own.
        audit.info("who=%s what=%s result=%s", who, json.dumps(what), json.dumps(outcome),
                   extra={"who": who, "what": what, "result": outcome})

    # -- errors: one handler for our errors, one for werkzeug's ------------------------------

    @app.errorhandler(GatewayError)
    def _gateway_error(exc: GatewayError):
        if isinstance(exc, StoreUnavailable):
            metrics.store_failures.inc()
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        response = app.json.response(exc.to_dict())
        response.status_code = exc.status
        for name, value in getattr(exc, "headers", {}).items():
            response.headers[name] = value
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = HTTP_CODES.get(status, (exc.name or "error").lower().replace(" ", "_"))
        message = {
            404: f"no such route: {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the body is larger than {MAX_BODY} bytes",
        }.get(status, exc.description or exc.name)
        response = app.json.response({"error": code, "message": message})
        response.status_code = status
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = app.json.response({"error": "internal_error",
                                      "message": "an internal error occurred; see the log"})
        response.status_code = 500
        return response

    # -- views ------------------------------------------------------------------------------

    @app.post("/api/service/exposure/add", endpoint="add")
    def add():
        exposures = parse_exposures(_json_body(), state.policy())
        trace.mark("parse")
        g.audit_what = "add " + _describe(exposures)
        results = gateway.add(exposures)
        created = sum(r.outcome == "created" for r in results)
        g.audit_result = ", ".join(f"{n} {o}" for o, n in _tally(r.outcome for r in results))
        return {"exposures": [r.exposure.to_dict() for r in results],
                "outcomes": [r.outcome for r in results],
                "created": created}, 201 if created else 200

    @app.post("/api/service/exposure/delete", endpoint="delete")
    def delete():
        req = parse_delete(_json_body())
        trace.mark("parse")
        g.audit_what = (f"delete {req.exposed_port}/{req.protocol} "
                        f"{req.family or 'ipv4+ipv6'}")
        deleted = gateway.delete(req)
        g.audit_result = "deleted " + _describe(deleted)
        return {"deleted": [e.to_dict() for e in deleted]}, 200

    @app.get("/api/service/exposure", endpoint="list")
    def list_exposures():
        query = listing.parse_query(request.args)
        page, next_cursor = listing.select(gateway.exposures(), query)
        body: dict = {"exposures": [e.to_dict() for e in page]}
        if query.limit is not None:
            body["next_cursor"] = next_cursor
        return body

    @app.get("/api/status", endpoint="status")
    def status():
        reasons = _ready_reasons()
        counts = gateway.counts()
        return {"version": __version__,
                "mode": "standalone" if state.settings.standalone else "oakestra",
                "ready": not reasons, "reasons": reasons,
                "restart_needed": list(state.restart_needed),
                **({"cluster": joined} if (joined := cluster()) else {}),
                **({"ha": ha_role()} if ha_role is not None else {}),
                "egress": egress(),
                "exposures": {"total": sum(counts.values()),
                              **{f"{family}/{protocol}": counts.get((family, protocol), 0)
                                 for family in FAMILIES for protocol in PROTOCOLS}}}

    @app.get("/api/health", endpoint="health")
    def health():
        return {"status": "ok"}

    def _ready_reasons() -> dict:
        return readiness.reasons(gateway.health.snapshot(), ready_checks)

    @app.get("/api/ready", endpoint="ready")
    def ready():
        reasons = _ready_reasons()
        token_now = state.current_token()
        holder = not token_now or bearer_matches(request.headers.get("Authorization"), token_now)
        if not holder:
            reasons = readiness.public(reasons)  # the details are for the token's holder
        # A pending restart does not make the data path wrong: it is reported, not a 503.
        pending = {"restart_needed": list(state.restart_needed)} if state.restart_needed else {}
        if ha_role is not None:
            # A backup is ready (it forwards once the addresses move to it): the role says
            # which one it is, to anyone (a load balancer's check may want it).
            role = ha_role()
            pending["ha"] = role if holder else {"role": role["role"]}
        if (joined := cluster()):
            # Which orchestrator or broker (its address) is a detail too.
            pending["cluster"] = joined if holder else {
                k: v for k, v in joined.items() if k in ("mode", "connected")}
        if not reasons:
            return {"ready": True, "egress": egress(), **pending}
        return {"ready": False, "error": "not_ready", "egress": egress(),
                "message": "not ready: " + "; ".join(f"{k}: {v}" for k, v in
                                                     sorted(reasons.items())),
                "reasons": reasons, **pending}, 503

    @app.get("/metrics", endpoint="metrics")
    def metrics_view():
        return Response(metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/api/openapi.json", endpoint="openapi")
    def openapi_view():
        auth = bool(state.current_token())
        with schema_lock:
            if auth not in schema_cache:
                schema_cache[auth] = json.dumps(openapi.document(auth=auth), indent=1).encode()
            body = schema_cache[auth]
        return Response(body, content_type=JSON_TYPE)

    return app


def reconfigure(app: Flask, settings: Settings | None = None, *, token=...,
                restart_needed: Iterable[str] | None = None) -> None:
    """Apply a reloaded configuration to a serving app (policy, token, what waits for a
    restart)."""
    state: _State = app.extensions["oakestra_gw"]
    if settings is not None:
        state.settings = settings
    if restart_needed is not None:
        state.restart_needed = tuple(restart_needed)
    if token is not ...:
        state.token = token


def metrics_of(app: Flask) -> Metrics:
    return app.extensions["oakestra_gw.metrics"]


# -- helpers --------------------------------------------------------------------------------

def _json_body() -> Any:
    if request.mimetype != JSON_TYPE:
        shown = request.mimetype or "none"
        raise ApiError(415, "unsupported_media_type", f"the body must be JSON sent with "
                       f"Content-Type: application/json, not {shown}")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_media_type", f"the body must be UTF-8, not {charset}")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except InvalidInput:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno} column {exc.colno})" if isinstance(
            exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else (
            "not UTF-8" if isinstance(exc, UnicodeDecodeError) else
            "nested too deeply" if isinstance(exc, RecursionError) else str(exc))
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {reason}{where}") \
            from None


def _no_duplicates(pairs):
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise InvalidInput(f"field {key} appears twice", field=key)
        doc[key] = value
    return doc


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _describe(exposures: list[Exposure]) -> str:
    shown = ", ".join(str(e) for e in exposures[:3])
    return shown + (f" (+{len(exposures) - 3} more)" if len(exposures) > 3 else "")


def _tally(outcomes):
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return counts.items()
