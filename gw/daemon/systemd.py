"""The daemon and systemd: notifications (READY, RELOADING, STOPPING, WATCHDOG) over the
notify socket, and the watchdog that pings only while the API answers (docs/operations.md)."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
from typing import Callable

from ..core import hosts

log = logging.getLogger(__name__)


def sd_notify(state: str, environ=os.environ) -> bool:
    """Send `state` (e.g. "READY=1") to systemd's notify socket; False without one."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state.split("\n", 1)[0], exc)
        return False


def watchdog_interval(environ=os.environ) -> float | None:
    """Half of WATCHDOG_USEC when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


def api_answers(host: str, port: int, timeout: float) -> bool:
    """The API answers /api/health with 200 over its own socket."""
    conn = http.client.HTTPConnection(hosts.reachable(host), port, timeout=timeout)
    try:
        conn.request("GET", "/api/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def watchdog_loop(stopping: threading.Event, interval: float,
                  healthy: Callable[[float], bool]) -> None:
    """Until `stopping`: every `interval`, ping systemd if `healthy(timeout)`."""
    while not stopping.wait(interval):
        if healthy(max(interval / 2, 0.05)):
            sd_notify("WATCHDOG=1")
        else:
            log.warning("watchdog: the API did not answer; not pinging systemd")
