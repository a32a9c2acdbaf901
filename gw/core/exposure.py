"""Exposures: the value type, parsing and validation. Pure: no I/O.

An exposure maps a public port of the gateway to a service inside the cluster:
``exposed_port/protocol -> service_ip:service_port``. Its identity is
``(family, protocol, exposed_port)``; ``service_id`` is only a label.

Every value that reaches nftables comes out of this module as a typed value (an int, an
``ipaddress`` object, one of two protocol words), never as a user's string.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from .errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Key = tuple[str, str, int]  # (family, protocol, exposed_port)

PROTOCOLS = ("tcp", "udp")
FAMILIES = ("ipv4", "ipv6")
DEFAULT_SERVICE_RANGES = ("10.30.0.0/16", "fdff::/16")
DEFAULT_RESERVED = ("22/tcp", "50103/udp")
SERVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")

ADD_FIELDS = {"exposed_port", "service_ip", "service_port", "internal_port", "protocol",
              "service_id", "family", "gateway_id"}
DELETE_FIELDS = {"exposed_port", "protocol", "family"}
MAX_BATCH = 1000  # a bound for any caller; over HTTP the 64 KiB body holds about 650


# Slots: a gateway holds an Exposure for each of up to every port of the host, twice per family.
@dataclass(frozen=True, slots=True)
class Exposure:
    exposed_port: int
    protocol: str
    service_ip: IPAddress
    service_port: int
    service_id: str | None = None

    @property
    def family(self) -> str:
        return "ipv4" if self.service_ip.version == 4 else "ipv6"

    @property
    def key(self) -> Key:
        return (self.family, self.protocol, self.exposed_port)

    @property
    def target(self) -> tuple[IPAddress, int]:
        return (self.service_ip, self.service_port)

    def to_dict(self) -> dict:
        doc = {"exposed_port": self.exposed_port, "protocol": self.protocol,
               "service_ip": str(self.service_ip), "service_port": self.service_port,
               "family": self.family}
        if self.service_id is not None:
            doc["service_id"] = self.service_id
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping) -> "Exposure":
        """Rebuild from a stored or kernel-read document (already validated once)."""
        return cls(int(doc["exposed_port"]), doc["protocol"],
                   parse_ip_text(doc["service_ip"]), int(doc["service_port"]),
                   doc.get("service_id"))

    @property
    def target_text(self) -> str:
        ip = f"[{self.service_ip}]" if self.family == "ipv6" else str(self.service_ip)
        return f"{ip}:{self.service_port}"

    def __str__(self) -> str:
        return f"{self.exposed_port}/{self.protocol} -> {self.target_text}"


def parse_ip_text(text: str) -> IPAddress:
    """An address from a text that was validated once (stored, or listed by the kernel):
    the C parser, several times quicker than ipaddress's own, for the loads of a whole table.
    Never for a client's input: that goes through `parse_service_ip`."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    except OSError:
        raise ValueError(f"not an IP address: {text!r}") from None


def key_of(doc: Mapping) -> Key:
    return (doc["family"], doc["protocol"], int(doc["exposed_port"]))


@dataclass(frozen=True)
class Policy:
    """What may be exposed: service ranges, reserved ``(port, proto)`` pairs, the gateway's
    own addresses (never a target: that would open its local services to the public side),
    and a callable that reports the ports local processes listen on (an I/O adapter)."""

    service_ranges: tuple[IPNetwork, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(r) for r in DEFAULT_SERVICE_RANGES))
    reserved: frozenset[tuple[int, str]] = frozenset({(22, "tcp"), (50103, "udp"), (11022, "tcp")})
    listening: Callable[[], Iterable[tuple[int, str]]] = lambda: ()
    own_addresses: frozenset[IPAddress] = frozenset()
    # The id the gateway serves under (the cluster's add payload names it); None: no id yet.
    gateway_id: str | None = None


# -- field parsers --------------------------------------------------------------------------

def parse_port(value: Any, name: str) -> int:
    # bool is an int subclass; floats and numeric strings are not ports either.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer from 1 to 65535, not {_kind(value)}",
                           field=name)
    if not 1 <= value <= 65535:
        raise InvalidInput(f"{name} must be from 1 to 65535, not {value}", field=name)
    return value


def parse_protocol(value: Any, name: str = "protocol") -> str:
    if not isinstance(value, str) or value.lower() not in PROTOCOLS:
        raise InvalidInput(f"{name} must be \"tcp\" or \"udp\", not {_show(value)}", field=name)
    return value.lower()


def parse_family(value: Any, name: str = "family") -> str:
    if not isinstance(value, str) or value.lower() not in FAMILIES:
        raise InvalidInput(f"{name} must be \"ipv4\" or \"ipv6\", not {_show(value)}", field=name)
    return value.lower()


def address_flaw(ip: IPAddress) -> str | None:
    """Pure: why `ip` can be neither a service's nor the gateway's internal address
    ("loopback", "link-local", "multicast", "unspecified"); None when it can be."""
    for flaw, bad in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                      ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified)):
        if bad:
            return flaw
    return None


def parse_service_ip(value: Any, policy: Policy, name: str = "service_ip") -> IPAddress:
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be an IPv4 or IPv6 address string, not {_kind(value)}",
                           field=name)
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidInput(f"{name} is not an IP address: {_show(value)}", field=name) from None
    if ip.version == 6 and (ip.ipv4_mapped is not None or ip.scope_id):
        raise InvalidInput(f"{name} {ip} is an IPv4-mapped or scoped IPv6 address; "
                           "use the plain address", field=name)
    if flaw := address_flaw(ip):
        raise InvalidInput(f"{name} {ip} is a {flaw} address", field=name)
    if not any(ip in net for net in policy.service_ranges if net.version == ip.version):
        ranges = ", ".join(str(n) for n in policy.service_ranges)
        raise InvalidInput(f"{name} {ip} is outside the service ranges ({ranges})", field=name)
    if ip in policy.own_addresses:
        raise InvalidInput(f"{name} {ip} is the gateway's own internal address", field=name)
    return ip


def parse_service_id(value: Any, name: str = "service_id") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not SERVICE_ID_RE.fullmatch(value):
        raise InvalidInput(f"{name} must be 1-128 characters of letters, digits and ._:@/- "
                           f"starting with a letter or digit, not {_show(value)}", field=name)
    return value


def check_not_reserved(port: int, protocol: str, policy: Policy, name: str = "exposed_port"):
    if (port, protocol) in policy.reserved:
        raise InvalidInput(f"{name} {port}/{protocol} is reserved and cannot be exposed",
                           field=name)
    if (port, protocol) in set(policy.listening()):
        raise InvalidInput(f"{name} {port}/{protocol} is in use by a process on the gateway",
                           field=name)


def check_gateway_id(value: Any, policy: Policy, name: str = "gateway_id") -> None:
    """A request addressed to another gateway (a cluster's routing mistake) changes nothing."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, not {_kind(value)}", field=name)
    if policy.gateway_id is None:
        raise InvalidInput(f"{name} {_show(value)} cannot be checked: this gateway has no id "
                           "(standalone without oakestra.gateway_id); leave the field out",
                           field=name)
    if value != policy.gateway_id:
        raise InvalidInput(f"{name} {_show(value)} is not this gateway's id "
                           f"({policy.gateway_id})", field=name)


def port_conflicts(exposures: Iterable["Exposure"], policy: Policy) -> list[tuple["Exposure", str]]:
    """Pure (given `policy.listening`, read once): the exposures an add would refuse today for
    their port (reserved, or a local process listens on it), with the reason. A stored
    exposure can come to shadow a local service that started, or a port reserved, after it
    was added."""
    listening = frozenset(policy.listening())
    now = replace(policy, listening=lambda: listening)
    found = []
    for e in exposures:
        try:
            check_not_reserved(e.exposed_port, e.protocol, now)
        except InvalidInput as exc:
            found.append((e, exc.message))
    return found


# -- documents ------------------------------------------------------------------------------

def parse_exposure(doc: Any, policy: Policy, where: str = "") -> Exposure:
    """Validate one add request: ``{"exposed_port", "service_ip", "service_port"|"internal_port",
    "protocol"?, "service_id"?, "family"?}``. ``where`` prefixes field names (``exposures[3].``)."""
    if not isinstance(doc, Mapping):
        raise InvalidInput(f"an exposure must be a JSON object, not {_kind(doc)}",
                           field=where.rstrip(".") or None)
    _reject_unknown(doc, ADD_FIELDS, where)
    for required in ("exposed_port", "service_ip"):
        if required not in doc:
            raise InvalidInput(f"{where}{required} is required", field=where + required)
    if "service_port" not in doc and "internal_port" not in doc:
        raise InvalidInput(f"{where}service_port is required (internal_port is accepted too)",
                           field=where + "service_port")
    exposed = parse_port(doc["exposed_port"], where + "exposed_port")
    protocol = parse_protocol(doc.get("protocol", "tcp"), where + "protocol")
    ip = parse_service_ip(doc["service_ip"], policy, where + "service_ip")
    port = _service_port(doc, where)
    service_id = parse_service_id(doc.get("service_id"), where + "service_id")
    if "gateway_id" in doc:
        check_gateway_id(doc["gateway_id"], policy, where + "gateway_id")
    exposure = Exposure(exposed, protocol, ip, port, service_id)
    if "family" in doc and parse_family(doc["family"], where + "family") != exposure.family:
        raise InvalidInput(f"{where}family {doc['family']} does not match service_ip {ip}",
                           field=where + "family")
    check_not_reserved(exposed, protocol, policy, where + "exposed_port")
    return exposure


def parse_exposures(doc: Any, policy: Policy) -> list[Exposure]:
    """A single exposure or ``{"exposures": [...]}``; a batch may not name one key twice."""
    if isinstance(doc, Mapping) and "exposures" in doc:
        _reject_unknown(doc, {"exposures"}, "")
        items = doc["exposures"]
        if not isinstance(items, list) or not items:
            raise InvalidInput("exposures must be a non-empty list", field="exposures")
        if len(items) > MAX_BATCH:
            raise InvalidInput(f"exposures holds more than {MAX_BATCH} items; split the batch",
                               field="exposures")
        exposures = [parse_exposure(item, policy, f"exposures[{i}].")
                     for i, item in enumerate(items)]
        seen: dict[Key, int] = {}
        for i, e in enumerate(exposures):
            if e.key in seen:
                raise InvalidInput(f"exposures[{i}] repeats {e.family} {e.exposed_port}/"
                                   f"{e.protocol} of exposures[{seen[e.key]}]",
                                   field=f"exposures[{i}].exposed_port")
            seen[e.key] = i
        return exposures
    return [parse_exposure(doc, policy)]


@dataclass(frozen=True)
class DeleteRequest:
    exposed_port: int
    protocol: str
    family: str | None  # None: both families

    def matches(self, key: Key) -> bool:
        family, protocol, port = key
        return (port == self.exposed_port and protocol == self.protocol
                and self.family in (None, family))

    def keys(self) -> list[Key]:
        families = (self.family,) if self.family else FAMILIES
        return [(f, self.protocol, self.exposed_port) for f in families]


def parse_delete(doc: Any) -> DeleteRequest:
    if not isinstance(doc, Mapping):
        raise InvalidInput(f"the body must be a JSON object, not {_kind(doc)}")
    _reject_unknown(doc, DELETE_FIELDS, "")
    if "exposed_port" not in doc:
        raise InvalidInput("exposed_port is required", field="exposed_port")
    family = doc.get("family")
    return DeleteRequest(parse_port(doc["exposed_port"], "exposed_port"),
                         parse_protocol(doc.get("protocol", "tcp")),
                         None if family is None else parse_family(family))


# -- Oakestra's port notation ------------------------------------------------------------------

PORT_SPEC_RE = re.compile(r"(?P<host>\d{1,5})(?::(?P<container>\d{1,5}))?(?:/(?P<proto>[A-Za-z]+))?")


def split_port_notation(spec: Any, service_ip: Any,
                        service_id: str | None = None) -> list[dict]:
    """Oakestra's ``"8080:80/tcp;5353:53/udp"`` (``host[:container][/proto]``, tcp by default)
    split into add-request documents for one service IP. Syntax only: values are checked by
    `parse_exposures` (the CLI sends these documents to the daemon, which does)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInput("ports must be a string like \"8080:80/tcp;5353:53/udp\"",
                           field="ports")
    docs = []
    for i, part in enumerate(p.strip() for p in spec.split(";")):
        if not part:
            continue
        m = PORT_SPEC_RE.fullmatch(part)
        if not m:
            raise InvalidInput(f"ports entry {i + 1} {_show(part)} is not host[:container][/proto]",
                               field="ports")
        host = int(m["host"])
        docs.append({"exposed_port": host, "service_port": int(m["container"] or host),
                     "protocol": (m["proto"] or "tcp").lower(), "service_ip": service_ip,
                     **({"service_id": service_id} if service_id is not None else {})})
    if not docs:
        raise InvalidInput("ports names no port", field="ports")
    return docs


def parse_port_notation(spec: Any, service_ip: Any, policy: Policy,
                        service_id: str | None = None) -> list[Exposure]:
    """The exposures that Oakestra's port notation names, validated."""
    return parse_exposures({"exposures": split_port_notation(spec, service_ip, service_id)},
                           policy)


def parse_reserved(entry: Any, name: str = "reserved_ports") -> tuple[int, str]:
    """A ``port/proto`` reservation from the config (``"22/tcp"``; proto defaults to tcp)."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return parse_port(entry, name), "tcp"
    if not isinstance(entry, str):
        raise InvalidInput(f"{name} entries are \"port/proto\" strings, not {_kind(entry)}",
                           field=name)
    port, _, proto = entry.strip().partition("/")
    if not port.isdigit():
        raise InvalidInput(f"{name} entry {_show(entry)} is not port/proto", field=name)
    return parse_port(int(port), name), parse_protocol(proto or "tcp", name)


# -- helpers --------------------------------------------------------------------------------

def _service_port(doc: Mapping, where: str) -> int:
    ports = {name: parse_port(doc[name], where + name)
             for name in ("service_port", "internal_port") if name in doc}
    if len(set(ports.values())) > 1:
        raise InvalidInput(f"{where}service_port {ports['service_port']} and internal_port "
                           f"{ports['internal_port']} disagree; give one",
                           field=where + "internal_port")
    return next(iter(ports.values()))


def _reject_unknown(doc: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise InvalidInput(f"unknown field {where}{unknown[0]} (allowed: "
                           f"{', '.join(sorted(allowed))})", field=where + unknown[0])


def _kind(value: Any) -> str:
    names = {bool: "a boolean", float: "a number with a fraction", str: "a string",
             list: "a list", dict: "an object", type(None): "null", int: "an integer"}
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
