"""The flows of exposures that come and go (issue 12, items 3 and 5), with the real daemon in
the lab and real connections from the client namespace.

- Orphan flows: a flow our table DNATed that no current exposure explains is removed at start
  and after every repair, whatever lost its flush (a crash between the kernel commit and the
  flush, a SIGTERM with flushes queued, an element someone else added while the daemon was
  down). One conntrack dump finds them all.
- Delete then re-add: the flush of the deleted exposure must not cut the flows opened through
  it after the re-add, also when the flush is already running."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from gw import lab as L
from gw.daemon.faults import CRASH_ENV, CRASH_EXIT, SLOW_FLUSH_ENV
from tests.helpers import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PUBLIC = (L.GATEWAY_V4, L.GATEWAY_V6)
CUT_WITHIN = 2.0  # seconds: a generous deadline that only catches a flow that lives on
ADD, DELETE = "/api/service/exposure/add", "/api/service/exposure/delete"


def echo_exposures(port: int) -> list[dict]:
    return [{"exposed_port": port, "service_ip": svc, "service_port": L.ECHO_PORT}
            for svc in (L.SERVICE_V4, L.SERVICE_V6)]


def request(daemon, path: str, body, expect: int) -> dict:
    status, answer = daemon.request("POST", path, body)
    assert status == expect, answer
    return answer


def connections(lab, port: int) -> list:
    conns = [L.tcp_connect(lab, "client", public, port, timeout=1) for public in PUBLIC]
    for conn in conns:
        assert L.tcp_echo(conn, b"hello") == b"hello\n"
    return conns


def alive(conn) -> bool:
    try:
        return L.tcp_echo(conn, b"still there?") == b"still there?\n"
    except OSError:  # reset by the gateway host (nothing DNATs the flow any more) or silent
        return False


def answered(flow: L.UdpFlow) -> bool:
    try:
        reply = flow.exchange(b"ping", timeout=0.5)
    except ConnectionRefusedError:  # the gateway host itself said: no such port
        return False
    return reply is not None and reply.startswith(b"echo ping")


def test_a_delete_lost_to_a_crash_before_its_flush_is_flushed_at_the_next_start():
    with L.Lab() as lab:
        lab.start_services()
        # Its second change of exposures (the delete) dies after the kernel commit, so its
        # flush is never queued.
        daemon = L.lab_daemon(lab).start(env={CRASH_ENV: "after-kernel:2"})
        request(daemon, ADD, {"exposures": echo_exposures(7007) + echo_exposures(7008)}, 201)
        doomed, kept = connections(lab, 7007), connections(lab, 7008)
        try:
            with pytest.raises((OSError, http.client.HTTPException)):
                daemon.request("POST", DELETE, {"exposed_port": 7007})
            assert daemon.wait_exit() == CRASH_EXIT
            lab.forget(daemon.proc)
            for conn in doomed:  # the elements are gone, the flows are not
                assert alive(conn)

            daemon.start()
            for conn in doomed:
                wait_for(lambda: not alive(conn), timeout=CUT_WITHIN,
                         what="the orphan connection cut", log=daemon.log_tail)
            for conn in kept:
                assert alive(conn), "a flow of an exposure that exists was cut"
        finally:
            for conn in doomed + kept:
                conn.close()
        assert daemon.stop() == 0, daemon.log_tail()


def test_a_flow_through_an_element_added_while_the_daemon_was_stopped_is_cut_at_start():
    with L.Lab() as lab:
        lab.start_services()
        daemon = L.lab_daemon(lab).start()
        request(daemon, ADD, {"exposed_port": 5353, "service_ip": L.SERVICE_V4,
                              "service_port": L.UDP_PORT, "protocol": "udp"}, 201)
        assert daemon.stop() == 0
        lab.run("gateway", "nft", "add element inet oakestra_gw expose_v4 "
                                  f"{{ udp . 5300 : {L.SERVICE_V4} . {L.UDP_PORT} }}")
        foreign = L.UdpFlow(lab, "client", L.GATEWAY_V4, 5300)
        kept = L.UdpFlow(lab, "client", L.GATEWAY_V4, 5353)
        try:
            assert answered(foreign) and answered(kept)
            daemon.start()
            wait_for(lambda: not answered(foreign), timeout=CUT_WITHIN,
                     what="the flow through the foreign element cut", log=daemon.log_tail)
            assert answered(kept)
        finally:
            foreign.close()
            kept.close()
        assert daemon.stop() == 0, daemon.log_tail()


def test_a_flow_through_a_foreign_element_is_cut_by_the_repair():
    with L.Lab() as lab:
        lab.start_services()
        # No drift watcher: the flow gets going before the repair, which SIGHUP starts.
        daemon = L.lab_daemon(lab).start(env={"OAKESTRA_GW_DRIFT_WATCH": "0"})
        lab.run("gateway", "nft", "add element inet oakestra_gw expose_v6 "
                                  f"{{ udp . 5300 : {L.SERVICE_V6} . {L.UDP_PORT} }}")
        foreign = L.UdpFlow(lab, "client", L.GATEWAY_V6, 5300)
        try:
            assert answered(foreign)
            daemon.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: not answered(foreign), timeout=CUT_WITHIN,
                     what="the flow through the foreign element cut", log=daemon.log_tail)
        finally:
            foreign.close()
        assert daemon.stop() == 0, daemon.log_tail()


def flushes(daemon) -> int:
    return daemon.log_path.read_text(errors="replace").count("conntrack: removed")


def slow_flush(delay: float = 0.5) -> dict[str, str]:
    """The daemon's environment that makes each flush start `delay` seconds late: what a flush
    looks like on a loaded node, made certain rather than likely."""
    return {SLOW_FLUSH_ENV: str(delay)}


def recorded_conntrack(directory: Path) -> tuple[dict[str, str], Path]:
    """The daemon's environment with a `conntrack` first in PATH that writes its arguments to
    a file, then runs the real one; and that file."""
    directory.mkdir(parents=True, exist_ok=True)
    calls = directory / "calls"
    wrapper = directory / "conntrack"
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                       f"exec {shutil.which('conntrack')} \"$@\"\n")
    wrapper.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"}, calls


def test_the_flush_of_deletes_starts_no_process(tmp_path):
    """Deletes of exposures with open flows (IPv4 and IPv6): their flows are cut, and no
    process was started for it (the start's sweep may run the conntrack tool once)."""
    with L.Lab() as lab:
        lab.start_services()
        env, calls = recorded_conntrack(tmp_path / "bin")
        daemon = L.lab_daemon(lab).start(env=env)
        at_start = calls.read_text().splitlines() if calls.exists() else []
        for port in (7200, 7201, 7202):
            request(daemon, ADD, {"exposures": echo_exposures(port)}, 201)
        conns = [c for port in (7200, 7201) for c in connections(lab, port)]
        kept = connections(lab, 7202)
        done = flushes(daemon)
        for port in (7200, 7201):
            request(daemon, DELETE, {"exposed_port": port}, 200)
        wait_for(lambda: flushes(daemon) > done, timeout=10, what="the flushes",
                 log=daemon.log_tail)
        wait_for(lambda: not any(alive(c) for c in conns), timeout=CUT_WITHIN,
                 what="the deleted exposures' flows cut", log=daemon.log_tail)
        assert all(alive(c) for c in kept), "a flow of an exposure kept was cut"
        since = (calls.read_text().splitlines() if calls.exists() else [])[len(at_start):]
        assert since == [], f"the deletes started conntrack: {since}"
        for c in conns + kept:
            c.close()
        assert daemon.stop() == 0, daemon.log_tail()


class Download:
    """A large HTTP download through the exposure, read at a steady pace by a thread of its
    own: the service keeps sending, so its segments are in flight whenever a flush removes
    the flow's entry (a client that speaks first would just get its flow NATed anew on its
    next packet). Cut means reset or closed before the end."""

    def __init__(self, lab, public: str, port: int):
        self.sock = L.tcp_connect(lab, "client", public, port, timeout=2)
        self.sock.sendall(b"GET /bytes/1000000000 HTTP/1.0\r\n\r\n")
        self.error: str | None = None
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._stop.wait(0.002):
                data = self.sock.recv(16384)
                if not data:
                    self.error = f"closed by the peer after {self.received} bytes"
                    return
                self.received += len(data)
        except OSError as exc:
            self.error = f"{type(exc).__name__} after {self.received} bytes"

    def stop(self) -> str | None:
        """Stop reading; the error that cut it, if any."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return self.error


def test_a_delete_and_an_immediate_re_add_keep_the_flows_opened_after_it(tmp_path):
    """The flush of a delete starts at once and takes a while; the re-add and the new
    downloads come while it runs. Three cycles, four new downloads each (IPv4 and IPv6)."""
    with L.Lab() as lab:
        lab.start_services()
        daemon = L.lab_daemon(lab).start(env=slow_flush())
        http = [{"exposed_port": 8080, "service_ip": svc, "service_port": L.HTTP_PORT}
                for svc in (L.SERVICE_V4, L.SERVICE_V6)]
        request(daemon, ADD, {"exposures": http}, 201)
        cut, opened = [], 0
        for cycle in range(3):
            before = [Download(lab, public, 8080) for public in PUBLIC]
            done = flushes(daemon)
            request(daemon, DELETE, {"exposed_port": 8080}, 200)
            request(daemon, ADD, {"exposures": http}, 201)
            fresh = [Download(lab, public, 8080) for _ in range(2) for public in PUBLIC]
            opened += len(fresh)
            wait_for(lambda: flushes(daemon) > done, timeout=10,
                     what="the delete's flush done", log=daemon.log_tail)
            # Still going a while after the flush.
            progress = [d.received for d in fresh]
            wait_for(lambda: all(d.received > n or d.error for d, n in zip(fresh, progress)),
                     timeout=5, what="the downloads going on after the flush")
            cut += [(cycle, error) for d in fresh if (error := d.stop())]
            for d in before:
                d.stop()
        assert not cut, f"{len(cut)} of {opened} downloads begun after a re-add were cut: {cut}"
        assert daemon.stop() == 0, daemon.log_tail()
