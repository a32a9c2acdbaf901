"""An HTTP client of the daemon's management API whose sockets are created inside a network
namespace (the API listens on addresses only that namespace reaches)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

from .netns import inside


def in_netns(name: str, fn, *args, **kw):
    """Run fn on a fresh thread inside network namespace `name` (setns affects only the
    calling thread); sockets it creates stay in that namespace. Returns fn's result or
    raises its exception."""
    box: dict = {}

    def target():
        try:
            with inside(name):
                box["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    def parsed(self):
        """The body as JSON, or as text when it is not JSON."""
        text = self.body.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


class NetnsHttp:
    """A minimal HTTP/1.1 client, one connection per request, connecting from inside network
    namespace `ns_name`."""

    def __init__(self, ns_name: str, host: str = "127.0.0.1", port: int = 11022,
                 token: str | None = None, timeout: float = 15):
        self.ns_name, self.host, self.port = ns_name, host, port
        self.token, self.timeout = token, timeout

    def connect(self) -> socket.socket:
        return in_netns(self.ns_name, socket.create_connection, (self.host, self.port),
                        self.timeout)

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                content_type: str | None = "application/json", headers: dict | None = None,
                token: str | None | bool = True) -> Response:
        """`body` is sent as JSON; `raw` as given. `token`: True = the client's, a string,
        or None/False for no Authorization header."""
        hdrs = dict(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None and content_type:
            hdrs.setdefault("Content-Type", content_type)
        tok = self.token if token is True else (token or None)
        if tok:
            hdrs.setdefault("Authorization", f"Bearer {tok}")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.sock = self.connect()
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()

    def get(self, path, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def add(self, body, **kw) -> Response:
        return self.post("/api/service/exposure/add", body, **kw)

    def delete(self, body, **kw) -> Response:
        return self.post("/api/service/exposure/delete", body, **kw)

    def list(self) -> list[dict]:
        r = self.get("/api/service/exposure")
        assert r.status == 200, r
        return r.json["exposures"]

    def raw_exchange(self, data: bytes, read_timeout: float = 5) -> bytes:
        """Send bytes as they are; return what the server answers until it closes or pauses."""
        sock = self.connect()
        sock.settimeout(read_timeout)
        try:
            sock.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
            return b"".join(chunks)
        finally:
            sock.close()


class KeepAliveHttp:
    """A keep-alive HTTP/1.1 client of the management API: one connection, reused. Its socket
    is created inside network namespace `ns_name` (None: the calling thread's own). A failure
    to get a whole answer raises OSError or http.client.HTTPException and drops the
    connection: the request may or may not have been applied. `fresh`: a new connection for
    every request (as curl and most cluster clients do), its connect inside the timing."""

    def __init__(self, host: str = "127.0.0.1", port: int = 11022, token: str | None = None,
                 timeout: float = 10, ns_name: str | None = None, fresh: bool = False):
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.ns_name, self.fresh = ns_name, fresh
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            if self.ns_name is None:
                conn.connect()
            else:
                conn.sock = in_netns(self.ns_name, socket.create_connection,
                                     (self.host, self.port), self.timeout)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn = conn
        return self.conn

    def timed(self, method: str, path: str, body=None) -> tuple[int, dict, float]:
        """(status, JSON body, seconds from sending to the whole answer read); a body that is
        not JSON comes back as {"raw": text}."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.fresh:
            self.close()
        start = time.perf_counter()
        conn = self._connection()
        if not self.fresh:
            start = time.perf_counter()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except BaseException:
            self.close()
            raise
        seconds = time.perf_counter() - start
        if resp.will_close or self.fresh:
            self.close()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"raw": raw.decode(errors="replace")}
        return resp.status, doc, seconds

    def request(self, method: str, path: str, body=None) -> tuple[int, dict]:
        status, doc, _ = self.timed(method, path, body)
        return status, doc

    def add(self, body) -> tuple[int, dict]:
        return self.request("POST", "/api/service/exposure/add", body)

    def delete(self, body) -> tuple[int, dict]:
        return self.request("POST", "/api/service/exposure/delete", body)

    def list(self) -> tuple[int, dict]:
        return self.request("GET", "/api/service/exposure")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False
