"""Failover of a real gateway pair under traffic (tests/ha/pairlab.py): keepalived moves the
floating addresses, conntrackd has already written the master's flows into the backup's kernel,
and the backup's daemon holds the same table (etcd). While a long-lived TCP connection
exchanges a line every 50 ms and a UDP exchange runs through the public address, the master
dies (its links cut at the far end) and comes back (failback), round after round: the TCP
connection goes on without a reset, UDP answers resume, new connections work through the new
master. The times are reported (median and max): they are measured, not asserted, as this
machine is shared and noisy (tests/bench holds speed targets)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from gw.lab.netns import stop_process
from gw.lab.topology import ECHO_PORT
from tests.helpers import wait_for

from .pairlab import (CLIENT_V4, CLIENT_V6, PUBLIC_V4, PUBLIC_V6, ROOT, SERVICE_V4, SERVICE_V6,
                      PairLab)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ROUNDS = int(os.environ.get("OAKGW_FAILOVER_ROUNDS", "20"))
ECHO, UDP, HTTP = 8007, 8053, 8080
EVERY = 0.05


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with PairLab(tmp_path_factory.mktemp("pair")) as lab:
        lab.start()
        http = lab.a.daemon.http()
        for port, protocol, target, service in ((ECHO, "tcp", 7, SERVICE_V4),
                                                 (UDP, "udp", 53, SERVICE_V4),
                                                 (HTTP, "tcp", 80, SERVICE_V4),
                                                 (HTTP, "tcp", 80, SERVICE_V6)):
            r = http.add({"exposed_port": port, "protocol": protocol,
                          "service_ip": service, "service_port": target})
            assert r.status == 201, r
        # B follows the table: its kernel holds the exposures before anything fails.
        wait_for(lambda: all(f"{p}" in lab.b.ns.run("nft", "list", "map", "inet", "oakestra_gw",
                                                     "expose_v4").stdout
                             for p in (ECHO, UDP, HTTP)),
                 timeout=30, what="B's kernel holds the exposures", log=lab.logs)
        wait_for(lambda: f"{HTTP}" in lab.b.ns.run("nft", "list", "map", "inet", "oakestra_gw",
                                                   "expose_v6").stdout,
                 timeout=30, what="B's kernel holds the IPv6 exposure", log=lab.logs)
        yield lab


class Stream:
    """A long-lived TCP connection, by default from the client through the public address: a
    numbered line every 50 ms, each echoed back by an echo service (the worker's). Records
    when each answer came and any error (a reset ends it)."""

    def __init__(self, lab: PairLab, ns=None, to: tuple[str, int] = (PUBLIC_V4, ECHO)):
        self.sock = (ns or lab.client).socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(to)
        self.sock.settimeout(None)
        self.sent = 0
        self.answers: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._buffer = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        while not self._stop.is_set() and self.error is None:
            try:
                self.sock.sendall(f"{self.sent}\n".encode())
            except OSError as e:
                self.error = f"send: {e}"
                return
            self.sent += 1
            time.sleep(EVERY)

    def _read(self) -> None:
        expected = 0
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except OSError as e:
                if not self._stop.is_set():
                    self.error = f"recv: {e}"
                return
            if not data:
                if not self._stop.is_set():
                    self.error = "the connection was closed"
                return
            self._buffer += data
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if int(line) != expected:
                    self.error = f"answer {line!r} where {expected} was due"
                    return
                expected += 1
                self.answers.append(time.monotonic())

    def longest_gap(self, since: float) -> float:
        times = [since] + [t for t in self.answers if t >= since]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def answered_after(self, t: float) -> bool:
        return any(a > t for a in self.answers[-50:])

    def answers_lines_sent_from_now(self, lines: int = 5) -> Callable[[], bool]:
        """Whether the lines sent from now on (the next `lines`) have been answered: not only
        answers that were on their way before (a stalled connection has those too)."""
        due = self.sent + lines
        return lambda: len(self.answers) >= due

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


class UdpExchange:
    """A datagram every 50 ms to the public address; the worker's UDP echo answers each."""

    def __init__(self, lab: PairLab):
        self.sock = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((PUBLIC_V4, UDP))
        self.sock.settimeout(EVERY)
        self.answers: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                self.sock.send(f"ping {n}".encode())
                if self.sock.recv(2048).startswith(b"echo ping"):
                    self.answers.append(time.monotonic())
            except OSError:
                pass  # a timeout, or a refusal while no gateway holds the address
            n += 1
            time.sleep(max(0.0, sent + EVERY - time.monotonic()))

    def answered_after(self, t: float) -> bool:
        return any(a > t for a in self.answers[-50:])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def new_connection_works(lab: PairLab, family: int = socket.AF_INET) -> bool:
    sock = lab.client.socket(family, socket.SOCK_STREAM)
    sock.settimeout(0.25)
    try:
        sock.connect((PUBLIC_V4 if family == socket.AF_INET else PUBLIC_V6, HTTP))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return sock.recv(64).startswith(b"HTTP/1.0 200")
    except OSError:
        return False
    finally:
        sock.close()


def until_new_connections_work(lab: PairLab, since: float,
                               family: int = socket.AF_INET) -> float:
    wait_for(lambda: new_connection_works(lab, family), timeout=60, interval=0.01,
             what=f"a new connection through the public address ({family.name})", log=lab.logs)
    return time.monotonic() - since


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms")


def test_failover_and_failback_under_traffic(pair, record_property):
    lab = pair
    assert new_connection_works(lab) and new_connection_works(lab, socket.AF_INET6)
    stream, udp = Stream(lab), UdpExchange(lab)
    failover, failback, gaps = [], [], []
    failover_v6, failback_v6 = [], []
    try:
        wait_for(lambda: len(stream.answers) > 5 and len(udp.answers) > 5, timeout=10,
                 what="traffic flows through A", log=lab.logs)
        for round_ in range(ROUNDS):
            t0 = time.monotonic()
            lab.cut(lab.a)
            failover.append(until_new_connections_work(lab, t0))
            failover_v6.append(until_new_connections_work(lab, t0, socket.AF_INET6))
            wait_for(lambda: lab.b.role() == "master", timeout=30, what="B master",
                     log=lab.logs)
            answered = stream.answers_lines_sent_from_now()
            t_master = time.monotonic()
            wait_for(lambda: answered() and udp.answered_after(t_master),
                     timeout=30, what=f"round {round_}: the old flows answer through B",
                     log=lambda: f"stream error {stream.error}\n{lab.logs()}")
            assert stream.error is None, stream.error
            assert lab.b.holds_public_address() and lab.a.role() != "master"
            gaps.append(stream.longest_gap(t0))

            t1 = time.monotonic()
            lab.heal(lab.a)
            lab.wait_roles("master", "backup")
            failback.append(until_new_connections_work(lab, t1))
            failback_v6.append(until_new_connections_work(lab, t1, socket.AF_INET6))
            t2 = time.monotonic()
            wait_for(lambda: stream.answered_after(t2) and udp.answered_after(t2), timeout=30,
                     what=f"round {round_}: the old flows answer through A again",
                     log=lambda: f"stream error {stream.error}\n{lab.logs()}")
            assert stream.error is None, stream.error
            assert lab.a.holds_public_address() and not lab.b.holds_public_address()
            gaps.append(stream.longest_gap(t1))
    finally:
        stream.close()
        udp.close()
    record_property("failover_new_connections_s", failover)
    record_property("failback_new_connections_s", failback)
    record_property("failover_new_connections_v6_s", failover_v6)
    record_property("failback_new_connections_v6_s", failback_v6)
    record_property("longest_gap_s", max(gaps))
    print(f"\n{ROUNDS} rounds: new connections through B after the master died: "
          f"{summary(failover)}; A master again and serving after its return (it waits "
          f"preempt_delay as backup first): {summary(failback)}; IPv6 new connections after "
          f"the failover {summary(failover_v6)}, after the failback {summary(failback_v6)}; "
          f"longest gap on the old TCP connection "
          f"{max(gaps) * 1000:.0f} ms; {stream.sent} lines sent, {len(stream.answers)} "
          f"answered, {len(udp.answers)} UDP answers")
    assert len(stream.answers) >= stream.sent - 2  # the last lines may still be on their way


def test_the_masters_daemon_killed_no_failover_and_traffic_goes_on(pair):
    """The kernel holds the table and keepalived the addresses: a daemon that dies is no node
    failure. It comes back knowing its role (the role file)."""
    lab = pair
    lab.wait_roles("master", "backup")
    stream = Stream(lab)
    try:
        wait_for(lambda: len(stream.answers) > 5, timeout=10, what="the stream flows")
        lab.a.daemon.kill()
        t0 = time.monotonic()
        wait_for(lambda: stream.answered_after(t0) and new_connection_works(lab), timeout=30,
                 what="traffic through A with its daemon dead", log=lab.logs)
        assert lab.a.holds_public_address() and not lab.b.holds_public_address()
        assert lab.b.role() == "backup"
        lab.a.daemon.start()
        assert lab.a.role() == "master"
        assert stream.error is None, stream.error
    finally:
        stream.close()


def seen_as(lab: PairLab, to: str) -> str | None:
    """The address the client's echo service sees a new connection from the worker come from
    (None: no answer)."""
    family = socket.AF_INET6 if ":" in to else socket.AF_INET
    sock = lab.worker.socket(family, socket.SOCK_STREAM)
    sock.settimeout(0.5)
    try:
        sock.connect((to, ECHO_PORT))
        sock.sendall(b"WHOAMI\n")
        return json.loads(sock.makefile().readline())["peer"]
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def test_egress_leaves_with_the_floating_address_and_survives_a_failover(pair):
    """A service's connection out to the Internet (egress) leaves with the pair's floating
    public address, not the master node's own: the copy of its NAT binding that conntrackd
    gave the backup then still fits after a failover (the answers come to the address that
    moved), and the connection goes on through the new master, and back."""
    lab = pair
    lab.wait_roles("master", "backup")
    echo = lab.client.popen(sys.executable, "-m", "gw.lab", "serve", "client",
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT)
    stream = None
    try:
        assert echo.stdout.readline().strip() == "listening"
        assert seen_as(lab, CLIENT_V4) == PUBLIC_V4
        assert seen_as(lab, CLIENT_V6) == PUBLIC_V6
        stream = Stream(lab, lab.worker, (CLIENT_V4, ECHO_PORT))
        wait_for(lambda: len(stream.answers) > 5, timeout=10, what="the egress stream flows")
        t0 = time.monotonic()
        lab.cut(lab.a)
        wait_for(lambda: lab.b.role() == "master", timeout=30, what="B master", log=lab.logs)
        wait_for(stream.answers_lines_sent_from_now(), timeout=30,
                 what="the egress connection answers through B",
                 log=lambda: f"stream error {stream.error}\n{lab.logs()}")
        assert stream.error is None, stream.error
        assert seen_as(lab, CLIENT_V4) == PUBLIC_V4
        t1 = time.monotonic()
        lab.heal(lab.a)
        lab.wait_roles("master", "backup")
        wait_for(stream.answers_lines_sent_from_now(), timeout=30,
                 what="the egress connection answers through A again",
                 log=lambda: f"stream error {stream.error}\n{lab.logs()}")
        assert stream.error is None, stream.error
        assert len(stream.answers) >= stream.sent - 2
    finally:
        if stream is not None:
            stream.close()
        stop_process(echo)


def test_conntrackd_leaves_the_gateways_own_etcd_connections_alone(pair):
    """conntrackd syncs the flows that must survive a failover, not a gateway's own traffic to
    the etcd members: a connection of A's to its member or the witness's is A's alone, and in
    B's kernel its copy would only churn with every message of the watch."""
    lab = pair
    own = {name: m.address for name, m in lab.cluster.members.items()}
    time.sleep(1)  # a second of the watches' and the members' traffic, synced or not
    copied = lab.b.ns.run("conntrack", "-L", "-s", own["m1"], check=False).stdout.splitlines()
    # B's own flows with A's address as the source are those of A's member to B's.
    foreign = [line for line in copied if f"dst={own['m2']} " not in line.split("src=", 2)[1]]
    assert foreign == []


class AddressWatch:
    """Samples, every 20 ms, which gateways hold the public floating address."""

    def __init__(self, lab: PairLab):
        self.lab, self.samples = lab, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.lab.a.holds_public_address(),
                                 self.lab.b.holds_public_address()))
            time.sleep(0.02)

    def stop(self) -> list[tuple[bool, bool]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def test_keepalived_restarted_on_the_backup_or_reloaded_on_the_master_moves_nothing(pair):
    lab = pair
    lab.wait_roles("master", "backup")
    watch = AddressWatch(lab)
    try:
        lab.b.stop_keepalived()
        lab.b.start_keepalived()
        wait_for(lambda: lab.b.role() == "backup" and "Entering BACKUP" in
                 (lab.b.state / "keepalived.log").read_text().rsplit("Starting Keepalived", 1)[1],
                 timeout=30, what="B's new keepalived is backup", log=lab.logs)
        before = (lab.a.state / "notify.log").read_text().count("reading keepalived's")
        lab.a.keepalived.send_signal(signal.SIGHUP)
        wait_for(lambda: (lab.a.state / "notify.log").read_text().count("reading keepalived's")
                 > before and lab.a.role() == "master", timeout=30,
                 what="A reloaded, told master again", log=lab.logs)
        time.sleep(1)  # a second of samples after the reload: a flap would show in them
    finally:
        samples = watch.stop()
    assert len(samples) > 20
    assert all(a and not b for a, b in samples), [s for s in samples if s != (True, False)][:5]
