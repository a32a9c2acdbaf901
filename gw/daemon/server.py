"""The daemon: `oakestra-gw serve --config FILE` (docs/cli.md, "The daemon: `serve`").

Start: config -> store -> token -> Oakestra bring-up (internal IPs, bridge) -> load the
skeleton and the stored exposures into the kernel (one transaction) -> serve the API (waitress)
-> ready callback to the cluster -> READY=1 to systemd, then watchdog pings while healthy.

Signals: SIGHUP re-reads the config, applies what can change live and reconciles the kernel to
the store (repairing a tampered table); SIGTERM/SIGINT stop serving and close the store, and
leave the kernel table as it is, so traffic keeps flowing while the process is away.

Exit codes: 0 after SIGTERM/SIGINT, 2 for a configuration error (one line naming the key),
1 for anything else that stops the start (store, kernel, address in use).
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace

from . import api, auth

from ..cluster import oakestra

from ..core import ruleset
from ..core.config import EgressSettings, Settings, check_state_directory, load_config
from ..kernel.conntrack import Flusher
from ..core.errors import ConfigError, GatewayError, KernelRefused, StoreUnavailable
from ..core.exposure import Exposure, port_conflicts
from ..kernel.firewall import Firewall
from ..service.gateway import Gateway
from .logs import setup_logging
from .metrics import Metrics

log = logging.getLogger("gw.daemon.server")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# Seconds between a poisoned store and the exit (see Daemon._store_poisoned).
POISONED_EXIT_AFTER = 2.0

# Waitress: slow or half-open clients must not block the others. Requests are read by the
# event loop, never by a worker thread, so a trickling client holds a socket, not a thread;
# an idle connection is closed after CHANNEL_TIMEOUT. Bodies past MAX_BODY_BUFFER are refused by
# waitress before they are buffered (the app's own limit, 64 KiB, answers JSON below that).
# The input chain keeps remote connections below the connection limit
# (ruleset.API_REMOTE_CAP), so the watchdog's probe from the gateway itself always gets in.
WAITRESS = dict(channel_timeout=30, cleanup_interval=5,
                connection_limit=ruleset.API_CONNECTION_LIMIT,
                max_request_header_size=16 * 1024, max_request_body_size=128 * 1024,
                asyncore_use_poll=True, ident="oakestra-gw", expose_tracebacks=False,
                clear_untrusted_proxy_headers=True)

# TEST ONLY (tests/reliability): OAKESTRA_GW_TEST_CRASH="before-kernel:N" makes the process
# die at once (os._exit, no cleanup: like a crash) in its N-th change of exposures, after the
# store commit and before the kernel commit; "after-kernel:N" right after the kernel commit,
# before the answer; "refuse-then-store-fails:N" makes the N-th kernel commit refused and the
# store's next write (the revert) fail; "sync-then-cut-fails:N" makes the N-th journal
# fdatasync fail (EIO) and the truncate that takes the record back fail (EROFS). Read once at start; never set it in production.
CRASH_ENV = "OAKESTRA_GW_TEST_CRASH"
CRASH_EXIT = 97
# TEST ONLY: OAKESTRA_GW_TEST_REFUSE_LOADS=N: the N loads of the whole table after the first
# one (the start) fail as a kernel refusal would, so a failing repair can be tested.
REFUSE_ENV = "OAKESTRA_GW_TEST_REFUSE_LOADS"

# Keys a reload applies live; any other change is logged as "restart needed".
LIVE = {"api.allowed_sources", "api.token_file", "network.reserved_ports",
        "network.service_ranges", "network.tunnel_interface", "network.public_interfaces",
        "log.level", "log.format",
        *(f"egress.{name}" for name in EgressSettings.__dataclass_fields__)}


# -- logging and systemd -------------------------------------------------------------------------

def sd_notify(state: str, environ=os.environ) -> bool:
    """Send `state` (e.g. "READY=1") to systemd's notify socket; False without one."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state.split("\n", 1)[0], exc)
        return False


def watchdog_interval(environ=os.environ) -> float | None:
    """Half of WATCHDOG_USEC when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


def own_ips(settings: Settings) -> frozenset[str]:
    """Pure: the gateway's internal addresses, as text."""
    return frozenset(str(ip) for ip in (settings.network.internal_ipv4,
                                        settings.network.internal_ipv6) if ip)


def one_line(exc: GatewayError) -> str:
    field = getattr(exc, "field", None)
    if field and field not in exc.message:
        return f"{field}: {exc.message}"
    return exc.message


# Settings held under another name than their key in gateway.toml (a key that takes a list).
FIELD_KEYS = {"oakestra.cluster_urls": "oakestra.cluster_url",
              "oakestra.mqtt_urls": "oakestra.mqtt_url"}
SETTINGS_SECTIONS = ("api", "store", "network", "oakestra", "log", "egress")


def config_changes(before: Settings, after: Settings) -> list[str]:
    """Pure: the dotted keys (as written in the file) whose values differ."""
    changed = []
    for section in SETTINGS_SECTIONS:
        a, b = getattr(before, section), getattr(after, section)
        for name in a.__dataclass_fields__:
            if getattr(a, name) != getattr(b, name):
                key = f"{section}.{name}"
                changed.append(FIELD_KEYS.get(key, key))
    return changed


def restart_needed(started: Settings, now: Settings) -> list[str]:
    """Pure: the keys whose value in the file (`now`) differs from the one the process started
    with and that only a restart applies."""
    return [key for key in config_changes(started, now) if key not in LIVE]


def apply_live(running: Settings, new: Settings) -> Settings:
    """Pure: the running settings with the live keys of `new`."""
    return replace(
        running,
        api=replace(running.api, allowed_sources=new.api.allowed_sources,
                    token_file=new.api.token_file),
        network=replace(running.network, reserved_ports=new.network.reserved_ports,
                        service_ranges=new.network.service_ranges,
                        tunnel_interface=new.network.tunnel_interface,
                        public_interfaces=new.network.public_interfaces),
        log=new.log, egress=new.egress)


# -- the daemon ----------------------------------------------------------------------------------

class Daemon:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self.config: Settings | None = None       # as read at start (for "restart needed")
        self.settings: Settings | None = None     # what runs (internal IPs filled in, reloads)
        self.store = None
        self.exit_code = EXIT_OK  # what a SIGTERM makes serve() return
        self.gateway: Gateway | None = None
        self.firewall: Firewall | None = None
        self.flusher: Flusher | None = None
        self.metrics: Metrics | None = None
        self.app = None
        self.server = None
        self.token: str | None = None
        self.drift = None
        self.mqtt = None                          # the MQTT front end (MQTT mode)
        self._reload = threading.Event()
        self._stopping = threading.Event()
        # A reload and a re-address both change the running settings: one at a time.
        self._config_lock = threading.Lock()
        self._socket_map: dict = {}               # waitress's, shared by every API listener
        self._dispatcher = None                   # waitress's worker threads
        self._threads: list[threading.Thread] = []

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        from ..store.local import Store  # noqa: PLC0415 - imported here so `config check` stays light

        self.config = load_config(self.config_path)
        setup_logging(self.config.log.level, self.config.log.format)
        if self.config.standalone:
            self.config.require_internal_ips()
        if os.environ.get("STATE_DIRECTORY"):  # under the unit (systemd sets it)
            check_state_directory(self.config, os.environ["STATE_DIRECTORY"])
        self.store = Store(self.config.store.path)
        self.token = auth.daemon_token(self.config)
        self.metrics = Metrics()
        if self.config.mqtt_mode:
            from ..cluster.mqtt import MqttFront  # noqa: PLC0415 - only MQTT mode needs paho

            self.mqtt = MqttFront(lambda: self.settings or self.config, self.store,
                                  self.metrics, readdress=self.readdress)
            self.settings = self.mqtt.bring_up()
        else:
            self.settings = oakestra.bring_up(self.config, self.store, readdress=self.readdress)
        self.metrics.cluster = self._cluster_status
        self._skeleton_vars(self.settings)  # names a missing internal IP as a config error
        host = self.settings.api_host
        if self.token is None and not auth.is_loopback_host(host):
            log.warning("the API listens on %s without a token: anyone admitted by "
                        "api.allowed_sources can change exposures; set api.token_file", host)

        from ..kernel.nft import NftSession  # noqa: PLC0415 - needs python3-nftables

        self.firewall = Firewall(NftSession(), self._skeleton_vars(self.settings),
                                 observe=self.metrics.observe_firewall)
        self.flusher = Flusher()
        self.gateway = Gateway(self.store, self.firewall, self.flusher,
                               on_change=self.metrics.on_change,
                               own_addresses=own_ips(self.settings))
        self.store.on_poisoned = self._store_poisoned
        if os.environ.get(CRASH_ENV):
            inject_crash(self.firewall, os.environ[CRASH_ENV], self.store)
        if os.environ.get(REFUSE_ENV):
            inject_refusals(self.firewall, os.environ[REFUSE_ENV])
        self.metrics.bind(self.gateway)
        self.metrics.egress_counters = self.firewall.counters
        # Watch before loading: a change by another process after this point is repaired.
        if os.environ.get("OAKESTRA_GW_DRIFT_WATCH", "1") != "0":
            from ..kernel.drift import DriftWatcher  # noqa: PLC0415

            self.drift = DriftWatcher(self._on_drift, self.firewall.session.probe).start()
        else:
            log.warning("OAKESTRA_GW_DRIFT_WATCH=0: not watching for changes to our table; "
                        "only SIGHUP repairs it")
        self.gateway.load()
        self._check_own_address(self.gateway.pointing_at_itself())
        log.info("loaded table %s with %d exposure(s) from %s", ruleset.TABLE,
                 len(self.store.exposures()), self.settings.store.path)

        if self.mqtt is not None:
            self.mqtt.attach(self.gateway)
        self.app = api.create_app(self.gateway, self.settings, token=lambda: self.token,
                                  metrics=self.metrics, ready_checks=self._ready_checks,
                                  gateway_id=self._gateway_id, cluster=self._cluster_status,
                                  egress=self._egress)
        if self.settings.api.per_exposure_metrics:
            self.metrics.start_connection_counter(self.gateway.exposures)

        self.server = self._listen(host)
        log.info("serving the API on http://%s:%d (%s mode, %s)",
                 f"[{host}]" if ":" in host else host, self.settings.api.port,
                 "standalone" if self.settings.standalone else
                 "Oakestra MQTT" if self.settings.mqtt_mode else "Oakestra",
                 "token required" if self.token else "no token")
        self._check_ports()  # now that our own API port listens too
        if self.mqtt is None:
            oakestra.announce_ready(self.settings, self.store, self.token)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on port "
                  f"{self.settings.api.port}")
        self._thread("reload", self._reload_loop)
        interval = watchdog_interval()
        if interval:
            self._thread("watchdog", self._watchdog_loop, interval)

    def _listen(self, host: str):
        """A waitress server for the API on `host`. Every one shares the socket map and the
        worker threads of the first, so that a re-address can add a listener to the running
        loop (see `_rebind`)."""
        import waitress  # noqa: PLC0415
        from waitress.task import ThreadedTaskDispatcher  # noqa: PLC0415

        if self._dispatcher is None:
            self._dispatcher = ThreadedTaskDispatcher()
            self._dispatcher.set_thread_count(self.settings.api.threads)
        try:
            # `_dispatcher` is waitress's documented way in to share the worker threads.
            return waitress.create_server(self.app, map=self._socket_map,
                                          _dispatcher=self._dispatcher, host=host,
                                          port=self.settings.api.port,
                                          threads=self.settings.api.threads, **WAITRESS)
        except OSError as exc:
            raise GatewayError(f"cannot listen on {host}:{self.settings.api.port}: "
                               f"{exc.strerror or exc}") from None

    # -- new internal addresses from the cluster -------------------------------------------

    def readdress(self, ipv4: str, ipv6: str) -> None:
        """The cluster assigned other internal addresses (HTTP: a re-registration answered
        with another id; MQTT: a deploy message). Applied live, in this order: the bridge
        carries the new ones, the table is loaded with the new skeleton values (the SNAT) in
        one transaction and the stored exposures are checked again (one that points at the
        gateway now leaves the kernel, logged and counted), then the API moves to the new
        address when it listens on the internal one. A refused bridge or table change leaves
        the old addresses in place and raises. Called by the cluster side, after `start`."""
        with self._config_lock:
            old = self.settings
            new = old.with_internal_ips(ipv4, ipv6)
            if own_ips(new) == own_ips(old):
                return
            from ..kernel import netlink  # noqa: PLC0415

            variables = self._skeleton_vars(new)
            netlink.ensure_bridge(new)
            try:
                self.gateway.reconfigure(variables=variables, own_addresses=own_ips(new))
            except GatewayError:
                # Refused: the old addresses back, on the bridge and in the table.
                netlink.ensure_bridge(old)
                try:
                    self.gateway.reconfigure(variables=self._skeleton_vars(old),
                                             own_addresses=own_ips(old))
                except GatewayError as exc:
                    log.error("re-address: could not load the old values again either: %s",
                              exc.message)
                raise
            pointing = self.gateway.pointing_at_itself()
            self.settings = new
            api.reconfigure(self.app, new)
            log.warning("re-addressed: internal %s and %s (were %s and %s); bridge and table "
                        "updated", ipv4, ipv6, old.network.internal_ipv4,
                        old.network.internal_ipv6)
            self._check_own_address(pointing)
            if not old.api.host:  # the API listens on the internal IPv4
                self._rebind(new.api_host)

    def _rebind(self, host: str) -> None:
        """Move the API's listener to `host`, inside waitress's loop (its socket map is not
        safe to change from another thread): the new socket first, then the old one closed.
        Connections already open on the old address finish on it. Should the new address be
        refused, the old listener stays and /api/ready says a restart is needed."""
        done, outcome = threading.Event(), {}

        def swap():
            try:
                outcome["server"] = self._listen(host)
            except GatewayError as exc:
                outcome["error"] = exc
            done.set()

        self.server.trigger.pull_trigger(swap)
        if not done.wait(10) or "error" in outcome:
            why = outcome["error"].message if "error" in outcome else "the API loop did not answer"
            self._rebind_problem = (f"the API still listens on {self.server.effective_host}, "
                                    f"not on the new internal address {host} ({why}): restart "
                                    "needed")
            log.error("re-address: %s", self._rebind_problem)
            self.metrics.restart_needed = [*self.metrics.restart_needed, "api.host"]
            return
        old, self.server = self.server, outcome["server"]
        # Its listening socket only: the old server's trigger still wakes the loop for
        # requests in flight on connections it accepted.
        old.del_channel()
        old.socket.close()
        self._rebind_problem = None
        log.info("re-address: the API listens on http://%s:%d now", host,
                 self.settings.api.port)

    _rebind_problem: str | None = None

    def _skeleton_vars(self, settings: Settings) -> dict[str, str]:
        """The skeleton's values, with the interfaces egress leaves by as the kernel has them
        now (the default route's unless configured); kept for /api/ready."""
        from ..kernel import netlink  # noqa: PLC0415

        interfaces = netlink.egress_interfaces(settings)
        variables = ruleset.skeleton_vars(settings, interfaces)
        self._egress_interfaces = interfaces
        return variables

    _egress_interfaces: list[str] = []

    def _egress(self) -> dict:
        return ruleset.egress_status(self.settings, self._egress_interfaces)

    def _check_ports(self) -> None:
        """Stored exposures against the reserved and listening ports of today (at start and
        after a reload): a conflict is logged and counted, and the exposure stays (the store
        is the truth; deleting it is the operator's call)."""
        from ..kernel.sockets import read_listening  # noqa: PLC0415

        exposures = [Exposure.from_dict(d) for d in self.gateway.exposures()]
        found = port_conflicts(exposures, self.settings.policy(listening=read_listening))
        for exposure, reason in found:
            log.warning("stored exposure %s shadows a local port: %s; it stays, and traffic to "
                        "that port goes to the service, not to the gateway: delete the "
                        "exposure or move the local service", exposure, reason)
        self.metrics.conflicting = len(found)

    def _check_own_address(self, found: list[dict]) -> None:
        """Stored exposures that point at the gateway's own internal address (it changed since
        they were added): not loaded (see Gateway.own_addresses); logged and counted."""
        for d in found:
            log.error("stored exposure %s points at the gateway's own internal address %s: "
                      "not loaded into the kernel; delete it", Exposure.from_dict(d),
                      d["service_ip"])
        self.metrics.refused_own = len(found)

    def _ready_checks(self) -> dict:
        from ..kernel import netlink  # noqa: PLC0415

        problems = netlink.readiness_problems(self.settings)
        if self.mqtt is not None:
            problems.update(self.mqtt.problems())
        if self._rebind_problem:
            problems["api"] = self._rebind_problem
        return problems

    def _gateway_id(self) -> str | None:
        """The id the cluster knows this gateway by."""
        if self.mqtt is not None:
            return self.mqtt.node_id
        return oakestra.gateway_id() or self.settings.oakestra.gateway_id or None

    def _cluster_status(self) -> dict:
        if self.mqtt is not None:
            return self.mqtt.status()
        return oakestra.cluster_status()

    def _thread(self, name, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _store_poisoned(self, cause: str) -> None:
        """The store holds a record it could neither make durable nor take back, so the next
        start may replay it while this process lacks it. The store already refuses changes;
        readiness says why, and the daemon exits non-zero so that systemd restarts it: the
        start replays the journal and loads the kernel from it, and the two agree again."""
        self.gateway.health.set("store", cause)
        self.exit_code = EXIT_FAILURE
        # Not at once: the answer (503) to the change that failed goes out first.
        timer = threading.Timer(POISONED_EXIT_AFTER, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()

    # -- run and stop --------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (raised as SystemExit into waitress's loop)."""
        self.server.run()

    def request_reload(self) -> None:
        self._reload.set()

    def close(self) -> None:
        """Stop serving and close the store; the kernel table is left alone."""
        self._stopping.set()
        self._reload.set()
        sd_notify("STOPPING=1")
        if self.server is not None:
            try:
                self.server.task_dispatcher.shutdown(timeout=5)
                self.server.close()
            except Exception:  # noqa: BLE001 - closing anyway
                log.exception("closing the API server")
        if self.drift is not None:
            self.drift.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        try:
            oakestra.stop()  # background re-registration and ready callbacks
        except Exception:  # noqa: BLE001 - closing anyway
            log.exception("stopping the cluster membership")
        if self.metrics is not None:
            self.metrics.close()
        try:
            if self.gateway is not None:
                self.gateway.close()  # flushes, then the store after an in-flight change
            elif self.store is not None:
                self.store.close()
        except GatewayError as exc:
            log.error("closing the store: %s", exc.message)
        if self.gateway is not None:
            log.info("stopped; table %s left in place", ruleset.TABLE)

    # -- reload (SIGHUP) -----------------------------------------------------------------

    def _reload_loop(self) -> None:
        while True:
            self._reload.wait()
            if self._stopping.is_set():
                return
            self._reload.clear()
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - the daemon keeps serving
                log.exception("reload failed")

    def reload(self) -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            with self._config_lock:  # not beside a re-address
                self._reconcile(self._apply_config())
            self._check_ports()  # network.reserved_ports may have changed
        finally:
            sd_notify("READY=1")

    def _apply_config(self) -> dict[str, str] | None:
        """The reloaded configuration's skeleton values; None when it could not be applied."""
        log.info("reload: reading %s", self.config_path)
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running configuration", one_line(exc))
            return None
        pending = restart_needed(self.config, new)
        for key in pending:
            log.warning("reload: %s changed: restart needed to apply it", key)
        settings = apply_live(self.settings, new)
        changed = [k for k in config_changes(self.settings, settings)]
        try:
            token = auth.daemon_token(settings)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running token and configuration", one_line(exc))
            return None
        try:
            variables = self._skeleton_vars(settings)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running configuration", one_line(exc))
            return None
        token_changed = token != self.token
        if settings.log != self.settings.log:
            setup_logging(settings.log.level, settings.log.format)
        self.settings = settings
        self.token = token
        api.reconfigure(self.app, settings, restart_needed=pending)
        self.metrics.restart_needed = pending
        if token_changed and not settings.standalone and self.mqtt is None:
            # The cluster calls us with the token of the last ready callback: hand it the new one.
            oakestra.announce_ready(settings, self.store, token)
        outside = [d for d in self.gateway.exposures()
                   if not any(Exposure.from_dict(d).service_ip in net
                              for net in settings.network.service_ranges)]
        if outside:
            log.warning("reload: %d stored exposure(s) lie outside network.service_ranges "
                        "(e.g. %s); they stay until deleted", len(outside),
                        Exposure.from_dict(outside[0]))
        log.info("reload: applied %s", ", ".join(changed) if changed else "no live changes")
        return variables

    def _reconcile(self, variables: dict[str, str] | None = None) -> None:
        """Compare the kernel with the store and repair it; with new skeleton `variables`, the
        table is loaded with them (same elements) even when it is in sync."""
        try:
            done = self.gateway.reconfigure(variables=variables)
        except GatewayError as exc:
            log.error("reconcile failed: %s", exc.message)
            return
        self.metrics.reconciled(done.diff)
        log.info("reconcile: %s%s", "repaired: " + done.diff.summary() if done.diff
                 else "kernel in sync",
                 "; table reloaded with the new configuration" if done.changed else "")

    def _on_drift(self, reason: str) -> bool:
        """The drift watcher saw another process change our table; False when the repair
        failed (the watcher tries again). `reason` quotes what the monitor saw (map elements
        too): it goes to the log, not into the readiness reasons."""
        self.metrics.drift_checks.inc()
        try:
            diff = self.gateway.reconcile()
        except GatewayError as exc:
            self.gateway.health.set("drift", f"unrepaired drift: the repair failed: {exc.message}")
            log.error("drift: repair failed: %s (after: %s)", exc.message, reason)
            return False
        self.metrics.reconciled(diff)
        if diff:
            log.warning("drift: repaired (%s)", diff.summary())
        return True

    # -- watchdog ------------------------------------------------------------------------

    def healthy(self, timeout: float) -> bool:
        """The API answers /api/health over its own socket."""
        host = self.settings.api_host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        conn = http.client.HTTPConnection(host, self.settings.api.port, timeout=timeout)
        try:
            conn.request("GET", "/api/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _watchdog_loop(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            if self.healthy(timeout=max(interval / 2, 0.05)):
                sd_notify("WATCHDOG=1")
            else:
                log.warning("watchdog: the API did not answer; not pinging systemd")


def _fail_next_write(store) -> None:
    """TEST ONLY: the store's next journal write fails with EROFS."""
    import errno  # noqa: PLC0415

    write = store._append

    def failing(record):
        store._append = write
        raise StoreUnavailable(f"cannot write the store's journal: "
                               f"{os.strerror(errno.EROFS)} (test only)")

    store._append = failing


def _fail_sync_then_cut(store, nth: int) -> None:
    """TEST ONLY: the nth journal fdatasync fails with EIO, then the truncate after it with
    EROFS: the record was written and stays in the journal."""
    import errno  # noqa: PLC0415

    sync, truncate, calls = store._sync, store._truncate, [0]

    def failing_sync(fd):
        calls[0] += 1
        if calls[0] != nth:
            return sync(fd)
        store._truncate = failing_truncate
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (test only)")

    def failing_truncate(fd, length):
        store._truncate = truncate
        raise OSError(errno.EROFS, f"{os.strerror(errno.EROFS)} (test only)")

    store._sync = failing_sync


def inject_crash(firewall: Firewall, spec: str, store=None) -> None:
    """TEST ONLY: see CRASH_ENV. Wraps `firewall.apply`, which Gateway.add and Gateway.delete
    call exactly between their store commit and their answer."""
    point, _, nth = spec.partition(":")
    points = ("before-kernel", "after-kernel", "refuse-then-store-fails", "sync-then-cut-fails")
    if point not in points or not nth.isdigit() or int(nth) < 1:
        raise ConfigError(f"{CRASH_ENV}={spec!r}: expected one of {', '.join(points)}, "
                          "then :N")
    apply, target, calls = firewall.apply, int(nth), [0]
    log.warning("%s=%s: this process will crash on purpose (test only)", CRASH_ENV, spec)
    if point == "sync-then-cut-fails":
        _fail_sync_then_cut(store, target)
        return

    def crashing_apply(*args, **kwargs):
        calls[0] += 1
        if calls[0] == target and point == "refuse-then-store-fails":
            # A double failure: the kernel refuses, and the store's next write (the revert)
            # fails as on a file system gone read-only.
            _fail_next_write(store)
            raise KernelRefused(f"{CRASH_ENV}: nftables refused the transaction (test only)")
        if calls[0] == target and point == "before-kernel":
            log.critical("%s: exiting after the store commit, before the kernel commit", CRASH_ENV)
            os._exit(CRASH_EXIT)
        apply(*args, **kwargs)
        if calls[0] == target and point == "after-kernel":
            log.critical("%s: exiting after the kernel commit, before the answer", CRASH_ENV)
            os._exit(CRASH_EXIT)

    firewall.apply = crashing_apply


def inject_refusals(firewall: Firewall, spec: str) -> None:
    """TEST ONLY: see REFUSE_ENV. Wraps `firewall.load`."""
    if not spec.isdigit():
        raise ConfigError(f"{REFUSE_ENV}={spec!r}: expected a number")
    load, refuse, calls = firewall.load, int(spec), [0]
    log.warning("%s=%s: table loads after the first will fail on purpose (test only)",
                REFUSE_ENV, spec)

    def refusing_load(*args, **kwargs):
        calls[0] += 1
        if 1 < calls[0] <= 1 + refuse:
            raise KernelRefused(f"nftables refused the change ({REFUSE_ENV}, load {calls[0]})")
        return load(*args, **kwargs)

    firewall.load = refusing_load


def serve(config_path: str) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    setup_logging()
    # Background threads (drift watcher, flusher, compaction) hold the GIL for a whole default
    # switch interval; requests waiting behind them make the tail of an add's latency.
    sys.setswitchinterval(0.001)
    daemon = Daemon(config_path)

    def stop(signum, frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(daemon.exit_code)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: daemon.request_reload())
    try:
        daemon.start()
        daemon.run()  # waitress ends its loop on the SystemExit that stop() raises
        return daemon.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except ConfigError as exc:
        print(f"oakestra-gw: config error: {one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"oakestra-gw: cannot start: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, ImportError) as exc:
        print(f"oakestra-gw: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        daemon.close()
