"""What every kind of test needs: one way to wait for a condition, one way to tell that a
probe failed, one way to write an exposure as the API takes it and as the kernel reader
(tests/oracle.py) returns it."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], object], timeout: float = 10, what: str = "condition",
             interval: float = 0.05, log: Callable[[], str] = lambda: ""):
    """Poll until `predicate()` is truthy and return that value. `timeout` only catches a
    hang: a test that needs speed belongs in tests/bench."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g} s (last: {last!r})\n"
                                 f"{log()}")
        time.sleep(interval)


def fails(probe) -> str | None:
    """The error that `probe` ended with, or None if it succeeded."""
    try:
        probe()
    except OSError as exc:  # refused, reset, timed out
        return type(exc).__name__
    return None


def ex(port: int, ip: str = "10.30.0.1", service_port: int = 80, protocol: str | None = "tcp",
       **extra) -> dict:
    """An add request's body. `protocol=None` leaves the field out (the API's default, tcp)."""
    body = {"exposed_port": port, "service_ip": ip, "service_port": service_port, **extra}
    if protocol is not None:
        body["protocol"] = protocol
    return body


def doc(port: int, ip: str = "10.30.0.1", service_port: int = 80, protocol: str = "tcp") -> tuple:
    """One exposure as a tuple (family, protocol, exposed_port, service_ip, service_port)."""
    return ("ipv6" if ":" in ip else "ipv4", protocol, port, ip, service_port)
