"""A small client of etcd's v3 JSON gateway (``/v3/``), over requests.

Only what the store needs: range, txn, watch, compaction. Keys and values are bytes on our
side and base64 in the gateway's JSON; int64 fields come back as strings and default values
(a false ``succeeded``, an empty list) are left out, which the accessors here absorb.

A request goes to the endpoints in turn until one answers; etcd's own refusals (no leader, a
timed-out proposal, a compacted revision) come back as `EtcdError` with etcd's message, and
an endpoint that cannot be reached at all as `EtcdUnreachable`.

The watch asks for ``hasleader`` (gRPC metadata, sent as a ``Grpc-Metadata-`` header through
the gateway): a member cut off from the leader ends such a watch instead of keeping it open
and silent, so a gateway behind a partition learns that it is behind. That covers a watch on
the gateway's own member; one on a member across a link that died sees nothing at all, so the
connections carry TCP keepalives that end them within seconds of the link's death.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection


class EtcdError(Exception):
    """etcd answered, and refused (its own message)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code


class EtcdUnreachable(EtcdError):
    """No endpoint answered."""


class WatchEnded(EtcdError):
    """The watch stream ended or was cancelled (no leader, a member going away)."""


class WatchIdle(WatchEnded):
    """Nothing came for the idle timeout: nothing was lost, the watch may resume where it was."""


class Compacted(WatchEnded):
    """The watch's start revision is compacted: the watcher must read the whole prefix again."""

    def __init__(self, revision: int):
        super().__init__(f"revision compacted (compact revision {revision})")
        self.revision = revision


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that covers every key starting with `prefix` (etcd's rule: the prefix
    with its last byte below 0xff incremented, the bytes after it dropped)."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"  # all keys


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int

    @classmethod
    def of(cls, kv: dict) -> KeyValue:
        return cls(unb64(kv.get("key")), unb64(kv.get("value")),
                   int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)))


@dataclass(frozen=True)
class Event:
    """A put (value set) or a delete (`deleted`) of `kv.key` at `kv.mod_revision`."""
    kv: KeyValue
    deleted: bool


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int                       # the store's revision after the transaction
    ranges: list[list[KeyValue]]        # the kvs of each range among the responses, in order


# -- building requests (pure) -------------------------------------------------------------

def absent(key: bytes) -> dict:
    """Compare: `key` does not exist (create_revision == 0)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def unchanged(key: bytes, mod_revision: int) -> dict:
    """Compare: `key` was last written at `mod_revision`."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL",
            "mod_revision": str(mod_revision)}


def put(key: bytes, value: bytes) -> dict:
    return {"request_put": {"key": b64(key), "value": b64(value)}}


def delete(key: bytes) -> dict:
    return {"request_delete_range": {"key": b64(key)}}


def get(key: bytes) -> dict:
    return {"request_range": {"key": b64(key)}}


def txn_body(compare: Sequence[dict], success: Sequence[dict], failure: Sequence[dict]) -> dict:
    return {"compare": list(compare), "success": list(success), "failure": list(failure)}


def txn_result(answer: dict) -> TxnResult:
    ranges = [[KeyValue.of(kv) for kv in r["response_range"].get("kvs", ())]
              for r in answer.get("responses", ()) if "response_range" in r]
    return TxnResult(bool(answer.get("succeeded", False)),
                     int(answer.get("header", {}).get("revision", 0)), ranges)


def watch_message(line: bytes) -> tuple[int, list[Event]]:
    """One line of the watch stream: (header revision, events); raises WatchEnded or
    Compacted for a message that ends the watch."""
    try:
        message = json.loads(line)
    except ValueError:
        raise WatchEnded(f"the watch sent something that is not JSON: {line[:200]!r}") from None
    if "error" in message:
        error = message["error"]
        raise WatchEnded(error.get("message") or str(error), error.get("grpc_code"))
    result = message.get("result", {})
    if result.get("compact_revision") not in (None, "0"):
        raise Compacted(int(result["compact_revision"]))
    if result.get("canceled"):
        raise WatchEnded(f"the watch was cancelled: {result.get('cancel_reason') or 'no reason'}")
    events = [Event(KeyValue.of(e["kv"]), e.get("type") == "DELETE")
              for e in result.get("events", ())]
    return int(result.get("header", {}).get("revision", 0)), events


def failure_reason(error: BaseException) -> str:
    """What an operator can act on from a failed request: for TLS, the verification's own
    reason (requests wraps it two or three levels deep); else the error's kind."""
    seen: object = error
    for _ in range(8):
        if isinstance(seen, ssl.SSLError):
            why = getattr(seen, "verify_message", None) or seen.reason or str(seen)
            return f"TLS: {why}"
        inner = getattr(seen, "reason", None)
        if not isinstance(inner, BaseException):
            args = getattr(seen, "args", ())
            inner = next((a for a in args if isinstance(a, BaseException)), None)
        if inner is None:
            break
        seen = inner
    return type(error).__name__


def system_cas() -> str | bool:
    """The system's CA bundle (OpenSSL's default file), which requests would not use on its
    own (it brings its own); True (requests' bundle) where there is none."""
    path = ssl.get_default_verify_paths().openssl_cafile
    return path if os.path.exists(path) else True


# -- the client (I/O) ----------------------------------------------------------------------

# A probe after 1 s of silence, then every second; three unanswered end the connection. And
# data not acknowledged for 4 s ends it too (a request sent into a dead link).
KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
             (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1),
             (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
             (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
             (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), 4000)]


class _KeepAliveAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kw):
        kw["socket_options"] = [*HTTPConnection.default_socket_options, *KEEPALIVE]
        super().init_poolmanager(*args, **kw)


class EtcdClient:
    """Thread-safe: each thread has its own HTTP session (connection reuse without sharing)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 2.0,
                 ca_file: str = "", cert_file: str = "", key_file: str = ""):
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._verify: bool | str = ca_file or system_cas()
        self._cert = (cert_file, key_file) if cert_file else None
        self._local = threading.local()
        self._preferred = 0

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            # [store] alone says how to reach etcd: the environment's proxies and CA bundle
            # (REQUESTS_CA_BUNDLE overrides a session's own CA otherwise) do not apply.
            session.trust_env = False
            session.verify, session.cert = self._verify, self._cert
            adapter = _KeepAliveAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        return session

    def _order(self) -> list[str]:
        first = self._preferred
        return self.endpoints[first:] + self.endpoints[:first]

    def call(self, path: str, body: dict, timeout: float | None = None) -> dict:
        failures = []
        for endpoint in self._order():
            try:
                response = self._session().post(f"{endpoint}/v3/{path}", json=body,
                                                timeout=timeout or self.timeout)
            except requests.RequestException as e:
                failures.append(f"{endpoint}: {failure_reason(e)}")
                continue
            self._preferred = self.endpoints.index(endpoint)
            try:
                answer = response.json()
            except ValueError:
                raise EtcdError(f"{endpoint} answered {response.status_code} without JSON") \
                    from None
            if response.status_code != 200 or "error" in answer:
                message = answer.get("error") or answer.get("message") or str(answer)
                raise EtcdError(f"etcd at {endpoint}: {message}", answer.get("code"))
            return answer
        raise EtcdUnreachable(f"no etcd endpoint answered ({'; '.join(failures)})")

    def range(self, key: bytes, range_end: bytes | None = None, *,
              revision: int = 0) -> tuple[int, list[KeyValue]]:
        """(the store's revision, the kvs) of a linearizable read (quorum needed)."""
        body = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if revision:
            body["revision"] = str(revision)
        answer = self.call("kv/range", body)
        return (int(answer.get("header", {}).get("revision", 0)),
                [KeyValue.of(kv) for kv in answer.get("kvs", ())])

    def txn(self, compare: Sequence[dict], success: Sequence[dict],
            failure: Sequence[dict] = ()) -> TxnResult:
        return txn_result(self.call("kv/txn", txn_body(compare, success, failure)))

    def compact(self, revision: int) -> None:
        self.call("kv/compaction", {"revision": str(revision), "physical": True})

    def watch(self, prefix: bytes, start_revision: int, *,
              idle_timeout: float = 30.0) -> Iterator[tuple[int, list[Event]]]:
        """(header revision, events) as they come, from `start_revision` on, over the prefix.
        Ends by raising: WatchEnded (the stream ended or was cancelled), WatchIdle (quiet for
        `idle_timeout`), Compacted, or EtcdUnreachable."""
        body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                   "start_revision": str(start_revision),
                                   "progress_notify": True}}
        failures = []
        for endpoint in self._order():
            try:
                response = self._session().post(
                    f"{endpoint}/v3/watch", json=body, stream=True,
                    headers={"Grpc-Metadata-hasleader": "true"},
                    timeout=(self.timeout, idle_timeout))
            except requests.RequestException as e:
                failures.append(f"{endpoint}: {failure_reason(e)}")
                continue
            with response:
                try:
                    for line in response.iter_lines():
                        if line:
                            yield watch_message(line)
                except requests.RequestException as e:
                    if "timed out" in str(e):
                        raise WatchIdle(f"the watch on {endpoint} was quiet") from None
                    raise WatchEnded(f"the watch on {endpoint} broke: {type(e).__name__}") \
                        from None
            raise WatchEnded(f"the watch on {endpoint} ended")
        raise EtcdUnreachable(f"no etcd endpoint answered ({'; '.join(failures)})")
