"""Oakestra's MQTT gateway topics (docs/oakestra.md, "MQTT mode"): topic
names, the messages parsed into typed values, and the answers. Pure: no I/O.

The cluster publishes (JSON, QoS 1) to ``nodes/<gateway_id>/net/gateway/``:

- ``deploy``   ``{"gateway_id", "job_name", "instance_ip", "instance_ip_v6", "gateway_ipv4",
  "gateway_ipv6"}``: instance_ip* are the gateway's internal addresses, gateway_ip* its public
  ones. The gateway answers on ``deployed`` ``{"namespace_ip", "namespace_ip_v6"}``.
- ``expose``   ``{"gateway_id", "service_id", "exposed_port", "internal_port", "service_ip"}``:
  one message per service address, TCP only.
- ``unexpose`` ``{"gateway_id", "service_id", "exposed_port"?}``: our extension (upstream has
  no delete): every exposure of the service, or only that port's.

Every message gets an answer on ``<its topic>/result`` (ours, for operators):
``{"request", "ok", "outcome" | "error", "message", "field"?, ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from ..core.config import Settings
from ..core.errors import ConfigError, GatewayError, InvalidInput
from ..core.exposure import (Exposure, Policy, check_gateway_id, parse_exposure, parse_port,
                       parse_service_id)

KINDS = ("deploy", "expose", "unexpose")
MAX_PAYLOAD = 64 * 1024  # as the HTTP API's body limit

DEPLOY_FIELDS = {"gateway_id", "job_name", "instance_ip", "instance_ip_v6", "gateway_ipv4",
                 "gateway_ipv6"}
EXPOSE_FIELDS = {"gateway_id", "service_id", "exposed_port", "internal_port", "service_ip"}
UNEXPOSE_FIELDS = {"gateway_id", "service_id", "exposed_port"}


def prefix(node_id: str) -> str:
    return f"nodes/{node_id}/net/gateway"


def topic(node_id: str, name: str) -> str:
    """`name`: deploy, expose, unexpose (theirs), deployed, <kind>/result (ours)."""
    return f"{prefix(node_id)}/{name}"


def kind_of(node_id: str, name: str) -> str | None:
    """The kind of an incoming message by its topic; None for a topic we do not handle."""
    head, _, kind = name.rpartition("/")
    return kind if head == prefix(node_id) and kind in KINDS else None


@dataclass(frozen=True)
class Deploy:
    ipv4: str
    ipv6: str
    job_name: str | None


@dataclass(frozen=True)
class Unexpose:
    service_id: str
    exposed_port: int | None


def parse_json(payload: bytes) -> Mapping:
    if len(payload) > MAX_PAYLOAD:
        raise InvalidInput(f"the message is larger than {MAX_PAYLOAD} bytes")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else (
            "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply")
        raise InvalidInput(f"the message is not valid JSON: {reason}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the message must be a JSON object")
    return doc


def _fields(doc: Mapping, allowed: set[str], required: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]} (allowed: {', '.join(sorted(allowed))})",
                           field=unknown[0])
    for name in required:
        if name not in doc:
            raise InvalidInput(f"{name} is required", field=name)


def parse_deploy(doc: Mapping, settings: Settings) -> Deploy:
    """The internal addresses the deploy message hands out, checked as the config checks
    network.internal_ipv4/6 (and never one of the gateway's public addresses)."""
    _fields(doc, DEPLOY_FIELDS, ("gateway_id", "instance_ip", "instance_ip_v6"))
    check_gateway_id(doc["gateway_id"], Policy(gateway_id=settings.oakestra.node_id))
    for name in ("instance_ip", "instance_ip_v6", "job_name", "gateway_ipv4", "gateway_ipv6"):
        if name in doc and not isinstance(doc[name], str):
            raise InvalidInput(f"{name} must be a string", field=name)
    try:
        live = settings.with_internal_ips(doc["instance_ip"], doc["instance_ip_v6"])
    except ConfigError as exc:
        name = "instance_ip" if exc.field == "network.internal_ipv4" else "instance_ip_v6"
        raise InvalidInput(exc.message.replace(exc.field or "", name, 1), field=name) from None
    ipv4, ipv6 = str(live.network.internal_ipv4), str(live.network.internal_ipv6)
    for name, public in (("instance_ip", doc.get("gateway_ipv4")),
                         ("instance_ip_v6", doc.get("gateway_ipv6"))):
        if public and public == doc[name]:
            raise InvalidInput(f"{name} {public} is also the gateway's public address",
                               field=name)
    return Deploy(ipv4, ipv6, doc.get("job_name"))


def parse_expose(doc: Mapping, policy: Policy) -> Exposure:
    """One exposure, validated exactly as an HTTP add of the same exposure (TCP)."""
    _fields(doc, EXPOSE_FIELDS, ("gateway_id", "exposed_port", "internal_port", "service_ip"))
    return parse_exposure({**doc, "protocol": "tcp"}, policy)


def parse_unexpose(doc: Mapping, policy: Policy) -> Unexpose:
    _fields(doc, UNEXPOSE_FIELDS, ("gateway_id", "service_id"))
    check_gateway_id(doc["gateway_id"], policy)
    service_id = parse_service_id(doc["service_id"])
    port = parse_port(doc["exposed_port"], "exposed_port") if "exposed_port" in doc else None
    return Unexpose(service_id, port)


def deployed(ipv4: str, ipv6: str) -> dict:
    return {"namespace_ip": ipv4, "namespace_ip_v6": ipv6}


def success(kind: str, outcome: str, **detail: Any) -> dict:
    return {"request": kind, "ok": True, "outcome": outcome, **detail}


def failure(kind: str, exc: GatewayError, doc: Any = None) -> dict:
    answer = {"request": kind, "ok": False, **exc.to_dict()}
    if isinstance(doc, Mapping):
        # What the message was about, so a reader of the result topic can match it.
        for name in ("service_id", "exposed_port", "service_ip", "job_name"):
            if name in doc and isinstance(doc[name], (str, int)):
                answer.setdefault("about", {})[name] = doc[name]
    return answer


def result_label(exc: GatewayError) -> str:
    """The fixed metric label of a failed message: invalid (4xx but 409), conflict, failed."""
    if exc.status == 409:
        return "conflict"
    return "invalid" if exc.status < 500 else "failed"
