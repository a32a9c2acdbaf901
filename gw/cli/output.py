"""How the CLI prints exposures: one line per exposure, or a row of the `expose list` table.
The target is always `Exposure.target_text` (IPv6 in brackets)."""

from __future__ import annotations

from typing import Mapping

from ..core.exposure import Exposure

TABLE_HEADER = f"{'FAMILY':<7}{'PROTO':<6}{'PORT':>5}  {'TARGET':<40} SERVICE"


def exposure(doc: Mapping) -> Exposure:
    """An exposure of the API's JSON (the daemon validated it)."""
    return Exposure.from_dict(doc)


def line(e: Exposure, outcome: str | None = None, *, label: bool = True) -> str:
    """`8080/tcp -> 10.30.0.1:80  ipv4  (web)`, after the outcome when given."""
    text = f"{e}  {e.family}" + (f"  ({e.service_id})" if label and e.service_id else "")
    return f"{outcome:<10} {text}" if outcome else text


def row(e: Exposure) -> str:
    return (f"{e.family:<7}{e.protocol:<6}{e.exposed_port:>5}  {e.target_text:<40} "
            f"{e.service_id or '-'}")
