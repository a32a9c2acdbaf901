"""The kernel's exposures as the nft tool lists them, read by test code alone (nothing from
gw/): the one reader every test compares the daemon against.

It keeps everything it finds in any map of our table. An element in a shape the daemon never
writes (a comment, a timeout, an interval), or one in a map the daemon does not know, comes
back as ("foreign", map, element JSON), so it makes a comparison with the expected exposures
fail instead of being skipped. Named sets hold the API's connection tracking, not exposures,
and are left out."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from typing import Sequence

LIST = ("nft", "-j", "list", "table", "inet", "oakestra_gw")
FAMILY = {"expose_v4": ("ipv4", 4), "expose_v6": ("ipv6", 6)}


def read(prefix: Sequence[str] = ()) -> set[tuple] | None:
    """Our table's map elements; None when there is no table. `prefix` runs the tool
    elsewhere, e.g. `ip netns exec NAME`."""
    proc = subprocess.run([*prefix, *LIST], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        assert "No such file or directory" in proc.stderr, proc.stderr
        return None
    return elements(proc.stdout)


def elements(listing: str) -> set[tuple]:
    """Pure: the map elements of an `nft -j list table` output, as
    (family, protocol, exposed_port, service_ip, service_port) or ("foreign", map, JSON)."""
    found = set()
    for item in json.loads(listing)["nftables"]:
        if "map" in item:
            for elem in item["map"].get("elem", []):
                found.add(_element(item["map"]["name"], elem))
    return found


def _element(name: str, elem) -> tuple:
    family, version = FAMILY.get(name, (None, None))
    try:
        (proto, port), (ip, service_port) = elem[0]["concat"], elem[1]["concat"]
        address = ipaddress.ip_address(ip)
    except (KeyError, TypeError, ValueError, IndexError):
        family = None
    else:
        if (family and address.version == version and proto in ("tcp", "udp")
                and type(port) is int and type(service_port) is int):
            return (family, proto, port, str(address), service_port)
    return ("foreign", name, json.dumps(elem, sort_keys=True))
