"""The API's listening socket (waitress), movable to another address while it serves.

Waitress settings: slow or half-open clients must not block the others. Requests are read by
the event loop, never by a worker thread, so a trickling client holds a socket, not a thread;
an idle connection is closed after channel_timeout. Bodies past max_request_body_size are
refused by waitress before they are buffered (the app's own limit, 64 KiB, answers JSON below
that). The input chain keeps remote connections below the connection limit
(ruleset.API_REMOTE_CAP), so the watchdog's probe from the gateway itself always gets in.
"""

from __future__ import annotations

import logging
import socket
import threading

from ..core import hosts, ruleset
from ..core.errors import GatewayError

log = logging.getLogger("gw.daemon.server")

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h; Python names it from 3.12

WAITRESS = dict(channel_timeout=30, cleanup_interval=5,
                connection_limit=ruleset.API_CONNECTION_LIMIT,
                max_request_header_size=16 * 1024, max_request_body_size=128 * 1024,
                asyncore_use_poll=True, ident="oakestra-gw", expose_tracebacks=False,
                clear_untrusted_proxy_headers=True)


class Listener:
    """Every server it makes shares one socket map and one pool of worker threads, so that
    `move` can add a listener to the running loop. A host name that resolves to several
    addresses gets one server per address, as waitress's own `create_server` would."""

    def __init__(self, app, host: str, port: int, threads: int, *, floating: bool = False,
                 node_host: str | None = None):
        """`floating`: `host` may not be local yet (a pair's floating address, held by the
        master only), so it is bound with IP_FREEBIND and takes connections once the address
        arrives. `node_host`: a second, fixed listener (loopback) for this node's own clients;
        it stays where it is when `move` moves the first."""
        from waitress.task import ThreadedTaskDispatcher  # noqa: PLC0415

        self._app, self._port, self._threads = app, port, threads
        self._floating = floating
        self._map: dict = {}
        self._dispatcher = ThreadedTaskDispatcher()
        self._dispatcher.set_thread_count(threads)
        self._servers = self._listen(host)
        self._node = self._listen(node_host) if node_host else []

    def _listen(self, host: str) -> list:
        from waitress.adjustments import Adjustments  # noqa: PLC0415
        from waitress.server import TcpWSGIServer  # noqa: PLC0415

        servers = []
        try:
            adj = Adjustments(host=host, port=self._port, threads=self._threads, **WAITRESS)
            for sockinfo in adj.listen:
                # A socket of our own only where waitress's cannot do it: waitress binds
                # while it builds the server, before an option could be set.
                sock = _freebind_socket(sockinfo) if self._floating else None
                servers.append(TcpWSGIServer(self._app, self._map, True, sock,
                                             dispatcher=self._dispatcher, adj=adj,
                                             sockinfo=sockinfo, bind_socket=sock is None))
        except (OSError, ValueError) as exc:
            for server in servers:
                _stop_listening(server)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise GatewayError(f"cannot listen on {host}:{self._port}: {why}") from None
        return servers

    @property
    def where(self) -> str:
        return ", ".join(f"http://{hosts.in_url(s.effective_host)}:{s.effective_port}"
                         for s in self._servers + self._node)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (raised as SystemExit into waitress's loop, which serves
        every server in the shared map)."""
        self._servers[0].run()

    def move(self, host: str) -> str | None:
        """Listen on `host` instead, inside waitress's loop (its socket map is not safe to
        change from another thread): the new sockets first, then the old ones closed.
        Connections already open on the old address finish on it. None when done; else why
        not (the old listener stays)."""
        done, outcome = threading.Event(), {}

        def swap():
            try:
                outcome["servers"] = self._listen(host)
            except GatewayError as exc:
                outcome["error"] = exc
            done.set()

        self._servers[0].trigger.pull_trigger(swap)
        if not done.wait(10) or "error" in outcome:
            why = outcome["error"].message if "error" in outcome else "the API loop did not answer"
            return (f"the API still listens on {self.where}, not on the new internal address "
                    f"{host} ({why}): restart needed")
        old, self._servers = self._servers, outcome["servers"]
        for server in old:
            _stop_listening(server)
        log.info("re-address: the API listens on http://%s:%d now", host, self._port)
        return None

    def close(self) -> None:
        self._dispatcher.shutdown(timeout=5)
        for server in self._servers + self._node:
            server.close()


def _freebind_socket(sockinfo) -> socket.socket:
    """A listening socket on an address this node may not hold yet."""
    family, socktype, proto, sockaddr = sockinfo
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # IP_FREEBIND (SOL_IP) applies to IPv6 sockets as well.
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def _stop_listening(server) -> None:
    """Its listening socket only: its trigger still wakes the loop for requests in flight on
    connections it accepted."""
    server.del_channel()
    server.socket.close()
