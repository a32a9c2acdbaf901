"""Shared pieces of the reliability tests: the soak switch, HTTP clients that live in a
daemon's network namespace, and a workload model (the private mount
namespace and the filesystems mounted in it are in tests/fs.py).

Everything here cleans up after itself: a namespace or process created by a helper is removed
by the same helper's close(), also after a failure."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from gw.lab.netns import enter as enter_netns  # noqa: F401 - the tests' name for it
from gw.lab.http import KeepAliveHttp


#: OAKGW_SOAK=1 runs the long variants (the numbers of issue 8); without it, short CI ones.
SOAK = os.environ.get("OAKGW_SOAK", "") not in ("", "0")


def scaled(ci: int, soak: int) -> int:
    return soak if SOAK else ci


def report(name: str, **figures) -> None:
    """A figure the report quotes: printed (pytest -s / -rA shows it) and appended to
    $OAKGW_FIGURES when that is set."""
    line = f"[figures] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    print(line)
    path = os.environ.get("OAKGW_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# -- network namespaces ---------------------------------------------------------------------

def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?")
    m = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- the workload: disjoint keys per client, a model computed from the answers ---------------

DocKey = tuple[str, str, int]  # (family, protocol, exposed_port)
V4_TARGETS = ("10.30.0.1", "10.30.0.2", "10.30.7.9")
V6_TARGETS = ("fdff:2000::1", "fdff:2000::2")


def doc_of(d: dict) -> tuple:
    return (d["family"], d["protocol"], d["exposed_port"], d["service_ip"], d["service_port"])


def key_of(d: dict) -> DocKey:
    return (d["family"], d["protocol"], d["exposed_port"])


def family_of(ip: str) -> str:
    return "ipv6" if ":" in ip else "ipv4"


@dataclass
class Op:
    method: str
    path: str
    body: dict | None
    expect: int                         # the status the model predicts
    after: dict[DocKey, tuple | None]   # the keys it changes if it succeeds, and to what


class Worker:
    """One client of a storm: owns the exposed ports `ports` (no other worker touches them),
    keeps the model of its keys, and predicts every answer from it."""

    def __init__(self, index: int, ports: range, seed: int, model: dict | None = None):
        self.index = index
        self.ports = ports
        self.rnd = random.Random(seed)
        self.model: dict[DocKey, tuple] = dict(model or {})  # key -> doc tuple
        self.sent = 0
        self.answers: dict[int, int] = {}
        self.unexpected: list[str] = []
        self.in_flight: Op | None = None    # the op whose answer never came

    def owns(self, key: DocKey) -> bool:
        return key[2] in self.ports

    # -- choosing a request

    def _target(self, family: str) -> tuple[str, int]:
        ips = V4_TARGETS if family == "ipv4" else V6_TARGETS
        return self.rnd.choice(ips), self.rnd.choice((80, 443, 8080))

    def _one(self) -> tuple[dict, tuple]:
        family = self.rnd.choice(("ipv4", "ipv4", "ipv6"))
        protocol = self.rnd.choice(("tcp", "tcp", "udp"))
        port = self.rnd.choice(self.ports)
        key = (family, protocol, port)
        current = self.model.get(key)
        if current is not None and self.rnd.random() < 0.5:
            ip, sport = current[3], current[4]           # the same target: 200
        else:
            ip, sport = self._target(family)             # new (201) or maybe a conflict (409)
        body = {"exposed_port": port, "service_ip": ip, "service_port": sport,
                "protocol": protocol}
        if self.rnd.random() < 0.2:
            body["service_id"] = f"c{self.index}-{self.rnd.randrange(1000)}"
        return body, (family, protocol, port, ip, sport)

    def next_op(self) -> Op:
        r = self.rnd.random()
        if r < 0.15:
            return Op("GET", "/api/service/exposure", None, 200, {})
        if r < 0.6:
            body, doc = self._one()
            return self._add_op([body], [doc], batch=False)
        if r < 0.7:
            items, docs, seen = [], [], set()
            for _ in range(self.rnd.randint(2, 4)):
                body, doc = self._one()
                if doc[:3] not in seen:
                    seen.add(doc[:3])
                    items.append(body)
                    docs.append(doc)
            return self._add_op(items, docs, batch=True)
        # delete: a port of ours, one family or both; often one that exists
        keys = list(self.model)
        if keys and self.rnd.random() < 0.75:
            family, protocol, port = self.rnd.choice(keys)
        else:
            family = self.rnd.choice(("ipv4", "ipv6"))
            protocol, port = self.rnd.choice(("tcp", "udp")), self.rnd.choice(self.ports)
        body = {"exposed_port": port, "protocol": protocol}
        families = ("ipv4", "ipv6")
        if self.rnd.random() < 0.6:
            body["family"] = family
            families = (family,)
        gone = {(f, protocol, port): None for f in families if (f, protocol, port) in self.model}
        return Op("POST", "/api/service/exposure/delete", body, 200 if gone else 404, gone)

    def _add_op(self, items: list[dict], docs: list[tuple], batch: bool) -> Op:
        after: dict[DocKey, tuple | None] = {}
        expect = 200
        for doc in docs:
            current = self.model.get(doc[:3])
            if current is None:
                after[doc[:3]] = doc
                expect = 201 if expect != 409 else 409
            elif current[3:] != doc[3:]:
                expect = 409
        if expect == 409:
            after = {}
        body = {"exposures": items} if batch else items[0]
        return Op("POST", "/api/service/exposure/add", body, expect, after)

    # -- running

    def apply(self, op: Op, status: int, answer: dict) -> None:
        self.answers[status] = self.answers.get(status, 0) + 1
        if status != op.expect:
            self.unexpected.append(f"{op.method} {op.path} {json.dumps(op.body)}: "
                                   f"{status} {answer}, the model expected {op.expect}")
            return
        if 200 <= status < 300:
            for key, doc in op.after.items():
                if doc is None:
                    self.model.pop(key, None)
                else:
                    self.model[key] = doc
        if op.method == "GET" and status == 200:
            seen = [doc_of(d) for d in answer["exposures"] if self.owns(key_of(d))]
            if sorted(seen) != sorted(self.model.values()):
                self.unexpected.append(f"list shows {sorted(seen)} for client {self.index}, "
                                       f"the model holds {sorted(self.model.values())}")

    def run(self, client: KeepAliveHttp, requests: int, stop: threading.Event | None = None) -> None:
        """Sends up to `requests` requests, one at a time. On a connection failure it records
        the request in flight and stops (the daemon died)."""
        for _ in range(requests):
            if stop is not None and stop.is_set():
                return
            op = self.next_op()
            self.sent += 1
            try:
                status, answer = client.request(op.method, op.path, op.body)
            except (OSError, http.client.HTTPException):
                self.in_flight = op
                return
            self.apply(op, status, answer)

    def possible(self) -> list[dict[DocKey, tuple]]:
        """The states the daemon may hold for our keys: the model, and the model with the
        request in flight applied (it may have been committed before the answer was lost)."""
        states = [dict(self.model)]
        if self.in_flight is not None and self.in_flight.after:
            other = dict(self.model)
            for key, doc in self.in_flight.after.items():
                if doc is None:
                    other.pop(key, None)
                else:
                    other[key] = doc
            states.append(other)
        return states


def storm(ns_name: str, workers: list[Worker], requests: int, host: str, port: int,
          token: str | None, stop: threading.Event | None = None,
          timeout: float = 20) -> list[threading.Thread]:
    """Starts one thread per worker (each in the namespace, with its own keep-alive
    connection); returns the threads (join them)."""
    threads = []
    for w in workers:
        def target(w=w):
            enter_netns(ns_name)
            client = KeepAliveHttp(host, port, token, timeout=timeout)
            try:
                w.run(client, requests, stop)
            finally:
                client.close()
        t = threading.Thread(target=target, name=f"client-{w.index}", daemon=True)
        t.start()
        threads.append(t)
    return threads


def split_by_worker(docs: set[tuple], workers: list[Worker]) -> list[dict[DocKey, tuple]]:
    out = [dict() for _ in workers]
    for doc in docs:
        for i, w in enumerate(workers):
            if w.owns(doc[:3]):
                out[i][doc[:3]] = doc
                break
        else:
            raise AssertionError(f"{doc} belongs to no client")
    return out


# -- processes ------------------------------------------------------------------------------

def freeze(pid: int) -> None:
    """SIGSTOP and wait until every thread of `pid` (our child) has stopped: no system call
    of it is in flight any more."""
    os.kill(pid, signal.SIGSTOP)
    os.waitpid(pid, os.WUNTRACED)


def children(pid: int) -> list[int]:
    """The children of every thread of `pid`."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            found += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@dataclass
class Timer:
    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def summary(self) -> str:
        if not self.samples:
            return "none"
        s = sorted(self.samples)
        return (f"n={len(s)} min={s[0] * 1000:.0f}ms median={s[len(s) // 2] * 1000:.0f}ms "
                f"max={s[-1] * 1000:.0f}ms")
