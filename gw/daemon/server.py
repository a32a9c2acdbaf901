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

import logging
import os
import signal
import sys
import threading
import time

from ..cluster.oakestra import Membership
from ..core import hosts, ruleset
from ..core.config import Settings, check_state_directory, load_config
from ..core.errors import ConfigError, GatewayError, one_line
from ..core.exposure import Exposure
from ..service.gateway import Gateway
from . import api, auth, build, checks, reload
from .listener import Listener
from .logs import setup_logging
from .metrics import Metrics
from .checks import own_ips
from .systemd import api_answers, sd_notify, watchdog_interval, watchdog_loop

log = logging.getLogger("gw.daemon.server")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# Seconds between a poisoned store and the exit (see Daemon._store_poisoned).
POISONED_EXIT_AFTER = 2.0


class Daemon:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self.config: Settings | None = None       # as read at start (for "restart needed")
        self.settings: Settings | None = None     # what runs (internal IPs filled in, reloads)
        self.store = None
        self.exit_code = EXIT_OK  # what a SIGTERM makes serve() return
        self.gateway: Gateway | None = None
        self.metrics: Metrics | None = None
        self.app = None
        self.listener: Listener | None = None
        self.token: str | None = None
        self.drift = None
        self.follower = None                      # follows the shared table (etcd)
        self.mqtt = None                          # the MQTT front end (MQTT mode)
        self.membership: Membership | None = None  # the HTTP one (Oakestra and standalone)
        self.ha_role = None                       # the role in a pair (ha.enabled)
        self.role_watcher = None                  # tells the cluster of a promotion
        self._reload = threading.Event()
        self._stopping = threading.Event()
        # A reload and a re-address both change the running settings: one at a time.
        self._config_lock = threading.Lock()
        self._rebind_problem: str | None = None
        self._egress_interfaces: list[str] = []
        self._threads: list[threading.Thread] = []

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        self.config = load_config(self.config_path)
        setup_logging(self.config.log.level, self.config.log.format)
        if self.config.standalone:
            self.config.require_internal_ips()
        if os.environ.get("STATE_DIRECTORY"):  # under the unit (systemd sets it)
            check_state_directory(self.config, os.environ["STATE_DIRECTORY"])
        self.store = build.store(self.config.store, on_poisoned=self._store_poisoned)
        self.token = auth.daemon_token(self.config)
        self.metrics = Metrics()
        if self.config.ha.enabled:
            from ..service.ha_role import RoleFile  # noqa: PLC0415

            self.ha_role = RoleFile(self.config.ha.role_file)
            log.info("in a gateway pair: role %s (from %s, written by `ha notify`)",
                     self.ha_role.read()["role"], self.config.ha.role_file)
        # In a pair only the master speaks to the cluster (None: not in a pair).
        may_speak = self._is_master if self.ha_role is not None else None
        if self.config.mqtt_mode:
            from ..cluster.mqtt import MqttFront  # noqa: PLC0415 - only MQTT mode needs paho

            self.mqtt = MqttFront(lambda: self.settings or self.config, self.store,
                                  self.metrics, readdress=self.readdress, may_speak=may_speak)
            self.settings = self.mqtt.bring_up()
        else:
            self.membership = Membership(self.config, self.store, readdress=self.readdress,
                                         may_speak=may_speak)
            self.settings = self.membership.bring_up()
        variables = self._skeleton_vars(self.settings)  # names a missing internal IP
        host = self.settings.api_host
        if self.token is None and not hosts.is_loopback(host):
            log.warning("the API listens on %s without a token: anyone admitted by "
                        "api.allowed_sources can change exposures; set api.token_file", host)
        self.gateway = build.gateway(self.store, variables, self.metrics, own_ips(self.settings),
                                     group_max=build.group_max(self.settings.store))
        self.metrics.bind(self.gateway, egress_counters=self.gateway.kernel_counters,
                          cluster=self._cluster_status,
                          ha_role=self.ha_role.read if self.ha_role else None)
        # Watch before loading: a change by another process after this point is repaired.
        if os.environ.get("OAKESTRA_GW_DRIFT_WATCH", "1") != "0":
            from ..kernel.drift import DriftWatcher  # noqa: PLC0415

            self.drift = DriftWatcher(self._on_drift, self.gateway.probe,
                                      generations=self.gateway.generations).start()
        else:
            log.warning("OAKESTRA_GW_DRIFT_WATCH=0: not watching for changes to our table; "
                        "only SIGHUP repairs it")
        self.gateway.load()
        if self.config.store.backend == "etcd":
            from ..service.follow import Follower  # noqa: PLC0415

            self.follower = Follower(self.gateway, self.store).start()
        self._check_own_address(self.gateway.pointing_at_itself())
        log.info("loaded table %s with %d exposure(s) from %s", ruleset.TABLE,
                 len(self.gateway.exposures()), self.settings.store.path)

        if self.mqtt is not None:
            self.mqtt.attach(self.gateway)
        self.app = api.create_app(self.gateway, self.settings, token=lambda: self.token,
                                  metrics=self.metrics, ready_checks=self._ready_checks,
                                  gateway_id=self._gateway_id, cluster=self._cluster_status,
                                  egress=self._egress,
                                  ha_role=self.ha_role.read if self.ha_role else None)
        if self.settings.api.per_exposure_metrics:
            self.metrics.start_connection_counter(self.gateway.exposures)
        self.listener = Listener(self.app, host, self.settings.api.port,
                                 self.settings.api.threads, floating=self.config.ha.enabled,
                                 node_host=self.settings.api_node_host)
        log.info("serving the API on %s (%s mode, %s)", self.listener.where,
                 "standalone" if self.settings.standalone else
                 "Oakestra MQTT" if self.settings.mqtt_mode else "Oakestra",
                 "token required" if self.token else "no token")
        self._check_ports()  # now that our own API port listens too
        if self.membership is not None:
            self.membership.announce_ready(self.token)
        if self.ha_role is not None and not self.settings.standalone:
            from ..service.ha_role import RoleWatcher  # noqa: PLC0415

            # Once the API listens and the table is loaded: what the master announces is ready.
            self.role_watcher = RoleWatcher(self.ha_role, self._on_role).start()
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on port "
                  f"{self.settings.api.port}")
        self._thread("reload", self._reload_loop)
        interval = watchdog_interval()
        if interval:
            self._thread("watchdog", watchdog_loop, self._stopping, interval, self.healthy)

    # -- a pair: the master speaks to the cluster -------------------------------------------

    def _is_master(self) -> bool:
        return self.ha_role.read()["role"] == "master"

    def _on_role(self, old: str | None, record: dict) -> None:
        """The role file changed (or the daemon started): a node that is now the master
        announces the pair to the cluster, so that it routes the floating internal address
        here; any other role stays silent (the cluster would route to the wrong node)."""
        role = record["role"]
        seen = "at start" if old is None else f"{old} -> {role}"
        if role != "master":
            log.info("ha: role %s (%s): not announcing to the cluster, the master speaks for "
                     "the pair", role, seen)
            return
        log.info("ha: role master (%s): announcing the pair to the cluster (%s)", seen,
                 "deployed over MQTT" if self.mqtt is not None else "register once, ready")
        if self.mqtt is not None:
            self.mqtt.speak()
        elif self.membership is not None:
            self.membership.speak(self.token)

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
                self._rebind_problem = self.listener.move(new.api_host)
                if self._rebind_problem:
                    log.error("re-address: %s", self._rebind_problem)
                    self.metrics.report(restart_needed=[*self.metrics.restart_needed,
                                                        "api.host"])

    def _skeleton_vars(self, settings: Settings) -> dict[str, str]:
        """The skeleton's values, with the interfaces egress leaves by as the kernel has them
        now (the default route's unless configured); kept for /api/ready."""
        from ..kernel import netlink  # noqa: PLC0415

        interfaces = netlink.egress_interfaces(settings)
        variables = ruleset.skeleton_vars(settings, interfaces)
        self._egress_interfaces = interfaces
        return variables

    def _egress(self) -> dict:
        return ruleset.egress_status(self.settings, self._egress_interfaces)

    def _check_ports(self) -> None:
        self.metrics.report(conflicting=checks.shadowed_ports(self.gateway.exposures(),
                                                              self.settings))

    def _check_own_address(self, found: list[Exposure]) -> None:
        self.metrics.report(refused_own=checks.pointing_at_itself(found))

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
        gid = self.membership.gateway_id if self.membership is not None else None
        return gid or self.settings.oakestra.gateway_id or None

    def _cluster_status(self) -> dict:
        if self.mqtt is not None:
            return self.mqtt.status()
        return self.membership.status() if self.membership is not None else {}

    def _thread(self, name, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _store_poisoned(self, cause: str) -> None:
        """The store holds a record it could neither make durable nor take back, so the next
        start may replay it while this process lacks it. The store already refuses changes;
        readiness says why, and the daemon exits non-zero so that systemd restarts it: the
        start replays the journal and loads the kernel from it, and the two agree again."""
        if self.gateway is not None:  # else the start fails on the 503 and exits anyway
            self.gateway.health.set("store", cause)
        self.exit_code = EXIT_FAILURE
        # Not at once: the answer (503) to the change that failed goes out first.
        timer = threading.Timer(POISONED_EXIT_AFTER, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()

    # -- run and stop --------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (raised as SystemExit into waitress's loop)."""
        self.listener.run()

    def request_reload(self) -> None:
        self._reload.set()

    def close(self) -> None:
        """Stop serving and close the store; the kernel table is left alone."""
        self._stopping.set()
        self._reload.set()
        sd_notify("STOPPING=1")
        if self.listener is not None:
            try:
                self.listener.close()
            except Exception:  # noqa: BLE001 - closing anyway
                log.exception("closing the API server")
        if self.role_watcher is not None:
            self.role_watcher.stop()
        if self.drift is not None:
            self.drift.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.membership is not None:
            try:
                self.membership.stop()  # background re-registration and ready callbacks
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
                found = reload.read(self.config_path, self.config, self.settings,
                                    self._skeleton_vars)
                if found is not None:
                    self._adopt(found)
                self._reconcile(found.variables if found is not None else None)
            self._check_ports()  # network.reserved_ports may have changed
        finally:
            sd_notify("READY=1")

    def _adopt(self, new: reload.Reloaded) -> None:
        """Run with the reloaded settings and token (the table follows in `_reconcile`)."""
        token_changed = new.token != self.token
        ranges_changed = new.settings.network.service_ranges != \
            self.settings.network.service_ranges
        if new.settings.log != self.settings.log:
            setup_logging(new.settings.log.level, new.settings.log.format)
        self.settings, self.token = new.settings, new.token
        api.reconfigure(self.app, new.settings, restart_needed=new.pending)
        self.metrics.report(restart_needed=new.pending)
        if token_changed and self.membership is not None:
            # The cluster calls us with the token of the last ready callback: hand it the new one.
            self.membership.announce_ready(new.token)
        if ranges_changed:  # a test of every exposure: not at each SIGHUP
            reload.warn_outside_ranges(self.gateway.exposures(), new.settings)
        log.info("reload: applied %s", ", ".join(new.changed) if new.changed
                 else "no live changes")

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

    def healthy(self, timeout: float) -> bool:
        """For the watchdog: the API answers /api/health over its own socket."""
        return api_answers(self.settings.api_local_host, self.settings.api.port, timeout)


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
