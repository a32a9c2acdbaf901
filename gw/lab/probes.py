"""Probes of the data path from inside a lab namespace: HTTP, UDP and TCP exchanges over
sockets created in the namespace of a role, as a client on the Internet or a container
would send them. Each raises OSError when the other side cannot be reached."""

from __future__ import annotations

import ipaddress
import socket

from ..core import hosts
from .topology import Lab


def family_of(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def connected(lab: Lab, role: str, host: str, port: int, kind: int = socket.SOCK_STREAM, *,
              timeout: float = 3, source: str | None = None) -> socket.socket:
    """A socket created in `role`'s namespace (bound to `source` if given) and connected to
    host:port. Raises OSError when unreachable."""
    sock = lab.socket(role, family_of(host), kind)
    try:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _http(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send an HTTP/1.0 request, read until the server closes: (status, body)."""
    try:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(1 << 16):
            chunks.append(data)
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def http_get(lab: Lab, role: str, host: str, port: int, path: str = "/", *,
             timeout: float = 5, source: str | None = None) -> tuple[int, bytes]:
    """GET over a socket created in `role`'s namespace. Raises OSError when unreachable."""
    sock = connected(lab, role, host, port, timeout=timeout, source=source)
    hostport = f"{hosts.in_url(host)}:{port}"
    return _http(sock, f"GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode())


def http_post(lab: Lab, role: str, host: str, port: int, path: str, body: bytes, *,
              timeout: float = 10) -> tuple[int, bytes]:
    """POST `body` over a socket created in `role`'s namespace."""
    sock = connected(lab, role, host, port, timeout=timeout)
    return _http(sock, f"POST {path} HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body)


def udp_exchange(lab: Lab, role: str, host: str, port: int, message: bytes, *,
                 timeout: float = 2, source: str | None = None) -> bytes:
    """One datagram there and one back. Raises socket.timeout when nothing comes back."""
    sock = connected(lab, role, host, port, socket.SOCK_DGRAM, timeout=timeout, source=source)
    try:
        sock.send(message)
        return sock.recv(65535)
    finally:
        sock.close()


def tcp_connect(lab: Lab, role: str, host: str, port: int, *, timeout: float = 3,
                source: str | None = None) -> socket.socket:
    return connected(lab, role, host, port, timeout=timeout, source=source)


def tcp_echo(sock: socket.socket, text: bytes) -> bytes:
    """One line to the worker's TCP echo service over `sock` and its answer. Raises OSError
    when the connection is cut (reset, closed or silent past the socket's timeout)."""
    sock.sendall(text + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError("closed by the peer")
        data += chunk
    return data


class UdpFlow:
    """One UDP client socket in `role`'s namespace: every datagram belongs to one flow (one
    conntrack entry on the gateway)."""

    def __init__(self, lab: Lab, role: str, host: str, port: int):
        self.sock = lab.socket(role, family_of(host), socket.SOCK_DGRAM)
        self.sock.connect((host, port))

    def exchange(self, message: bytes, timeout: float) -> bytes | None:
        """The answer to `message`, or None when none comes within `timeout`. Raises
        ConnectionRefusedError when a port unreachable came back."""
        self.sock.settimeout(timeout)
        self.sock.send(message)
        try:
            return self.sock.recv(65535)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()
