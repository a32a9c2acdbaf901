"""MQTT mode: the gateway driven by Oakestra's cluster over its mosquitto, beside the HTTP API
(docs/oakestra.md, "MQTT mode"; the messages are in gw.cluster.messages).

- Joining: on a first start the gateway waits for the deploy message (a persistent session
  under a client id of its own, so a message sent while it was down is delivered when it
  connects), stores the internal addresses, brings up the bridge, and once the table is loaded
  answers ``deployed``. On a restart with a stored deployment the stored addresses serve at
  once, the broker or not.
- Changes: expose and unexpose messages go through the `Gateway` service, as the HTTP API's
  requests do (same validation, store, all-or-nothing). Every message is answered on
  ``<topic>/result``, counted in /metrics, and a refused one is logged with its reason.
- Delivery: QoS 1 with manual acknowledgement. A message is acknowledged after it has been
  applied (or refused), so a crash in between means a redelivery, which is a no-op.
- Brokers: ``oakestra.mqtt_url`` may list replicas. The first that answers is used; on a
  failure the next one, with exponential backoff (0.5 s up to ``oakestra.backoff_max``). Each
  new connection re-announces ``deployed``. The data plane never waits for the broker.
- A pair (ha.enabled): both nodes follow the same ``node_id``'s topics (each with its own
  client id) and apply every message, so the table is the same whichever holds the floating
  addresses; only the master speaks (``deployed``, the result answers). The internal
  addresses are the floating ones of the config: no waiting for ``deploy``, and a deploy that
  names others is refused. On each promotion the new master answers ``deployed`` again
  (`speak`), so that the cluster routes the internal addresses to it.

Two threads: one holds the connection (paho's network loop), one applies messages in order.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import ssl
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from . import messages as M
from ..kernel import netlink
from ..core.config import Settings
from ..core.errors import Conflict, ConfigError, GatewayError, InvalidInput, one_line
from ..kernel.sockets import Listening

log = logging.getLogger(__name__)
audit = logging.getLogger("gw.audit")

FIRST_DELAY = 0.5
KEEPALIVE = 15          # seconds: how soon a silently dead broker is noticed (1.5x this)
LOOP_TIMEOUT = 0.5
URL_RE = re.compile(r"(?P<scheme>mqtts?)://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/]+))(?::(?P<port>\d+))?/?")


def split_url(url: str) -> tuple[str, int, bool]:
    """Pure: ``mqtt[s]://host[:port]`` -> (host, port, tls); ports default to 1883 and 8883."""
    m = URL_RE.fullmatch(url)
    if not m:
        raise ConfigError(f"oakestra.mqtt_url: {url!r} is not an mqtt:// or mqtts:// URL",
                          field="oakestra.mqtt_url")
    tls = m["scheme"] == "mqtts"
    port = int(m["port"]) if m["port"] else (8883 if tls else 1883)
    if not 1 <= port <= 65535:
        raise ConfigError(f"oakestra.mqtt_url: port {port} of {url} is not 1-65535",
                          field="oakestra.mqtt_url")
    return m["v6"] or m["host"], port, tls


def read_password(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"oakestra.mqtt_password_file: cannot read {path}: "
                          f"{exc.strerror or exc}", field="oakestra.mqtt_password_file") from None


class NotDeployed(Conflict):
    """A change before the deploy message: there is no table to change yet."""

    code = "not_deployed"


class MqttFront:
    """The MQTT front end of one process. `settings()` gives the running settings (a reload
    may change the policy); `store` holds the deployment; `metrics` counts messages;
    `readdress(ipv4, ipv6)` applies other internal addresses live (the daemon's); in a pair,
    `may_speak()` says whether this node is the master now."""

    def __init__(self, settings: Callable[[], Settings], store, metrics=None,
                 readdress: Callable[[str, str], None] | None = None,
                 may_speak: Callable[[], bool] | None = None):
        self._settings = settings
        self.pair = settings().ha.enabled
        self._may_speak = may_speak or (lambda: True)
        self.announcements = 0                  # `deployed` answers published
        self.store = store
        self.metrics = metrics
        self._readdress = readdress
        oak = settings().oakestra
        self.node_id = oak.node_id
        self.urls = oak.mqtt_urls
        self._listening = Listening()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._client = None                     # the connected paho client, if any
        self._active: str | None = None         # the broker of the current connection
        self._last_error = "no connection tried yet"
        self._addresses: tuple[str, str] | None = None   # the internal IPs we serve on
        self._deployed = threading.Event()      # the addresses are known
        self._gateway = None
        self._attached = threading.Event()      # the table is loaded: apply changes
        self._threads: list[threading.Thread] = []
        self.connections = 0                    # successful connections so far

    # -- joining ----------------------------------------------------------------------------

    def bring_up(self) -> Settings:
        """Before the table is loaded: the settings with the internal IPs (stored, or from
        the deploy message this waits for), once the bridge carries them."""
        stored = self._floating() if self.pair else self._stored()
        self._spawn("mqtt-connection", self._run)
        self._spawn("mqtt-apply", self._apply_loop)
        if stored is None:
            log.info("waiting for the deploy message on %s (brokers: %s)",
                     M.topic(self.node_id, "deploy"), ", ".join(self.urls))
            while not self._deployed.wait(0.5):
                if self._stop.is_set():
                    raise GatewayError("stopped while waiting for the deploy message")
        else:
            self._addresses = stored
            self._deployed.set()
            log.info("using the stored deployment: node %s, internal %s and %s; listening "
                     "on %s in the background", self.node_id, *stored, ", ".join(self.urls))
        live = self._settings().with_internal_ips(*self._addresses)
        netlink.ensure_bridge(live)
        if stored is None and not self.pair:
            # Stored once the bridge carries them, as in HTTP mode: a failed start stores nothing.
            self.store.commit(meta={"gateway_id": self.node_id, "joined_by": "mqtt",
                                    "internal_ipv4": live.network.internal_ipv4.compressed,
                                    "internal_ipv6": live.network.internal_ipv6.compressed})
        return live

    def attach(self, gateway) -> None:
        """After the table is loaded: answer `deployed` and start applying changes."""
        self._gateway = gateway
        self._attached.set()
        self._announce()

    def _floating(self) -> tuple[str, str]:
        """A pair's internal addresses: the floating ones of both nodes' configs (keepalived
        moves them), not the cluster's to hand out."""
        net = self._settings().network
        log.info("in a gateway pair: node %s, floating internal %s and %s; the pair's master "
                 "answers the cluster", self.node_id, net.internal_ipv4, net.internal_ipv6)
        return str(net.internal_ipv4), str(net.internal_ipv6)

    def _stored(self) -> tuple[str, str] | None:
        meta = self.store.meta()
        if meta.get("gateway_id") != self.node_id or meta.get("joined_by") != "mqtt":
            return None
        try:
            live = self._settings().with_internal_ips(str(meta.get("internal_ipv4")),
                                                      str(meta.get("internal_ipv6")))
        except ConfigError:
            return None
        return str(live.network.internal_ipv4), str(live.network.internal_ipv6)

    # -- status -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None

    def status(self) -> dict:
        return {"mode": "mqtt", "active": self._active or "", "configured": list(self.urls),
                "connected": self.connected,
                **({"announced": self.announcements} if self.pair else {})}

    def problems(self) -> dict[str, str]:
        if self.connected:
            return {}
        return {"mqtt": f"not connected to a broker ({self._last_error}); the exposures "
                        "in place keep working, changes from the cluster wait"}

    # -- the connection ---------------------------------------------------------------------

    def _run(self) -> None:
        delay, index = FIRST_DELAY, 0
        while not self._stop.is_set():
            url = self.urls[index]
            try:
                was_connected = self._session(url)
            except Exception as exc:  # noqa: BLE001 - the connection thread must not die
                log.exception("MQTT session with %s failed", url)
                self._last_error = f"{url}: {exc}"
                was_connected = False
            if self._stop.is_set():
                return
            if was_connected:
                delay = FIRST_DELAY
            index = (index + 1) % len(self.urls)
            log.warning("MQTT: %s; next try with %s in %.1f s", self._last_error,
                        self.urls[index], delay)
            if self._stop.wait(delay):
                return
            if not was_connected:
                delay = min(delay * 2, self._settings().oakestra.backoff_max)

    def _session(self, url: str) -> bool:
        """Connect to one broker and serve until the connection ends; whether it was up."""
        import paho.mqtt.client as paho  # noqa: PLC0415 - only MQTT mode needs it

        oak = self._settings().oakestra
        host, port, tls = split_url(url)
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=oak.client_id,
                             clean_session=False, protocol=paho.MQTTv311,
                             reconnect_on_failure=False, manual_ack=True)
        if oak.mqtt_username:
            password = read_password(oak.mqtt_password_file) if oak.mqtt_password_file else None
            client.username_pw_set(oak.mqtt_username, password)
        if tls:
            client.tls_set(ca_certs=oak.mqtt_ca_file or None)
        up = {"connected": False, "refused": False}

        def on_connect(c, userdata, flags, reason, properties):
            if reason.is_failure:
                up["refused"] = True
                self._last_error = f"{url} refused the connection: {reason}"
                return
            up["connected"] = True
            topics = [(M.topic(self.node_id, kind), 1) for kind in M.KINDS]
            c.subscribe(topics)
            with self._lock:
                self._client, self._active = c, url
                self.connections += 1
            log.info("MQTT: connected to %s as %s (session %s); subscribed to %s/{%s}", url,
                     oak.client_id, "resumed" if flags.session_present else "new",
                     M.prefix(self.node_id), ",".join(M.KINDS))
            self._announce()

        def on_message(c, userdata, msg):
            self._queue.put((c, msg))

        client.on_connect = on_connect
        client.on_message = on_message
        try:
            client.connect(host, port, keepalive=KEEPALIVE)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._last_error = f"cannot connect to {url}: {getattr(exc, 'strerror', None) or exc}"
            return False
        try:
            while not self._stop.is_set() and not up["refused"]:
                rc = client.loop(timeout=LOOP_TIMEOUT)
                if rc != paho.MQTT_ERR_SUCCESS:
                    if up["connected"]:
                        self._last_error = f"lost the connection to {url} ({paho.error_string(rc)})"
                    elif not up["refused"]:
                        self._last_error = f"{url} closed the connection before accepting it"
                    break
        finally:
            with self._lock:
                if self._client is client:
                    self._client = None
            sock = client.socket()
            if sock is not None:  # this client is discarded: no DISCONNECT, the session stays
                sock.close()
        return up["connected"]

    def _publish(self, name: str, doc: dict) -> None:
        client = self._client
        if client is None:
            log.warning("MQTT: not connected; %s not sent: %s", name, json.dumps(doc))
            return
        client.publish(M.topic(self.node_id, name), json.dumps(doc, separators=(",", ":")),
                       qos=1)

    def _speaks(self) -> bool:
        """Whether this gateway answers the cluster: always, but in a pair only its master."""
        return not self.pair or self._may_speak()

    def _announce(self) -> None:
        """`deployed` with the addresses on the bridge, once the table is loaded: after the
        deploy, and again on every new connection (a broker switch, a restart) and, in a
        pair, on each promotion; never from a pair's backup."""
        if (self._attached.is_set() and self._addresses is not None and self.connected
                and self._speaks()):
            self._publish("deployed", M.deployed(*self._addresses))
            with self._lock:  # from paho's thread (a connection) and the role watcher's
                self.announcements += 1
            if self.pair:
                log.info("MQTT: answered deployed (%s and %s) as the pair's master",
                         *self._addresses)

    def speak(self) -> None:
        """This node became its pair's master: `deployed` again, now (if connected; else on
        the next connection)."""
        self._announce()

    # -- applying messages ------------------------------------------------------------------

    def _apply_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, msg = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            kind = M.kind_of(self.node_id, msg.topic)
            if kind is not None and self._deployed.is_set():
                # Deployed: the table is being loaded. Messages wait for it, unacknowledged
                # (a deploy too: other addresses are applied to a loaded table). Not
                # deployed, changes are refused: waiting could hold back the deploy itself.
                while not self._attached.wait(0.5):
                    if self._stop.is_set():
                        return
            if kind is not None:
                try:
                    self._handle(kind, msg.payload)
                except Exception:  # noqa: BLE001 - one bad message must not stop the others
                    log.exception("MQTT: handling a %s message failed", kind)
            try:
                client.ack(msg.mid, msg.qos)  # a dead connection's ack goes nowhere: redelivery
            except Exception:  # noqa: BLE001
                log.debug("MQTT: ack of message %d failed", msg.mid)

    def _handle(self, kind: str, payload: bytes) -> None:
        doc: Any = None
        try:
            doc = M.parse_json(payload)
            answer = getattr(self, f"_on_{kind}")(doc)
            label = "ok"
        except GatewayError as exc:
            answer, label = M.failure(kind, exc, doc), M.result_label(exc)
            log.warning("MQTT %s message refused (%s): %s", kind, exc.code, one_line(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("MQTT %s message failed", kind)
            answer, label = M.failure(kind, GatewayError(f"internal error: {exc}")), "failed"
        if kind != "deploy" or not answer.get("ok"):
            who, what = f"mqtt:{self._active}", f"{kind} {_brief(doc)}"
            outcome = answer.get("outcome") or answer.get("error")
            # As the API's audit lines: the fields again as record attributes for log.format json.
            audit.info("who=%s what=%s result=%s", who, json.dumps(what), json.dumps(outcome),
                       extra={"who": who, "what": what, "result": outcome})
        if self.metrics is not None:
            self.metrics.observe_mqtt(kind, label)
        if self._speaks():  # a pair's backup applies the message too, silently
            self._publish(f"{kind}/result", answer)

    def _policy(self):
        ports = frozenset(self._listening())
        return replace(self._settings().policy(gateway_id=self.node_id),
                       listening=lambda: ports)

    def _on_deploy(self, doc) -> dict:
        deploy = M.parse_deploy(doc, self._settings())
        addresses = (deploy.ipv4, deploy.ipv6)
        if self._addresses is None:
            self._addresses = addresses
            self._deployed.set()
            log.info("deployed as %s (job %s): internal %s and %s", self.node_id,
                     deploy.job_name or "-", *addresses)
            return M.success("deploy", "deployed", **M.deployed(*addresses))
        if addresses == self._addresses:
            self._announce()  # the cluster may have missed the first answer
            return M.success("deploy", "unchanged", **M.deployed(*addresses))
        if self.pair:
            index = 0 if addresses[0] != self._addresses[0] else 1
            name = ("instance_ip", "instance_ip_v6")[index]
            raise InvalidInput(f"{name} {addresses[index]} is not the pair's "
                               f"floating internal address: this gateway is one of a pair, "
                               f"whose internal addresses are {self._addresses[0]} and "
                               f"{self._addresses[1]} (network.internal_ipv4/6, the same on "
                               "both nodes)", field=name)
        # Stored first: should the process die before they are applied, the next start
        # brings them up from the store (and the unacknowledged message comes again).
        self.store.commit(meta={"internal_ipv4": deploy.ipv4, "internal_ipv6": deploy.ipv6})
        log.warning("the deploy message assigns the internal addresses %s and %s (the gateway "
                    "serves on %s and %s): applying them", *addresses, *self._addresses)
        if self._readdress is None:
            return M.success("deploy", "restart_needed", **M.deployed(*addresses))
        self._readdress(*addresses)  # refused: the answer says why, the old ones serve
        self._addresses = addresses
        self._announce()
        return M.success("deploy", "readdressed", **M.deployed(*addresses))

    def _require_deployed(self) -> None:
        if not self._attached.is_set():
            raise NotDeployed("the gateway is not deployed yet: send the deploy message "
                              f"to {M.topic(self.node_id, 'deploy')} first")

    def _on_expose(self, doc) -> dict:
        self._require_deployed()
        exposure = M.parse_expose(doc, self._policy())
        result = self._gateway.add([exposure])[0]
        return M.success("expose", result.outcome, exposure=result.exposure.to_dict())

    def _on_unexpose(self, doc) -> dict:
        self._require_deployed()
        request = M.parse_unexpose(doc, self._policy())
        deleted = self._gateway.delete_service(request.service_id, request.exposed_port)
        return M.success("unexpose", "deleted" if deleted else "none",
                         deleted=[e.to_dict() for e in deleted])

    # -- lifecycle --------------------------------------------------------------------------

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _brief(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "(not a JSON object)"
    text = json.dumps({k: doc[k] for k in sorted(doc)[:8]}, separators=(",", ":"))
    return text if len(text) <= 200 else text[:197] + "..."
