"""Gateway pairs: the `[ha]` settings and the two configuration files they render, keepalived's
(VRRP moves the floating addresses) and conntrackd's (FTFW syncs the flows). Pure: plain values
in, text out; the CLI (`oakestra-gw ha render`) and the Ansible role print the same text.

The floating addresses are the public ones clients reach and the internal ones both skeletons
SNAT to (network.internal_ipv4/ipv6), so that a synced NAT binding is valid on whichever gateway
holds them. All of them move together: one VRRP instance per interface and family (keepalived
cannot mix IPv4 and IPv6 in one `virtual_ipaddress` list), advertising on the public segment,
in one sync group.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

from . import config_fields as f
from .errors import ConfigError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_STATE_DIR = "/run/oakestra-gw/ha"
SYNC_GROUP = "oakestra_gw"


@dataclass(frozen=True)
class HaSettings:
    enabled: bool = False
    router_id: str = ""                  # "": keepalived's default, the host name
    virtual_router_id: int = 51          # one per pair on a segment; every instance uses it
    priority: int = 100                  # the higher one is master while both are up
    advert_interval: float = 0.1         # VRRPv3 counts in centiseconds
    preempt_delay: float = 5.0           # a returning node waits this long before it takes over
    public_interface: str = ""
    public_addresses: tuple[IPInterface, ...] = ()
    internal_interface: str = ""         # "": network.bridge_interface
    internal_addresses: tuple[IPInterface, ...] = ()  # (): the internal addresses, as hosts
    sync_interface: str = ""
    sync_address: IPAddress | None = None
    sync_peer: IPAddress | None = None
    sync_port: int = 3780
    state_dir: str = DEFAULT_STATE_DIR   # pid files, the notify fifo, conntrackd's socket
    # False: conntrackd writes synced flows straight into the backup's kernel, so a new master
    # holds them before its first packet (keepalived raises the addresses before any notify).
    conntrack_external_cache: bool = False

    @property
    def keepalived_conf(self) -> str:
        return f"{self.state_dir}/keepalived.conf"

    @property
    def conntrackd_conf(self) -> str:
        return f"{self.state_dir}/conntrackd.conf"

    @property
    def notify_fifo(self) -> str:
        return f"{self.state_dir}/keepalived.fifo"

    @property
    def role_file(self) -> str:
        return f"{self.state_dir}/role"

    @property
    def floating(self) -> tuple[IPAddress, ...]:
        return tuple(i.ip for i in self.public_addresses + self.internal_addresses)

    def instances(self) -> list[tuple[str, str, tuple[tuple[IPInterface, str], ...]]]:
        """(name, interface, ((address, its interface), ...)) of each VRRP instance: one per
        family, advertising on the public segment (the one link the pair surely shares), each
        address put on its own interface. The internal addresses ride on these instances: an
        instance of their own would advertise on the internal interface, which holds no
        address of its own (the bridge towards a tunnel), so it would be in FAULT and take
        the whole sync group with it."""
        found = []
        for version in (4, 6):
            mine = tuple((a, self.public_interface) for a in self.public_addresses
                         if a.version == version)
            mine += tuple((a, self.internal_interface) for a in self.internal_addresses
                          if a.version == version)
            if mine:
                found.append((f"public_v{version}", self.public_interface, mine))
        return found


# The keys of [ha] are the fields' names.
HA_KEYS = {field.name for field in fields(HaSettings)}


def _interfaces(table: dict, key: str) -> tuple[IPInterface, ...]:
    found = []
    for item in f.items(table, key, "ha", []):
        try:
            iface = ipaddress.ip_interface(str(item))
        except ValueError:
            raise ConfigError(f"ha.{key}: {item!r} is not an address with its prefix "
                              "(e.g. 198.18.0.10/24)", field=f"ha.{key}") from None
        if iface in found:
            raise ConfigError(f"ha.{key}: {iface} is listed twice", field=f"ha.{key}")
        found.append(iface)
    return tuple(found)


def _ifname(table: dict, key: str, default: str) -> str:
    value = table.get(key, default)
    return f.ifname(value, f"ha.{key}") if value != "" else ""


def _address(table: dict, key: str) -> IPAddress | None:
    value = f.text(table, key, "ha", "")
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"ha.{key}: {value!r} is not an IP address", field=f"ha.{key}") from None


def parse_ha(table: dict, internal_ipv4, internal_ipv6, bridge_interface: str) -> HaSettings:
    """The `[ha]` table, checked against the network settings it depends on."""
    enabled = f.boolean(table, "enabled", "ha", False)
    ha = HaSettings(
        enabled=enabled,
        router_id=f.text(table, "router_id", "ha", ""),
        virtual_router_id=f.integer(table, "virtual_router_id", "ha", 51, 1, 255),
        priority=f.integer(table, "priority", "ha", 100, 1, 254),
        advert_interval=f.seconds(table, "advert_interval", "ha", 0.1, 0.01, 40.95),
        preempt_delay=f.seconds(table, "preempt_delay", "ha", 5.0, 0, 1000),
        public_interface=_ifname(table, "public_interface", ""),
        public_addresses=_interfaces(table, "public_addresses"),
        internal_interface=_ifname(table, "internal_interface", ""),
        internal_addresses=_interfaces(table, "internal_addresses"),
        sync_interface=_ifname(table, "sync_interface", ""),
        sync_address=_address(table, "sync_address"),
        sync_peer=_address(table, "sync_peer"),
        sync_port=f.port(table, "sync_port", "ha", 3780),
        state_dir=f.text(table, "state_dir", "ha", DEFAULT_STATE_DIR) or DEFAULT_STATE_DIR,
        conntrack_external_cache=f.boolean(table, "conntrack_external_cache", "ha", False))
    if " " in ha.router_id or '"' in ha.router_id:
        raise ConfigError(f"ha.router_id {ha.router_id!r} must be one word", field="ha.router_id")
    if not ha.state_dir.startswith("/") or any(c in ha.state_dir for c in ' "\n'):
        raise ConfigError(f"ha.state_dir {ha.state_dir!r} must be an absolute path without "
                          "spaces or quotes", field="ha.state_dir")
    if not enabled:
        return ha
    return _check_enabled(replace(ha, internal_interface=ha.internal_interface or bridge_interface),
                          internal_ipv4, internal_ipv6)


def _check_enabled(ha: HaSettings, internal_ipv4, internal_ipv6) -> HaSettings:
    for key in ("public_interface", "sync_interface", "sync_address", "sync_peer"):
        if not getattr(ha, key):
            raise ConfigError(f"ha.{key} must be set when ha.enabled is true", field=f"ha.{key}")
    if not ha.public_addresses:
        raise ConfigError("ha.public_addresses must name at least one floating address when "
                          "ha.enabled is true", field="ha.public_addresses")
    if internal_ipv4 is None or internal_ipv6 is None:
        raise ConfigError("network.internal_ipv4 and network.internal_ipv6 must be set when "
                          "ha.enabled is true: both gateways SNAT to the same floating internal "
                          "addresses", field="network.internal_ipv4")
    internal = ha.internal_addresses or (ipaddress.ip_interface(f"{internal_ipv4}/32"),
                                         ipaddress.ip_interface(f"{internal_ipv6}/128"))
    for ip in (internal_ipv4, internal_ipv6):
        if ip not in {a.ip for a in internal}:
            raise ConfigError(f"ha.internal_addresses must hold the internal address {ip} "
                              "(network.internal_ipv4/ipv6): it is the SNAT address that moves",
                              field="ha.internal_addresses")
    if ha.sync_address.version != ha.sync_peer.version or ha.sync_address == ha.sync_peer:
        raise ConfigError("ha.sync_peer must be another address of the same family as "
                          "ha.sync_address", field="ha.sync_peer")
    if ha.sync_interface in (ha.public_interface, ha.internal_interface):
        raise ConfigError("ha.sync_interface must be a link of its own (not the public or the "
                          "internal interface)", field="ha.sync_interface")
    if ha.public_interface == ha.internal_interface:
        raise ConfigError("ha.public_interface must differ from ha.internal_interface",
                          field="ha.public_interface")
    floating = [a.ip for a in ha.public_addresses + internal]
    if len(set(floating)) != len(floating):
        raise ConfigError("ha.public_addresses and ha.internal_addresses share an address",
                          field="ha.public_addresses")
    if ha.sync_address in floating or ha.sync_peer in floating:
        raise ConfigError("the sync link's addresses cannot be floating ones",
                          field="ha.sync_address")
    return replace(ha, internal_addresses=tuple(internal))


def _seconds(value: float) -> str:
    return f"{value:g}"


def render_keepalived(ha: HaSettings, notify_command: str) -> str:
    """keepalived.conf for one gateway of the pair. `notify_command`: the absolute command
    keepalived starts to read its notify fifo (role changes, in order)."""
    lines = ["# Rendered by oakestra-gw ha render keepalived: VRRPv3 for the pair's floating",
             "# addresses. Every instance is in one sync group, so they move together.",
             "global_defs {"]
    if ha.router_id:
        lines.append(f"    router_id {ha.router_id}")
    lines += ["    vrrp_version 3",
              # Before the script: keepalived resolves a script's user when it reads the
              # script's line, and on a reload a later script_user fails it (no reader).
              "    enable_script_security",
              "    script_user root",
              # The fifo hands the role changes to one reader in the order they happened.
              f"    vrrp_notify_fifo {ha.notify_fifo}",
              f'    vrrp_notify_fifo_script "{notify_command}"',
              # A reload starts a new reader: it learns the states again (and so runs
              # conntrackd's steps for the current role) rather than nothing.
              "    fifo_write_vrrp_states_on_reload",
              "}",
              "",
              f"vrrp_sync_group {SYNC_GROUP} {{",
              "    group {"]
    instances = ha.instances()
    lines += [f"        {name}" for name, _, _ in instances]
    lines += ["    }", "}"]
    for name, ifname, addrs in instances:
        lines += ["",
                  f"vrrp_instance {name} {{",
                  # Both start as backup: the higher priority takes over after preempt_delay,
                  # by which time a returning node's conntrackd has been resynced.
                  "    state BACKUP",
                  f"    interface {ifname}",
                  f"    virtual_router_id {ha.virtual_router_id}",
                  f"    priority {ha.priority}",
                  f"    advert_int {_seconds(ha.advert_interval)}",
                  f"    preempt_delay {_seconds(ha.preempt_delay)}",
                  "    virtual_ipaddress {"]
        lines += [f"        {a} dev {dev}" for a, dev in addrs]
        lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


def keepalived_command(ha: HaSettings, config_file: str | None = None) -> list[str]:
    """keepalived in the foreground with the VRRP subsystem only and pid files of its own, so
    that one runs per network namespace."""
    return ["keepalived", "--dont-fork", "--log-console", "--vrrp",
            "--use-file", config_file or ha.keepalived_conf,
            "--pid", f"{ha.state_dir}/keepalived.pid",
            "--vrrp_pid", f"{ha.state_dir}/keepalived-vrrp.pid"]


def _family(ip: IPAddress) -> str:
    return f"IPv{ip.version}"


def render_conntrackd(ha: HaSettings, systemd: bool = False,
                      local: Iterable[IPAddress] = ()) -> str:
    """conntrackd.conf: FTFW over the sync link (unicast UDP to the peer). `systemd`: under a
    Type=notify unit, logging to the journal. `local`: addresses of the nodes' own traffic
    (the etcd members'), whose flows stay where they are; never a floating one."""
    log = (["    LogFile off", "    Syslog on"] if systemd
           else [f"    LogFile {ha.state_dir}/conntrackd.log", "    Syslog off"])
    ignore = list(dict.fromkeys(["127.0.0.1", "::1", str(ha.sync_address), str(ha.sync_peer),
                                 *(str(a) for a in local if a not in ha.floating)]))
    lines = [
        "# Rendered by oakestra-gw ha render conntrackd: the flows (NAT bindings included) of",
        "# the pair, synced over the dedicated link in FTFW mode.",
        "Sync {",
        "    Mode FTFW {",
        f"        DisableExternalCache {'off' if ha.conntrack_external_cache else 'on'}",
        "        PurgeTimeout 15",
        "    }",
        "    UDP {",
        f"        {_family(ha.sync_address)}_address {ha.sync_address}",
        f"        {_family(ha.sync_peer)}_Destination_Address {ha.sync_peer}",
        f"        Port {ha.sync_port}",
        f"        Interface {ha.sync_interface}",
        "        SndSocketBuffer 1249280",
        "        RcvSocketBuffer 1249280",
        "        Checksum on",
        "    }",
        "}",
        "General {",
        f"    Systemd {'on' if systemd else 'off'}",
        "    HashSize 32768",
        "    HashLimit 131072",
        *log,
        f"    LockFile {ha.state_dir}/conntrackd.lock",
        "    UNIX {",
        f"        Path {ha.state_dir}/conntrackd.ctl",
        "    }",
        "    NetlinkBufferSize 2097152",
        "    NetlinkBufferSizeMaxGrowth 8388608",
        "    NetlinkOverrunResync on",
        "    NetlinkEventsReliable on",
        "    Filter From Userspace {",
        # The sample configuration syncs TCP only: exposed UDP flows and ICMP errors must
        # survive a failover too.
        "        Protocol Accept {",
        "            TCP",
        "            UDP",
        "            ICMP",
        "            IPv6-ICMP",
        "        }",
        # Never the floating addresses: every exposed flow is addressed to one of them. (A
        # service's own egress to an etcd member's address would not be synced either.)
        "        Address Ignore {",
        *[f"            {_family(ipaddress.ip_address(a))}_address {a}" for a in ignore],
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def conntrackd_command(ha: HaSettings, *args: str, config_file: str | None = None) -> list[str]:
    """conntrackd with this gateway's configuration: the daemon itself (no `args`, in the
    foreground) or one of its client commands (e.g. "-c", "-s")."""
    return ["conntrackd", "-C", config_file or ha.conntrackd_conf, *args]
