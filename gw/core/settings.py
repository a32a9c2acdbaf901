"""The gateway's settings: typed, frozen, with the defaults a configuration file may leave out.
`config.parse_config` builds them from the TOML file (docs/configuration.md lists the keys)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Callable

from . import hosts
from .config_fields import internal_ip
from .errors import ConfigError
from .ha import HaSettings
from .exposure import DEFAULT_RESERVED, DEFAULT_SERVICE_RANGES, IPNetwork, Policy, parse_reserved

DEFAULT_CONFIG_PATH = "/etc/oakestra-gw/gateway.toml"
DEFAULT_STORE_PATH = "/var/lib/oakestra-gw/exposures.json"
# The unit's StateDirectory: under ProtectSystem=strict the only place the store can be written.
UNIT_STATE_DIRECTORY = "/var/lib/oakestra-gw"
# A first start may wait this long for the cluster, then loads the table and binds the API:
# the unit's TimeoutStartSec (180 s) must cover both, so the bound stays 30 s below it.
GIVE_UP_AFTER_MAX = 150


@dataclass(frozen=True)
class ApiSettings:
    host: str | None = None  # None: the internal IPv4 address
    port: int = 11022
    token_file: str = ""
    allowed_sources: tuple[IPNetwork, ...] = tuple(
        ipaddress.ip_network(n) for n in ("10.30.0.0/16", "fdff::/16"))
    threads: int = 8
    per_exposure_metrics: bool = False


@dataclass(frozen=True)
class StoreSettings:
    path: str = DEFAULT_STORE_PATH  # the tinydb store; with etcd: metadata and the local copy
    backend: str = "tinydb"         # or "etcd": one table shared by several gateways
    endpoints: tuple[str, ...] = ()  # etcd client URLs
    prefix: str = "/oakestra-gw"
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    timeout: float = 2.0            # seconds for one etcd request
    group_commit: int = 64          # most changes one group commit takes (1: each alone)


@dataclass(frozen=True)
class NetworkSettings:
    public_interfaces: tuple[str, ...] = ()  # empty: the default route's interface
    tunnel_interface: str = "goProxyTun"
    bridge_interface: str = "oakgw0"
    internal_ipv4: ipaddress.IPv4Address | None = None
    internal_ipv6: ipaddress.IPv6Address | None = None
    service_ranges: tuple[IPNetwork, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_SERVICE_RANGES)
    reserved_ports: tuple[tuple[int, str], ...] = tuple(parse_reserved(r) for r in DEFAULT_RESERVED)


@dataclass(frozen=True)
class OakestraSettings:
    # The cluster orchestrator and its replicas, in order of preference (empty: standalone).
    cluster_urls: tuple[str, ...] = ()
    gateway_id: str = ""
    public_ipv4: str = ""
    public_ipv6: str = ""
    give_up_after: float = 120.0  # first start: seconds of failed registration before exit 1
    backoff_max: float = 30.0     # cap of the exponential backoff between tries (from 0.5 s)
    probe_interval: float = 5.0   # how often the active orchestrator is checked once joined
    # MQTT mode: the cluster's brokers (the first that answers is used) and this node's id,
    # which names the topics nodes/<node_id>/net/gateway/...
    mqtt_urls: tuple[str, ...] = ()
    node_id: str = ""
    mqtt_client_id: str = ""      # default oakestra-gw-<node_id>: never the NetManager's id
    mqtt_username: str = ""
    mqtt_password_file: str = ""
    mqtt_ca_file: str = ""        # mqtts:// without it: the system's CA store

    @property
    def cluster_url(self) -> str:
        """The preferred orchestrator ("" in standalone and MQTT mode)."""
        return self.cluster_urls[0] if self.cluster_urls else ""

    @property
    def client_id(self) -> str:
        return self.mqtt_client_id or f"oakestra-gw-{self.node_id}"


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"  # json: one JSON object per line, the audit record's fields as keys


# Oakestra's container networks (NetManager's defaults): what services send from.
DEFAULT_EGRESS_SOURCES = ("10.16.0.0/12", "fc00::/7")


@dataclass(frozen=True)
class EgressSettings:
    """Services reaching the Internet through the gateway, masqueraded to the public address
    of the interface they leave by."""

    enabled: bool | None = None  # None: on in Oakestra mode (workers route through us), else off
    sources: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_EGRESS_SOURCES)
    deny_destinations: tuple[IPNetwork, ...] = ()
    deny_ports: tuple[tuple[int, str], ...] = ()
    # Concurrent connections one source address may hold through the NAT, so that one service
    # cannot use up the public address's ports or the conntrack table.
    max_connections_per_source: int = 1024


@dataclass(frozen=True)
class Settings:
    api: ApiSettings = field(default_factory=ApiSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    oakestra: OakestraSettings = field(default_factory=OakestraSettings)
    log: LogSettings = field(default_factory=LogSettings)
    egress: EgressSettings = field(default_factory=EgressSettings)
    ha: HaSettings = field(default_factory=HaSettings)

    @property
    def standalone(self) -> bool:
        return not self.oakestra.cluster_urls and not self.oakestra.mqtt_urls

    @property
    def mqtt_mode(self) -> bool:
        return bool(self.oakestra.mqtt_urls)

    @property
    def egress_enabled(self) -> bool:
        return self.egress.enabled if self.egress.enabled is not None else not self.standalone

    def policy(self, listening: Callable = lambda: (), gateway_id: str | None = None) -> Policy:
        """`gateway_id`: the id the cluster registered this gateway under, when it has one;
        else the configured one (node_id in MQTT mode, oakestra.gateway_id)."""
        reserved = frozenset(self.network.reserved_ports) | {(self.api.port, "tcp")}
        own = frozenset(ip for ip in (self.network.internal_ipv4, self.network.internal_ipv6) if ip)
        gid = gateway_id or self.oakestra.node_id or self.oakestra.gateway_id or None
        return Policy(self.network.service_ranges, reserved, listening, own, gid)

    def with_internal_ips(self, ipv4: str, ipv6: str) -> "Settings":
        """The settings once the cluster has handed out the internal addresses."""
        net = replace(self.network, internal_ipv4=internal_ip(ipv4, "network.internal_ipv4", 4),
                      internal_ipv6=internal_ip(ipv6, "network.internal_ipv6", 6))
        return replace(self, network=net)

    @property
    def api_host(self) -> str:
        if self.api.host:
            return self.api.host
        if self.network.internal_ipv4 is None:
            raise ConfigError("api.host is not set and there is no internal IPv4 to bind to",
                              field="api.host")
        return str(self.network.internal_ipv4)

    @property
    def api_node_host(self) -> str | None:
        """In a pair the API's address floats with the role (by default it is the internal
        IPv4), so the daemon also listens on loopback: this node's own clients (the watchdog,
        the CLI) then reach this node's daemon, not whichever gateway holds the address. None
        when the API's own address is already node-local (loopback, a wildcard) or when not in
        a pair."""
        if not self.ha.enabled:
            return None
        return hosts.node_local_extra(self.api_host)

    @property
    def api_local_host(self) -> str:
        """Where a client on this node asks the daemon."""
        return self.api_node_host or hosts.reachable(self.api_host)

    @property
    def etcd_addresses(self) -> list:
        """The etcd members' addresses that store.endpoints names (the gateways' own
        traffic: conntrackd leaves it alone)."""
        return hosts.url_addresses(self.store.endpoints) if self.store.backend == "etcd" else []

    def require_internal_ips(self) -> None:
        for name in ("internal_ipv4", "internal_ipv6"):
            if getattr(self.network, name) is None:
                raise ConfigError(f"network.{name} must be set in standalone mode "
                                  "(no oakestra.cluster_url)", field=f"network.{name}")
