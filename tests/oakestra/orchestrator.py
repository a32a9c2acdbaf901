"""A stand-in for the Oakestra cluster orchestrator's side of the gateway contract (DESIGN.md,
"Oakestra cluster contract"), as a small Flask app served by a real HTTP server.

It checks that the gateway's requests carry exactly the contract's payloads (400 otherwise),
hands out ids and internal addresses, records every call, and can be told to misbehave per
step: answer an HTTP error, or garbage, for the next N calls or for ever.
"""

from __future__ import annotations

import ipaddress
import logging
import itertools
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

logging.getLogger("werkzeug").setLevel(logging.WARNING)

REGISTER_KEYS = {"gateway_id", "gateway_ipv4", "gateway_ipv6"}
READY_KEYS = {"oakestra_gateway_ipv4", "oakestra_gateway_ipv6", "api_port", "api_token"}

# Canned misbehaviours: (status, body, content type).
GARBAGE = {
    "not-json": (200, "<html>gateway registered!</html>", "text/html"),
    "empty": (200, "", "application/json"),
    "list": (200, '["gw-1"]', "application/json"),
    "no-id": (200, '{"id": "gw-1"}', "application/json"),
    "bad-id": (200, '{"gateway_id": "../../etc"}', "application/json"),
    "null-id": (200, '{"gateway_id": null}', "application/json"),
    "bad-ipv4": (200, '{"oakestra_gateway_ipv4": "10.30.300.1", '
                      '"oakestra_gateway_ipv6": "fdff:ffff::1"}', "application/json"),
    "swapped": (200, '{"oakestra_gateway_ipv4": "fdff:ffff::1", '
                     '"oakestra_gateway_ipv6": "10.30.255.1"}', "application/json"),
    "loopback": (200, '{"oakestra_gateway_ipv4": "127.0.0.1", '
                      '"oakestra_gateway_ipv6": "fdff:ffff::1"}', "application/json"),
    "error-500": (500, '{"error": "database down"}', "application/json"),
    "error-503": (503, "maintenance", "text/plain"),
    "error-404": (404, '{"error": "no such gateway"}', "application/json"),
    "error-403": (403, '{"error": "this node may not be a gateway"}', "application/json"),
}


@dataclass
class ClusterState:
    internal_ipv4: str = "10.30.255.1"
    internal_ipv6: str = "fdff:ffff::1"
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    # (step, the caller's address) of every call: which node of a pair spoke.
    callers: list[tuple[str, str]] = field(default_factory=list)
    gateways: dict[str, dict] = field(default_factory=dict)   # id -> register payload
    ready: list[tuple[str, dict]] = field(default_factory=list)
    # step ("register", "ip", "ready") -> [canned name, how many times (None: always)]
    faults: dict[str, list] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready_event: threading.Event = field(default_factory=threading.Event)
    # Like Oakestra's real root service manager: every GET .../ip hands out a new address.
    churn: bool = False
    ip_calls: int = 0
    # A cluster that lost its registrations: every register gets a new id (and then new
    # internal addresses from GET .../ip), whatever id the gateway asks for.
    reissue_ids: bool = False

    def fail(self, step: str, canned: str, times: int | None = None) -> None:
        assert canned in GARBAGE, canned
        self.faults[step] = [canned, times]

    def _fault(self, step: str) -> Response | None:
        with self.lock:
            fault = self.faults.get(step)
            if not fault:
                return None
            canned, times = fault
            if times is not None:
                fault[1] -= 1
                if fault[1] <= 0:
                    del self.faults[step]
        status, body, ctype = GARBAGE[canned]
        return Response(body, status=status, content_type=ctype)

    def steps(self) -> list[str]:
        return [f"{method} {path}" for method, path, _ in self.calls]


def _bad(message: str):
    return jsonify({"error": message}), 400


def create_app(state: ClusterState) -> Flask:
    app = Flask("stand-in-orchestrator")

    @app.before_request
    def caller():
        state.callers.append((f"{request.method} {request.path}", request.remote_addr))

    def body(keys: set[str]) -> dict | tuple:
        doc = request.get_json(silent=True)
        if not isinstance(doc, dict) or set(doc) != keys:
            return _bad(f"expected exactly {sorted(keys)}, got {doc!r}")
        return doc

    @app.post("/api/gateway/register")
    def register():
        doc = body(REGISTER_KEYS)
        state.calls.append(("POST", "/api/gateway/register", doc))
        if isinstance(doc, tuple):
            return doc
        if not all(isinstance(doc[k], str) for k in REGISTER_KEYS):
            return _bad("all fields are strings")
        try:
            if doc["gateway_ipv4"]:
                assert ipaddress.ip_address(doc["gateway_ipv4"]).version == 4
            if doc["gateway_ipv6"]:
                assert ipaddress.ip_address(doc["gateway_ipv6"]).version == 6
        except (ValueError, AssertionError):
            return _bad("gateway_ipv4/gateway_ipv6 must be public addresses")
        if (fault := state._fault("register")) is not None:
            return fault
        gid = (doc["gateway_id"] if not state.reissue_ids else "") or f"gw-{next(state._ids)}"
        with state.lock:
            state.gateways[gid] = doc
        return jsonify({"gateway_id": gid})

    @app.get("/api/gateway/<gid>/ip")
    def ip(gid):
        state.calls.append(("GET", f"/api/gateway/{gid}/ip", None))
        if (fault := state._fault("ip")) is not None:
            return fault
        if gid not in state.gateways:
            return jsonify({"error": "unknown gateway"}), 404
        with state.lock:
            n = state.ip_calls if state.churn else 0
            state.ip_calls += 1
        return jsonify({"oakestra_gateway_ipv4": str(ipaddress.ip_address(state.internal_ipv4) + n),
                        "oakestra_gateway_ipv6": str(ipaddress.ip_address(state.internal_ipv6) + n)})

    @app.post("/api/gateway/<gid>/ready")
    def ready(gid):
        doc = body(READY_KEYS)
        state.calls.append(("POST", f"/api/gateway/{gid}/ready", doc))
        if isinstance(doc, tuple):
            return doc
        if (fault := state._fault("ready")) is not None:
            return fault
        if gid not in state.gateways:
            return jsonify({"error": "unknown gateway"}), 404
        if not isinstance(doc["api_port"], int) or not isinstance(doc["api_token"], str):
            return _bad("api_port is an integer, api_token a string")
        state.ready.append((gid, doc))
        state.ready_event.set()
        return jsonify({"status": "ok"})

    return app


class Orchestrator:
    """The app served by a werkzeug server in a thread. `enter` is a context manager factory
    that puts the creating thread into a network namespace, so the listening socket lives
    there (e.g. on the loopback of the lab's gateway namespace)."""

    def __init__(self, state: ClusterState | None = None, host: str = "127.0.0.1",
                 port: int = 18080, enter: Callable[[], Any] | None = None):
        self.state = state or ClusterState()
        self.host, self.port = host, port
        self.enter = enter or nullcontext
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Orchestrator":
        with self.enter():
            self._server = make_server(self.host, self.port, create_app(self.state),
                                       threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="stand-in-orchestrator")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    @contextmanager
    def running(self):
        self.start()
        try:
            yield self
        finally:
            self.stop()
