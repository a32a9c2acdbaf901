"""The ports local processes listen on, read from procfs (this network namespace only).

`exposure.Policy.listening` is an injected callable: an exposure must not shadow a port a
process of the gateway host serves on. Our DNAT runs before local delivery, so an exposure of
such a port would take its traffic away. Only sockets reachable from outside count: bound to a
wildcard or a non-loopback address. A socket bound to loopback alone is out of reach of the
public side (the output chain leaves loopback alone too).

Cheap: a few small procfs reads; at most ``ttl`` seconds stale, so a batch of 10,000 exposures
reads procfs once.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from pathlib import Path

PROC_NET = Path("/proc/net")
TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"  # TCP_CLOSE: bound, no peer: a UDP socket that receives from anyone


def _address(hex_text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """procfs prints addresses as 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def parse_table(text: str, protocol: str) -> set[tuple[int, str]]:
    """Pure: ``(port, protocol)`` of the externally reachable listeners in one procfs table."""
    wanted = TCP_LISTEN if protocol == "tcp" else UDP_UNCONNECTED
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != wanted:
            continue
        try:
            local, port_hex = fields[1].rsplit(":", 1)
            ip = _address(local)
            port = int(port_hex, 16)
        except ValueError:
            continue
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if port and not ip.is_loopback:
            ports.add((port, protocol))
    return ports


def read_listening(proc_net: Path = PROC_NET) -> set[tuple[int, str]]:
    ports: set[tuple[int, str]] = set()
    for name, protocol in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        try:
            ports |= parse_table((proc_net / name).read_text(), protocol)
        except OSError:
            continue  # e.g. IPv6 disabled
    return ports


class Listening:
    """A callable for `Policy.listening`, caching the procfs read for `ttl` seconds."""

    def __init__(self, ttl: float = 1.0, read=read_listening):
        self._ttl = ttl
        self._read = read
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._ports: frozenset[tuple[int, str]] = frozenset()

    def __call__(self) -> frozenset[tuple[int, str]]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self._ttl:
                self._ports = frozenset(self._read())
                self._at = now
            return self._ports
