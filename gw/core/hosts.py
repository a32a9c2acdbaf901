"""Host names and addresses as the API's URLs and clients need them. Pure."""

from __future__ import annotations

import ipaddress

# A wildcard listener is reached over loopback, in the same family.
_WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def reachable(host: str) -> str:
    """The address a local client connects to for a listener on `host`."""
    return _WILDCARD_TO_LOOPBACK.get(host, host)


def in_url(host: str) -> str:
    """`host` as the host part of a URL: an IPv6 address in brackets (names and IPv4 have no
    colon)."""
    return f"[{host}]" if ":" in host else host



def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def node_local_extra(host: str) -> str | None:
    """The loopback address to listen on as well when `host` may not be this node's (a
    floating address); None when a listener on `host` is already reached over loopback."""
    if is_loopback(host) or host in _WILDCARD_TO_LOOPBACK:
        return None
    return "127.0.0.1"


def url_addresses(urls) -> list:
    """The hosts of `urls` that are IP addresses (names are left out: they resolve later)."""
    from urllib.parse import urlsplit

    found = []
    for url in urls:
        try:
            found.append(ipaddress.ip_address(urlsplit(url).hostname or ""))
        except ValueError:
            continue
    return list(dict.fromkeys(found))
