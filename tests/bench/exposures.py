"""The exposure sets the benchmarks install, and the baseline ruleset (one nft rule per port).

The measured exposure is ``8080/tcp -> 10.30.0.1:80`` (the worker's nginx); it is always the
last one (the most recently added). The others are TCP ports from 10000 up (the API port
skipped) pointing at addresses across 10.30.0.0/16 that nothing is ever sent to.
"""

from __future__ import annotations

import ipaddress

from gw.core.exposure import Exposure

from .topology import BASELINE_IP, INTERNAL_IPV4, SERVICE_IP, SERVICE_PORT

MEASURED_PORT = 8080
IPERF_PORT = 5201
FILLER_PORTS = [p for p in range(10000, 65536) if p not in (11022, MEASURED_PORT)]
BASELINE_TABLE = "ip oakgw_bench_linear"


def exposures(n: int, measured: bool = True) -> list[Exposure]:
    """`n` exposures; with `measured`, the last one is the measured port."""
    fillers = n - 1 if measured else n
    if fillers > len(FILLER_PORTS):
        raise ValueError(f"at most {len(FILLER_PORTS) + 1} TCP exposures fit in the port range")
    out = [Exposure(port, "tcp", ipaddress.IPv4Address(f"10.30.{1 + i // 250}.{1 + i % 250}"),
                    SERVICE_PORT)
           for i, port in enumerate(FILLER_PORTS[:fillers])]
    if measured:
        out.append(measured_exposure())
    return out


def measured_exposure() -> Exposure:
    return Exposure(MEASURED_PORT, "tcp", ipaddress.IPv4Address(SERVICE_IP), SERVICE_PORT)


def limit_exposures() -> list[Exposure]:
    """What tests/bench/limit.py measures: the wrk port and iperf3's port for TCP and UDP
    (its control connection is TCP, its UDP test datagrams go to the same port number)."""
    service = ipaddress.IPv4Address(SERVICE_IP)
    return [measured_exposure(), Exposure(IPERF_PORT, "tcp", service, IPERF_PORT),
            Exposure(IPERF_PORT, "udp", service, IPERF_PORT)]


def as_docs(items: list[Exposure]) -> list[dict]:
    return [{"exposed_port": e.exposed_port, "protocol": e.protocol,
             "service_ip": str(e.service_ip), "service_port": e.service_port} for e in items]


def baseline_ruleset(items: list[Exposure]) -> str:
    """The usual alternative: one DNAT rule per exposed port in a linear chain (as Docker,
    netavark and firewalld do), in its own table, in the order the exposures were added (the
    measured one last). It runs before our table (priority dstnat - 20) and handles only
    traffic to BASELINE_IP: a connection it DNATs is not looked at by our prerouting chain
    (once a NAT binding exists the kernel skips later NAT chains); connections to PUBLIC_IP
    cost it one rule and go on to our table. Forwarding and SNAT are our table's for both."""
    lines = [f"table {BASELINE_TABLE}", f"delete table {BASELINE_TABLE}",
             f"table {BASELINE_TABLE} {{",
             "  chain prerouting {",
             "    type nat hook prerouting priority dstnat - 20; policy accept;",
             f"    ip daddr != {BASELINE_IP} return",
             "    jump expose",
             "  }",
             "  chain expose {"]
    lines += [f"    {e.protocol} dport {e.exposed_port} dnat ip to {e.service_ip}:{e.service_port}"
              for e in items]
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def remove_baseline() -> str:
    return f"table {BASELINE_TABLE}\ndelete table {BASELINE_TABLE}\n"


def settings_doc() -> dict:
    return {"network": {"internal_ipv4": INTERNAL_IPV4, "internal_ipv6": "fdff::ffff:1"}}
