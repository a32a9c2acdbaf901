"""The lab's services, run inside a namespace by ``python -m gw.lab serve [ROLE]``: HTTP on
80 (dual stack, with /bytes/N, /whoami and POST uploads), UDP echo on 53 and TCP echo on 7,
each answering from the address it was asked on. Prints "listening" once all listen."""

from __future__ import annotations

import json
import signal
import socket
import threading

from .topology import ECHO_PORT, HTTP_PORT, UDP_PORT


def serve(role: str = "worker") -> None:
    import http.server
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "oakestra-lab-worker/1"
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            peer = self.client_address[0].removeprefix("::ffff:")
            local = self.connection.getsockname()[0].removeprefix("::ffff:")
            mss = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            if self.path.startswith("/bytes/"):
                n = int(self.path.split("/")[2])
                self._send(200, b"", length=n, extra={"X-Peer": peer, "X-Mss": str(mss)})
                block = bytes(range(256)) * 256
                while n > 0:
                    self.wfile.write(block[:n])
                    n -= len(block)
                return
            if self.path == "/whoami":
                body = json.dumps({"peer": peer, "local": local, "mss": mss}).encode()
            else:
                body = (f"hello from the {role} namespace's server at {local}; "
                        f"it sees you as {peer}\n").encode()
            self._send(200, body, extra={"X-Peer": peer, "X-Mss": str(mss)})

        def do_POST(self):
            # /upload: reads the body, answers its size (large uploads through the tunnel).
            left = int(self.headers.get("Content-Length", 0))
            total = 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                total += len(chunk)
                left -= len(chunk)
            peer = self.client_address[0].removeprefix("::ffff:")
            self._send(200, json.dumps({"received": total, "peer": peer}).encode())

        def _send(self, status, body, length=None, extra=None):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    # socketserver listens with a backlog of 5: a burst of connections would lose SYNs to a
    # full accept queue (and the client retries only after a second), as no real service does.
    class DualStack(socketserver.ThreadingMixIn, http.server.HTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        request_queue_size = 128

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                if line.strip() == b"WHOAMI":
                    peer = self.client_address[0].removeprefix("::ffff:")
                    mss = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
                    line = json.dumps({"peer": peer, "mss": mss}).encode() + b"\n"
                self.wfile.write(line)

    class EchoServer(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    # UDP echo, one socket per family, each answering from the address it was sent to (a
    # namespace with several addresses would otherwise pick any of them as the source, and a
    # client's connected socket drops an answer from another address).
    ip_pktinfo = getattr(socket, "IP_PKTINFO", 8)
    udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp4.setsockopt(socket.IPPROTO_IP, ip_pktinfo, 1)
    udp4.bind(("0.0.0.0", UDP_PORT))
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    udp6.bind(("::", UDP_PORT))

    def udp_echo(sock, level, kind):
        while True:
            data, ancillary, _flags, addr = sock.recvmsg(65535, 256)
            reply = b"echo " + data.rstrip(b"\r\n") + f" (from {addr[0]})\n".encode()
            source = []
            for cmsg_level, cmsg_type, info in ancillary:
                if (cmsg_level, cmsg_type) == (level, ip_pktinfo):
                    # in_pktinfo {ifindex, spec_dst, addr}: the source is spec_dst on the way
                    # out, the destination it came to is addr on the way in.
                    source = [(level, ip_pktinfo, bytes(4) + info[8:12] + bytes(4))]
                elif (cmsg_level, cmsg_type) == (level, kind):  # in6_pktinfo: its address
                    source = [(level, kind, info[:16] + bytes(4))]
            sock.sendmsg([reply], source, 0, addr)

    DualStack.allow_reuse_address = True
    servers = [DualStack(("::", HTTP_PORT), Handler), EchoServer(("::", ECHO_PORT), Echo)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for sock, level, kind in ((udp4, socket.IPPROTO_IP, ip_pktinfo),
                              (udp6, socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)):
        threading.Thread(target=udp_echo, args=(sock, level, kind), daemon=True).start()
    print("listening", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
