"""Fill the gateway's conntrack table cheaply: run in the client namespace, it sends one UDP
datagram per (exposed port, source address, source port) to exposed UDP ports of the gateway
through a raw socket (no socket per port, no replies awaited). Each datagram is a new flow, so
the gateway DNATs it into the worker and keeps one conntrack entry for it (for as long as the
gateway namespace's nf_conntrack_udp_timeout says). Spread the flows over several exposures:
after SNAT to the one internal address, one service IP:port takes at most ~64k flows.

    ip netns exec CLIENT python -m tests.bench.udpfill DST PORT[,PORT...] COUNT SRC [SRC...]
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import sys
import time

FIRST_PORT = 1024
PORTS_PER_SOURCE = 65535 - FIRST_PORT


def packets(dst: str, dports: list[int], count: int, sources: list[str]):
    """(source, datagram) pairs: IPv4 header (the kernel fills in the checksum and the total
    length) + UDP header (checksum 0: none, allowed for IPv4) + 4 bytes of payload."""
    if count > len(sources) * len(dports) * PORTS_PER_SOURCE:
        raise ValueError(f"{count} flows need more source addresses or ports")
    if count > len(dports) * 60000:
        raise ValueError(f"{count} flows need more exposed ports (SNAT: ~64k per target)")
    daddr = ipaddress.IPv4Address(dst).packed
    payload = b"oak\n"
    width = len(dports) * len(sources)
    for i in range(count):
        dport = dports[i % len(dports)]
        src = sources[(i // len(dports)) % len(sources)]
        sport = FIRST_PORT + i // width
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                         ipaddress.IPv4Address(src).packed, daddr)
        udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        yield ip + udp + payload


def fill(dst: str, dports: list[int], count: int, sources: list[str], pace_every: int = 2000) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    start = time.perf_counter()
    sent = 0
    for datagram in packets(dst, dports, count, sources):
        while True:
            try:
                sock.sendto(datagram, (dst, 0))
                break
            except BlockingIOError:
                time.sleep(0.001)
            except OSError as exc:  # ENOBUFS: the veth queue is full; give it a moment
                if exc.errno != 105:
                    raise
                time.sleep(0.001)
        sent += 1
        if sent % pace_every == 0:
            time.sleep(0)  # let the softirq side breathe
    sock.close()
    return {"sent": sent, "seconds": time.perf_counter() - start}


def main() -> None:
    dst, ports, count, *sources = sys.argv[1:]
    print(json.dumps(fill(dst, [int(p) for p in ports.split(",")], int(count), sources)))


if __name__ == "__main__":
    main()
