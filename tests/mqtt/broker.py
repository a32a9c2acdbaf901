"""Debian's mosquitto in a namespace of the lab (the cluster's broker), and the cluster's side
of the conversation spoken with mosquitto_pub and mosquitto_sub (clients nobody here wrote)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

from gw import lab as L
from gw.lab.certs import LabCA
from tests.helpers import wait_for

BROKER_IP = L.SERVICE_V4   # in the worker namespace, reached by the gateway through the tunnel
NODE_ID = "node-7f3a"      # the gateway node's id, as Oakestra names nodes in topics

needs_mosquitto = shutil.which("mosquitto") and shutil.which("mosquitto_pub")


def topic(name: str, node_id: str = NODE_ID) -> str:
    return f"nodes/{node_id}/net/gateway/{name}"


class Broker:
    """mosquitto listening on BROKER_IP:port in `role`'s namespace, with persistence (so a
    restart keeps sessions and queued messages, as the cluster's broker does on a volume)."""

    def __init__(self, lab: L.Lab, port: int = 10003, role: str = "worker", *,
                 users: dict[str, str] | None = None, tls: bool = False):
        self.lab, self.port, self.role = lab, port, role
        self.dir = Path(lab.dir) / f"mosquitto-{port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users = users or {}
        self.proc: subprocess.Popen | None = None
        lines = [f"listener {port} {BROKER_IP}", "user root", "persistence true",
                 f"persistence_location {self.dir}/", f"log_dest file {self.dir}/broker.log",
                 "log_type all", "max_queued_messages 10000"]
        if self.users:
            passwd = self.dir / "passwd"
            passwd.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password],
                               check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines += ["allow_anonymous true"]
        self.tls = tls
        if tls:
            ca = LabCA.create(self.dir)
            server = ca.issue("server", ip=BROKER_IP)
            self.ca = ca.cert
            lines += [f"cafile {self.ca}", f"certfile {server.cert}", f"keyfile {server.key}"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{BROKER_IP}:{self.port}"

    def start(self) -> "Broker":
        self.proc = self.lab.popen(self.role, "mosquitto", "-c", str(self.conf),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._listening, 10, f"mosquitto on port {self.port}", log=self.log)
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
        out = self.lab.run(self.role, "ss", "-Hltn", f"sport = :{self.port}").stdout
        return bool(out.strip())

    def stop(self) -> None:
        if self.proc is not None:
            L.stop_process(self.proc)
            self.lab.forget(self.proc)
            self.proc = None

    def log(self) -> str:
        try:
            return "\n".join((self.dir / "broker.log").read_text().splitlines()[-20:])
        except OSError:
            return "(no broker log)"

    # -- the cluster's side -------------------------------------------------------------------

    def _auth(self, user: str | None) -> list[str]:
        tls = ["--cafile", str(self.ca)] if self.tls else []
        if user is None:
            return tls
        return [*tls, "-u", user, "-P", self.users[user]]

    def pub(self, name: str, payload, *, user: str | None = None, check: bool = True,
            node_id: str = NODE_ID) -> subprocess.CompletedProcess:
        """mosquitto_pub at QoS 1, as the cluster's service manager publishes."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        return self.lab.run(self.role, "mosquitto_pub", "-h", BROKER_IP, "-p", str(self.port),
                            "-q", "1", "-t", topic(name, node_id), "-m", text,
                            *self._auth(user), check=check)

    def sub(self, name: str, *, user: str | None = None) -> "Subscription":
        return Subscription(self, topic(name), self._auth(user))


class Subscription:
    """mosquitto_sub on one topic, running until closed; `messages` are the JSON payloads."""

    def __init__(self, broker: Broker, topic_name: str, auth: list[str]):
        self.topic = topic_name
        self.lines: list[str] = []
        self.debug: list[str] = []
        self._subscribed = threading.Event()
        # stdbuf: a piped mosquitto_sub would hold its lines in the stdio buffer.
        self.proc = broker.lab.popen(broker.role, "stdbuf", "-oL", "mosquitto_sub", "-h", BROKER_IP, "-p",
                                     str(broker.port), "-q", "1", "-v", "-d", "-t", topic_name,
                                     *auth, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._broker = broker
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._subscribed.wait(10):
            self.close()
            raise AssertionError(f"mosquitto_sub did not subscribe to {topic_name}: "
                                 f"{self.debug[-5:]}")

    def _read(self) -> None:
        try:
            self._read_lines()
        except (ValueError, OSError):  # close() shut the pipe under the reader
            pass

    def _read_lines(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(self.topic + " "):
                self.lines.append(line)
            else:
                self.debug.append(line)
                if "received SUBACK" in line:
                    self._subscribed.set()

    @property
    def messages(self) -> list:
        return [json.loads(line[len(self.topic) + 1:]) for line in self.lines]

    def wait(self, count: int = 1, timeout: float = 20) -> list:
        """The first `count` messages, once they are there."""
        wait_for(lambda: len(self.lines) >= count, timeout,
                 f"{count} message(s) on {self.topic}", log=lambda: "\n".join(self.debug[-5:]))
        return self.messages[:count]

    def close(self) -> None:
        L.stop_process(self.proc)
        self._broker.lab.forget(self.proc)
        self._reader.join(2)
