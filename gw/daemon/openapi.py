"""The OpenAPI 3 document of the management API, served at /api/openapi.json.

Written by hand next to gw/daemon/api.py and checked against the running server by schemathesis
(tests/api/test_schemathesis.py): every route, body, status code and error shape here is what
the server does. A schema is never looser than the server: what the schema rejects, the server
rejects too (the server checks more: service ranges, reserved ports, identity rules).
"""

from __future__ import annotations

import copy

from ..core.exposure import SERVICE_ID_RE
from ..core.ha_events import ROLES

VERSION = "1.0.0"

PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
# Protocol and family words are accepted in any letter case.
PROTOCOL = {"type": "string", "pattern": "^([Tt][Cc][Pp]|[Uu][Dd][Pp])$", "default": "tcp",
            "description": "`tcp` (the default) or `udp`, any letter case", "example": "tcp"}
FAMILY = {"type": "string", "pattern": "^[Ii][Pp][Vv][46]$",
          "description": "`ipv4` or `ipv6`, any letter case", "example": "ipv4"}
SERVICE_ID = {"type": "string", "pattern": f"^{SERVICE_ID_RE.pattern}$", "nullable": True,
              "description": "A label (e.g. Oakestra's service id); not part of the identity",
              "example": "web-1"}

EXPOSURE_IN = {
    "type": "object",
    "description": "One exposure to add. `service_ip` must lie in the configured service "
                   "ranges (default 10.30.0.0/16 and fdff::/16) and be a plain unicast address; "
                   "`exposed_port`/`protocol` must not be reserved (22/tcp, 50103/udp, the API "
                   "port, the configured `reserved_ports`) nor a port a process of the gateway "
                   "host listens on. `internal_port` is Oakestra's name for `service_port`: give "
                   "either (both only if equal). `family`, when given, must match `service_ip`.",
    "required": ["exposed_port", "service_ip"],
    "anyOf": [{"required": ["service_port"]}, {"required": ["internal_port"]}],
    "additionalProperties": False,
    "properties": {
        "exposed_port": {**PORT, "description": "The public port on the gateway",
                         "example": 8080},
        "service_ip": {"type": "string",
                       "description": "The service IP (IPv4 or IPv6; `[...]` brackets allowed)",
                       "example": "10.30.0.1"},
        "service_port": {**PORT, "description": "The service's port", "example": 80},
        "internal_port": {**PORT, "description": "Alias of `service_port` (Oakestra's name)"},
        "protocol": PROTOCOL,
        "service_id": SERVICE_ID,
        "family": FAMILY,
        "gateway_id": {"type": "string", "description": "The cluster's add payload names the "
                       "gateway it is meant for: accepted when it is this gateway's id, "
                       "else 400 with `field: gateway_id`"},
    },
    "example": {"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80,
                "protocol": "tcp", "service_id": "web"},
}

BATCH_IN = {
    "type": "object",
    "description": "Several exposures, added all or none. One key (family, protocol, "
                   "exposed_port) may appear only once. At most 1000 items; the body limit "
                   "(64 KiB) bounds a batch to about 650 exposures.",
    "required": ["exposures"],
    "additionalProperties": False,
    "properties": {"exposures": {"type": "array", "minItems": 1,
                                 "items": {"$ref": "#/components/schemas/ExposureIn"}}},
    "example": {"exposures": [
        {"exposed_port": 8080, "service_ip": "10.30.0.1", "service_port": 80},
        {"exposed_port": 5353, "service_ip": "10.30.0.1", "service_port": 53,
         "protocol": "udp"}]},
}

EXPOSURE = {
    "type": "object",
    "description": "An exposure as stored. Its identity is (family, protocol, exposed_port).",
    "required": ["exposed_port", "protocol", "service_ip", "service_port", "family"],
    "additionalProperties": False,
    "properties": {
        "exposed_port": PORT,
        "protocol": {"type": "string", "enum": ["tcp", "udp"]},
        "service_ip": {"type": "string"},
        "service_port": PORT,
        "family": {"type": "string", "enum": ["ipv4", "ipv6"]},
        "service_id": {"type": "string"},
    },
}

DELETE_IN = {
    "type": "object",
    "description": "Which exposure to delete. Without `family` (or with `null`) both the IPv4 "
                   "and the IPv6 exposure of the port go.",
    "required": ["exposed_port"],
    "additionalProperties": False,
    "properties": {"exposed_port": PORT, "protocol": PROTOCOL,
                   "family": {**FAMILY, "nullable": True}},
    "example": {"exposed_port": 8080, "protocol": "tcp", "family": "ipv4"},
}

ERROR = {
    "type": "object",
    "description": "Every error. `error` is a stable code, `message` a sentence for people, "
                   "`field` the offending input (e.g. `exposed_port`, `exposures[2].service_ip`) "
                   "when one is to blame.",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "enum": [
            "invalid", "invalid_json", "conflict", "not_found", "unauthorized",
            "method_not_allowed", "too_large", "unsupported_media_type", "unavailable",
            "kernel_refused", "store_unavailable", "busy", "internal_error"]},
        "message": {"type": "string"},
        "field": {"type": "string"},
    },
}

ADD_OUT = {
    "type": "object",
    "description": "The exposures in request order as stored now, what happened to each "
                   "(`created`; `unchanged`: an identical one existed; `relabelled`: it existed "
                   "with the same target and its `service_id` was updated), and how many were "
                   "created.",
    "required": ["exposures", "outcomes", "created"],
    "additionalProperties": False,
    "properties": {
        "exposures": {"type": "array", "items": {"$ref": "#/components/schemas/Exposure"}},
        "outcomes": {"type": "array", "items": {"type": "string",
                                                "enum": ["created", "unchanged", "relabelled"]}},
        "created": {"type": "integer", "minimum": 0},
    },
}

DELETE_OUT = {
    "type": "object", "required": ["deleted"], "additionalProperties": False,
    "properties": {"deleted": {"type": "array", "minItems": 1,
                               "items": {"$ref": "#/components/schemas/Exposure"}}},
}

LIST_OUT = {
    "type": "object", "required": ["exposures"], "additionalProperties": False,
    "properties": {"exposures": {"type": "array",
                                 "items": {"$ref": "#/components/schemas/Exposure"}},
                   "next_cursor": {"type": "string", "nullable": True,
                                   "description": "With `limit`: pass it as `cursor` for the "
                                                  "next page; `null` on the last page"}},
}

LIST_PARAMETERS = [
    {"name": "family", "in": "query", "required": False, "schema": FAMILY,
     "description": "Only this family"},
    {"name": "protocol", "in": "query", "required": False,
     "schema": {k: v for k, v in PROTOCOL.items() if k != "default"},
     "description": "Only this protocol"},
    {"name": "service_id", "in": "query", "required": False,
     "schema": {"type": "string", "minLength": 1}, "description": "Only this label"},
    {"name": "port", "in": "query", "required": False,
     "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,4}(-[1-9][0-9]{0,4})?$",
                "example": "8000-8999"},
     "description": "An exposed port or a range LOW-HIGH (within 1-65535)"},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
     "description": "At most this many per page; the answer then carries `next_cursor`. "
                    "Without it, everything that matches"},
    {"name": "cursor", "in": "query", "required": False,
     "schema": {"type": "string", "pattern": "^ipv[46]/(tcp|udp)/[0-9]{1,5}$"},
     "description": "`next_cursor` of the previous page: this page starts after it"},
]

RESTART_NEEDED = {"type": "array", "items": {"type": "string"},
                  "description": "Configuration keys changed in the file since the start that "
                                 "only a restart applies (e.g. `api.port`)"}

CLUSTER = {"type": "object", "description": "Oakestra mode: the orchestrator (`http`) or broker "
           "(`mqtt`) in use, out of the configured list, and whether the broker is connected",
           "properties": {"mode": {"type": "string", "enum": ["http", "mqtt"]},
                          "active": {"type": "string"},
                          "configured": {"type": "array", "items": {"type": "string"}},
                          "connected": {"type": "boolean"}}}
HA_ROLE = {"type": "object", "required": ["role"],
           "description": "With `ha.enabled`: this gateway's role in its pair, as keepalived's "
                          "notify last wrote it (`unknown` before it said anything). Without the "
                          "token, `role` only",
           "properties": {"role": {"type": "string", "enum": list(ROLES)},
                          "since": {"type": ["number", "null"],
                                    "description": "Unix time of the change"},
                          "failed": {"type": "string", "description": "What failed in "
                                     "this role's steps (conntrackd's, the promotion hold), "
                                     "if anything"},
                          "problem": {"type": "string", "description": "Why the role file "
                                      "could not be read"}}}
EGRESS = {"type": "object", "required": ["enabled", "interfaces"], "additionalProperties": False,
          "description": "Whether services reach the Internet through the gateway (masqueraded "
                         "to the public address), and out of which interfaces",
          "properties": {"enabled": {"type": "boolean"},
                         "interfaces": {"type": "array", "items": {"type": "string"}}}}

STATUS_OUT = {
    "type": "object",
    "required": ["version", "mode", "ready", "reasons", "restart_needed", "egress", "exposures"],
    "additionalProperties": False,
    "properties": {
        "version": {"type": "string"},
        "mode": {"type": "string", "enum": ["standalone", "oakestra"]},
        "ready": {"type": "boolean"},
        "reasons": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "Why not ready, by cause (as `/api/ready`); empty when ready"},
        "restart_needed": RESTART_NEEDED,
        "cluster": CLUSTER,
        "ha": HA_ROLE,
        "egress": EGRESS,
        "exposures": {"type": "object", "required": ["total"],
                      "additionalProperties": {"type": "integer", "minimum": 0},
                      "description": "`total`, and one count per `family/protocol`"},
    },
}

HEALTH_OUT = {"type": "object", "required": ["status"], "additionalProperties": False,
              "properties": {"status": {"type": "string", "enum": ["ok"]}}}

READY_OUT = {"type": "object", "required": ["ready", "egress"], "additionalProperties": False,
             "properties": {"ready": {"type": "boolean", "enum": [True]}, "egress": EGRESS,
                            "restart_needed": RESTART_NEEDED,
                            "cluster": CLUSTER, "ha": HA_ROLE}}

NOT_READY_OUT = {
    "type": "object",
    "required": ["ready", "error", "message", "reasons", "egress"],
    "additionalProperties": False,
    "properties": {
        "ready": {"type": "boolean", "enum": [False]},
        "error": {"type": "string", "enum": ["not_ready"]},
        "message": {"type": "string"},
        "reasons": {"type": "object", "description": "Why, by cause (e.g. `firewall`, `drift`, "
                    "`store`, `tunnel_route`, `forwarding`)",
                    "additionalProperties": {"type": "string"}},
        "egress": EGRESS,
        "restart_needed": RESTART_NEEDED,
        "cluster": CLUSTER,
        "ha": HA_ROLE,
    },
}


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


AUTH_ERROR = _error("No valid bearer token (only when the gateway has a token). The "
                    "`WWW-Authenticate` header says `Bearer`.")
BODY_ERRORS = {
    "400": _error("Invalid: malformed JSON (`invalid_json`), a missing, unknown, repeated or "
                  "wrong field (`invalid`, with `field`)"),
    "413": {"description": "The body is larger than 64 KiB (`too_large`). Past 128 KiB the "
                           "HTTP server refuses it before reading it, in plain text.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}},
                        "text/plain": {"schema": {"type": "string"}}}},
    "415": _error("The body is not `application/json` in UTF-8 (`unsupported_media_type`)"),
}


def document(auth: bool = True) -> dict:
    """The document; `auth`: whether the server requires a bearer token (then every route but
    health and ready declares it)."""
    secured = [{"bearer": []}] if auth else []

    def op(summary: str, description: str, responses: dict, body: dict | None = None,
           open_route: bool = False, op_id: str = "") -> dict:
        operation = {"operationId": op_id, "summary": summary, "description": description,
                     "responses": dict(responses)}
        if body is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": body}}}
        if open_route:
            operation["security"] = []
        elif auth:
            operation["responses"]["401"] = AUTH_ERROR
        return operation

    paths = {
        "/api/service/exposure/add": {"post": op(
            "Add exposures",
            "Expose `exposed_port/protocol` on the gateway's public addresses and DNAT it to "
            "`service_ip:service_port`. One exposure, or `{\"exposures\": [...]}` added all or "
            "none. Adding what exists is a no-op (200); the same target with another "
            "`service_id` updates the label (200).",
            {"201": _json("At least one exposure was created", "AddResult"),
             "200": _json("Nothing new: identical exposures exist (or only labels changed)",
                          "AddResult"),
             **BODY_ERRORS,
             "409": _error("The port is exposed to another target (`conflict`); delete it "
                           "first. Nothing was changed."),
             "503": _error("The kernel refused the change (`kernel_refused`) or the store "
                           "could not write (`store_unavailable`), or as many changes as may "
                           "wait at once are waiting (`busy`, with `Retry-After`). Nothing was "
                           "changed.")},
            body={"oneOf": [{"$ref": "#/components/schemas/ExposureIn"},
                            {"$ref": "#/components/schemas/ExposureBatch"}]},
            op_id="addExposures")},
        "/api/service/exposure/delete": {"post": op(
            "Delete an exposure",
            "Remove the exposure of `exposed_port/protocol` (of one family, or of both). Its "
            "established flows are cut right after, usually within a second.",
            {"200": _json("Deleted; the exposures that went", "DeleteResult"),
             **BODY_ERRORS,
             "404": _error("No such exposure (`not_found`)"),
             "503": _error("The kernel refused the change or the store could not write, or "
                           "too many changes are waiting (`busy`). Nothing was changed.")},
            body={"$ref": "#/components/schemas/DeleteRequest"}, op_id="deleteExposure")},
        "/api/service/exposure": {"get": {**op(
            "List exposures",
            "The stored exposures, ordered by family, protocol and port, optionally filtered "
            "and in pages: with `limit`, follow `next_cursor` until it is `null`; each "
            "exposure that exists throughout comes exactly once.",
            {"200": _json("The exposures", "ExposureList"),
             "400": _error("A query parameter is invalid or unknown (`invalid`, with `field`)")},
            op_id="listExposures"), "parameters": LIST_PARAMETERS}},
        "/api/status": {"get": op(
            "Status",
            "Version, mode, readiness (as `/api/ready`), configuration keys waiting for a "
            "restart, and the number of exposures by family and protocol: what `oakestra-gw "
            "status` shows, without listing the exposures.",
            {"200": _json("The status", "Status")}, op_id="status")},
        "/api/health": {"get": op(
            "Liveness", "200 while the process serves. Needs no token.",
            {"200": _json("Alive", "Health")}, open_route=True, op_id="health")},
        "/api/ready": {"get": op(
            "Readiness",
            "200 when the last kernel transaction or reconcile succeeded, no drift is "
            "unrepaired, the tunnel route exists and forwarding is on. Needs no token.",
            {"200": _json("Ready", "Ready"),
             "503": _json("Not ready, with the reasons by cause", "NotReady")},
            open_route=True, op_id="ready")},
        "/metrics": {"get": op(
            "Prometheus metrics", "The process's metrics in the Prometheus text format.",
            {"200": {"description": "Metrics",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            op_id="metrics")},
        "/api/openapi.json": {"get": op(
            "This document", "The OpenAPI 3 document of the API.",
            {"200": {"description": "The document",
                     "content": {"application/json": {"schema": {"type": "object"}}}}},
            op_id="openapi")},
    }
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "Oakestra gateway management API", "version": VERSION,
                 "description": "Exposes Oakestra services on the gateway's public addresses. "
                                "Errors are `{\"error\", \"message\", \"field\"?}`. Requests "
                                "are checked in this order: route and method (404, 405), "
                                "token (401), content type (415), size (413), JSON (400), "
                                "fields (400), then the gateway (404, 409, 503)."},
        "paths": paths,
        "components": {"schemas": copy.deepcopy({
            "ExposureIn": EXPOSURE_IN, "ExposureBatch": BATCH_IN, "Exposure": EXPOSURE,
            "DeleteRequest": DELETE_IN, "AddResult": ADD_OUT, "DeleteResult": DELETE_OUT,
            "ExposureList": LIST_OUT, "Health": HEALTH_OUT, "Ready": READY_OUT,
            "NotReady": NOT_READY_OUT, "Status": STATUS_OUT, "Error": ERROR})},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "The token of `api.token_file` (or the one the gateway "
                                      "generated in its state directory in Oakestra mode)"}}
        doc["security"] = secured
    return doc
