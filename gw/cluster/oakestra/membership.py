"""The gateway's membership in one Oakestra cluster over HTTP, for the life of one process:
register, fetch the internal addresses, report ready, re-register after a restart or a switch
to a replica (the steps are in the package's docstring and in docs/oakestra.md)."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ...core.config import Settings
from ...core.errors import ConfigError, GatewayError
from ...kernel import netlink
from .client import (GATEWAY_ID_RE, ClusterClient, ClusterError, ClusterGarbage, Retryable,
                     show)
from .retry import Stopped, retry

log = logging.getLogger(__name__)


class Hushed(Exception):
    """This gateway stopped being its pair's master: what it was telling the cluster is
    dropped (the new master speaks for the pair)."""


@dataclass
class Joined:
    gateway_id: str
    ipv4: str
    ipv6: str


class Membership:
    """The gateway's membership in one cluster, for the life of one process.

    In a pair (ha.enabled) the two nodes are one gateway to the cluster, and only the master
    speaks for it: `may_speak()` says whether this node is the master now, and the daemon
    calls `speak(token)` on each promotion (see `speak`)."""

    def __init__(self, settings: Settings, store, client: ClusterClient | None = None,
                 readdress: Callable[[str, str], None] | None = None,
                 may_speak: Callable[[], bool] | None = None):
        self.settings = settings
        self.store = store
        self.pair = settings.ha.enabled and not settings.standalone
        self._may_speak = may_speak or (lambda: True)
        self._registering = False                 # a pair's step 1 is running or done
        self.announcements = 0                    # ready calls the cluster acknowledged
        # Applies new internal addresses live (the daemon's `readdress`); run before a ready
        # announcement, so only once the gateway serves.
        self._readdress = readdress
        self._new_addresses: tuple[str, str] | None = None
        self.client = client or (None if settings.standalone
                                 else ClusterClient(settings.oakestra.cluster_urls))
        self._stop = threading.Event()
        self._joined: Joined | None = None        # the id and addresses we serve with
        self._rejoined = threading.Event()        # steps 1-2 done (at once on a first start)
        self._rejoin_ok = False
        self._threads: list[threading.Thread] = []
        self.ready_sent = threading.Event()       # the cluster acknowledged step 4
        # One announcer thread for step 4: a newer announcement (a rotated token) replaces
        # the older one instead of racing it, so the last token the cluster gets is the newest.
        self._announce = threading.Condition()
        self._token: str | None = None
        self._wanted = 0                          # announcements asked for
        self._announcer: threading.Thread | None = None

    # -- step 1-3 ---------------------------------------------------------------------------

    def bring_up(self) -> Settings:
        settings = self.settings
        if settings.standalone:
            settings.require_internal_ips()
            netlink.ensure_bridge(settings)
            return settings
        if self.pair:
            return self._bring_up_pair()
        stored = self._stored()
        if isinstance(stored, str):  # a registration id without addresses: a failed start
            return self._first_start(pending_id=stored)
        if stored is not None:
            live = settings.with_internal_ips(stored.ipv4, stored.ipv6)
            netlink.ensure_bridge(live)
            self._joined = stored
            log.info("using the stored registration: gateway id %s, internal %s and %s; "
                     "re-registering with %s in the background", stored.gateway_id,
                     stored.ipv4, stored.ipv6, settings.oakestra.cluster_url)
            self._spawn("oakestra-rejoin", self._rejoin)
            return live
        return self._first_start(pending_id=None)

    def _bring_up_pair(self) -> Settings:
        """A pair's id and floating internal addresses are in both nodes' configs (the config
        checks them), so nothing is asked of the cluster at start: the node does not know yet
        whether it is the master, and a backup that registered would take the registration
        over from the master. Step 1 waits for the first promotion (`speak`); step 2 never
        runs (the addresses are keepalived's, not the cluster's to hand out)."""
        settings = self.settings
        netlink.ensure_bridge(settings)  # the floating addresses themselves are keepalived's
        net = settings.network
        self._joined = Joined(settings.oakestra.gateway_id, str(net.internal_ipv4),
                              str(net.internal_ipv6))
        earlier = self.store.meta().get("gateway_id")
        if earlier and earlier != self._joined.gateway_id:
            # A node that was a gateway of its own before: the config's id wins, and the
            # cluster may still list the old registration.
            log.warning("the store holds the registration of gateway %s from before this node "
                        "was in a pair: it is not used (the pair is gateway %s); the cluster "
                        "may still list %s", earlier, self._joined.gateway_id, earlier)
        log.info("in a gateway pair: gateway id %s, floating internal %s and %s; the pair's "
                 "master registers and reports ready to %s", self._joined.gateway_id,
                 self._joined.ipv4, self._joined.ipv6, settings.oakestra.cluster_url)
        return settings

    def _first_start(self, pending_id: str | None) -> Settings:
        settings = self.settings
        joined = self._join_first(pending_id)
        live = settings.with_internal_ips(joined.ipv4, joined.ipv6)
        netlink.ensure_bridge(live)
        self.store.commit(meta=self._meta(joined))
        self._joined = joined
        self._rejoin_ok = True
        self._rejoined.set()
        log.info("joined the Oakestra cluster at %s: gateway id %s, internal %s and %s",
                 self.client.url, joined.gateway_id, joined.ipv4, joined.ipv6)
        return live

    def _stored(self) -> Joined | str | None:
        """The stored registration; only its id (a str) when a first start got that far."""
        meta = self.store.meta()
        if not any(meta.get(k) for k in ("gateway_id", "internal_ipv4", "internal_ipv6")):
            return None
        url = self.settings.oakestra.cluster_url
        # A replica of the same cluster knows the registration as well.
        if meta.get("cluster_url") and meta["cluster_url"] not in self.settings.oakestra.cluster_urls:
            log.warning("the stored registration (gateway id %s) belongs to %s, not to %s: "
                        "registering as a new gateway", meta.get("gateway_id"),
                        meta["cluster_url"], url)
            return None
        gid, v4, v6 = (meta.get(k) for k in ("gateway_id", "internal_ipv4", "internal_ipv6"))
        try:
            if not isinstance(gid, str) or not GATEWAY_ID_RE.fullmatch(gid):
                raise ConfigError(f"gateway_id {show(gid)} is not an id")
            if v4 is None and v6 is None:
                return gid
            self.settings.with_internal_ips(str(v4), str(v6))
        except ConfigError as exc:
            raise ClusterError(f"the store {self.settings.store.path} holds an unusable registration "
                               f"({exc.message}); remove the store's meta or the store "
                               "to register again") from None
        return Joined(gid, str(v4), str(v6))

    def _join_first(self, pending_id: str | None) -> Joined:
        oak = self.settings.oakestra
        public = self.public_ips()
        deadline_start = time.monotonic()
        kept = ""

        def left() -> float:
            return max(0.0, oak.give_up_after - (time.monotonic() - deadline_start))

        try:
            gid = retry(f"register with {oak.cluster_url}",
                        lambda: self.client.register(pending_id or oak.gateway_id,
                                                     public.get("ipv4", ""),
                                                     public.get("ipv6", "")),
                        give_up_after=oak.give_up_after, backoff_max=oak.backoff_max,
                        stop=self._stop)
            if gid != pending_id:
                # Kept before the next step can fail: a start that fails after this (and
                # systemd's restart) registers again under this id, not as another gateway.
                self.store.commit(meta={"gateway_id": gid, "cluster_url": oak.cluster_url})
                kept = f" but the gateway id {gid}, kept for the next start"
            ipv4, ipv6 = retry(f"fetch the internal addresses from {oak.cluster_url}",
                               lambda: self.client.internal_ips(gid), give_up_after=left(),
                               backoff_max=oak.backoff_max, stop=self._stop)
            self._check_distinct(ipv4, ipv6, public)
        except Stopped:
            raise ClusterError("stopped while joining the Oakestra cluster") from None
        except ClusterError as exc:
            raise type(exc)(f"{exc.message} (first start: nothing was changed{kept}; "
                            f"cluster {oak.cluster_url})") from None
        return Joined(gid, ipv4, ipv6)

    def _check_distinct(self, ipv4: str, ipv6: str, public: dict[str, str]) -> None:
        if ipv4 in public.values() or ipv6 in public.values():
            raise ClusterGarbage(f"the cluster handed out {ipv4} and {ipv6} as internal "
                                 "addresses, but one of them is the gateway's public address")

    def public_ips(self) -> dict[str, str]:
        """The public addresses reported at registration: from the config, else from the
        public interfaces (the default route's)."""
        oak = self.settings.oakestra
        found: dict[str, str] = {}
        for family, value, version in (("ipv4", oak.public_ipv4, 4),
                                       ("ipv6", oak.public_ipv6, 6)):
            if not value:
                continue
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                ip = None
            if ip is None or ip.version != version:
                raise ConfigError(f"oakestra.public_{family}: {value!r} is not an IPv{version} "
                                  "address", field=f"oakestra.public_{family}")
            found[family] = str(ip)
        if self.settings.ha.enabled:
            # A pair is reached at its floating addresses, whichever node holds them; a
            # node's own addresses are not the gateway's.
            for address in self.settings.ha.public_addresses:
                found.setdefault(f"ipv{address.version}", str(address.ip))
            return found
        if len(found) < 2:
            try:
                discovered = netlink.public_addresses(self.settings)
            except Exception as exc:
                raise ConfigError(f"cannot read the public interfaces' addresses: {exc}",
                                  field="network.public_interfaces") from None
            for family, value in discovered.items():
                found.setdefault(family, value)
        if not found:
            where = (", ".join(self.settings.network.public_interfaces)
                     or "the default route's interface")
            raise ConfigError(f"no public address found on {where}: set oakestra.public_ipv4 "
                              "(and public_ipv6) or network.public_interfaces",
                              field="oakestra.public_ipv4")
        return found

    def _meta(self, joined: Joined) -> dict:
        return {"gateway_id": joined.gateway_id, "internal_ipv4": joined.ipv4,
                "internal_ipv6": joined.ipv6, "cluster_url": self.settings.oakestra.cluster_url}

    def _rejoin(self) -> None:
        oak = self.settings.oakestra
        current = self._joined
        def register():
            # Inside the retry: after a reboot the public addresses (DHCP, SLAAC) may come
            # up only after the gateway has started.
            try:
                public = self.public_ips()
            except ConfigError as exc:
                raise Retryable(exc.message) from None
            self._hush_unless_master()
            return self.client.register(current.gateway_id, public.get("ipv4", ""),
                                        public.get("ipv6", ""))

        try:
            gid = retry(f"re-register gateway {current.gateway_id} with the cluster",
                        register, give_up_after=None, backoff_max=oak.backoff_max,
                        stop=self._stop, retry_all=True)
            if gid == current.gateway_id:
                # The same registration: the stored addresses stand. Oakestra's root service
                # manager hands out a new address on every GET .../ip, so asking would churn.
                ipv4, ipv6 = current.ipv4, current.ipv6
            else:
                ipv4, ipv6 = retry("fetch the internal addresses from the cluster",
                                   lambda: self.client.internal_ips(gid), give_up_after=None,
                                   backoff_max=oak.backoff_max, stop=self._stop,
                                   retry_all=True)
        except Stopped:
            return
        except Hushed:
            with self._announce:
                self._registering = False  # the next promotion registers
            log.info("not the pair's master (now): registration left to the master")
            return
        except GatewayError as exc:  # e.g. the public addresses cannot be found
            log.error("re-registration failed: %s", exc.message)
            return
        if self.pair and gid != current.gateway_id:
            # Another id would make the pair two gateways (the other node registers as
            # oakestra.gateway_id): nothing is announced until the operator has looked.
            log.error("the cluster answered gateway id %s to the registration of the pair "
                      "%s: not announcing (a pair is one gateway under oakestra.gateway_id; "
                      "check the cluster's registration of %s)", gid, current.gateway_id,
                      current.gateway_id)
            self._rejoined.set()
            return
        changed = {}
        if gid != current.gateway_id:
            log.warning("the cluster answered gateway id %s to the re-registration of %s: "
                        "using %s from now on", gid, current.gateway_id, gid)
            changed["gateway_id"] = gid
        if (ipv4, ipv6) != (current.ipv4, current.ipv6):
            log.warning("the cluster now assigns the internal addresses %s and %s (the gateway "
                        "serves on %s and %s): applying them", ipv4, ipv6, current.ipv4,
                        current.ipv6)
            # Stored first: should the process die before they are applied, the next start
            # brings them up from the store.
            changed.update(internal_ipv4=ipv4, internal_ipv6=ipv6)
            self._new_addresses = (ipv4, ipv6)
        if changed:
            try:
                self.store.commit(meta={**changed, "cluster_url": oak.cluster_url})
            except GatewayError as exc:
                log.error("could not store the new registration: %s", exc.message)
        self._joined = Joined(gid, current.ipv4, current.ipv6)
        log.info("re-registered with %s as gateway %s", self.client.url, gid)
        self._rejoin_ok = True
        self._rejoined.set()

    # -- step 4 -----------------------------------------------------------------------------

    def speak(self, token: str | None) -> None:
        """This node became its pair's master: announce the pair to the cluster from here.
        The first time in this process register (step 1, under the pair's id), then report
        ready (step 4) with the newest token; on later promotions ready again, through the
        one announcer. Each try checks that the node is still the master: a demoted node
        drops what it was sending (`Hushed`), so a backup never takes the pair over."""
        with self._announce:
            if not self._registering:
                self._registering = True
                self._spawn("oakestra-register", self._rejoin)
        self.announce_ready(token)

    def _hush_unless_master(self) -> None:
        if self.pair and not self._may_speak():
            raise Hushed()

    def announce_ready(self, token: str | None) -> None:
        """Step 4 with `token`, now (after a token rotation too); in a pair only the master's
        announcement goes out (see `speak`)."""
        if self.settings.standalone:
            return
        with self._announce:
            self._token = token
            self._wanted += 1
            self._announce.notify_all()
            if self._announcer is None:
                self._announcer = self._spawn("oakestra-ready", self._announce_loop)

    def _announce_loop(self) -> None:
        # On a restart, wait for the re-registration (it may take as long as the cluster is down).
        while not self._rejoined.wait(0.5):
            if self._stop.is_set():
                return
        if not self._rejoin_ok:
            return
        replicas = len(self.client.urls) > 1
        sent = 0
        while not self._stop.is_set():
            with self._announce:
                wanted = self._wanted
            if sent != wanted:
                if not self._send_ready():
                    return
                sent = wanted
                continue
            with self._announce:
                if self._wanted == sent and not self._stop.is_set():
                    self._announce.wait(self.settings.oakestra.probe_interval if replicas
                                        else None)
                woken = self._wanted != sent or self._stop.is_set()
            if replicas and not woken and not self._watch_once():
                return

    def _watch_once(self) -> bool:
        """With replicas: check the orchestrator in use (every `oakestra.probe_interval`);
        when it stops answering, switch to the next and announce the gateway there (register
        under its id, then ready with the newest token), as on a restart. False when that
        cannot be done (stopped, or the re-registration failed)."""
        try:
            self.client.probe()  # a failure has already switched to the next one
            return True
        except Retryable as exc:
            if self.pair and not self._may_speak():
                # Switched; a backup announces nothing there (its next promotion will).
                log.warning("the cluster orchestrator stopped answering (%s): the pair's "
                            "master announces to %s", exc, self.client.url)
                return True
            log.warning("the cluster orchestrator stopped answering (%s): announcing the "
                        "gateway to %s", exc, self.client.url)
        self._rejoin_ok = False
        self._rejoined.clear()
        self._rejoin()
        if not self._rejoin_ok and self.pair and not self._may_speak():
            return True  # demoted meanwhile: the next promotion registers and announces
        return self._rejoin_ok and self._send_ready()

    def _send_ready(self) -> bool:
        """Step 4, retried (through the replicas) until it works; every try carries the newest
        token. False when stopped; True when done or dropped (a pair's node demoted)."""
        oak = self.settings.oakestra
        self._apply_new_addresses()
        joined = self._joined

        def ready():
            self._hush_unless_master()
            return self.client.ready(joined.gateway_id, joined.ipv4, joined.ipv6,
                                     self.settings.api.port, self._token)

        try:
            retry("report ready to the cluster", ready, give_up_after=None,
                  backoff_max=oak.backoff_max, stop=self._stop, retry_all=True)
        except Stopped:
            return False
        except Hushed:
            log.info("not the pair's master (now): the ready announcement is dropped (the "
                     "master announces the pair)")
            return True
        self.announcements += 1
        log.info("reported ready to %s: gateway %s, API on port %d%s", self.client.url,
                 joined.gateway_id, self.settings.api.port,
                 f", internal {joined.ipv4} and {joined.ipv6} now on this node, the pair's "
                 "master" if self.pair else "")
        self.ready_sent.set()
        return True

    def _apply_new_addresses(self) -> None:
        """New internal addresses from the re-registration: applied live, then they are the
        ones announced. Should that fail, the gateway keeps serving and announcing the old
        ones (the store has the new ones for the next start)."""
        new, self._new_addresses = self._new_addresses, None
        if new is None:
            return
        joined = self._joined
        if self._readdress is None:
            log.error("the cluster assigns the internal addresses %s and %s, but the gateway "
                      "serves on %s and %s: stored; restart it to use the new ones", *new,
                      joined.ipv4, joined.ipv6)
            return
        try:
            self._readdress(*new)
        except GatewayError as exc:
            log.error("could not apply the new internal addresses %s and %s (%s): serving on "
                      "%s and %s until a restart", *new, exc.message, joined.ipv4, joined.ipv6)
            return
        self._joined = Joined(joined.gateway_id, *new)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def gateway_id(self) -> str | None:
        return self._joined.gateway_id if self._joined else None

    def status(self) -> dict:
        """Which orchestrator the gateway uses ({} in standalone mode)."""
        if self.client is None:
            return {}
        return {"mode": "http", "active": self.client.url,
                "configured": list(self.settings.oakestra.cluster_urls),
                **({"announced": self.announcements} if self.pair else {})}

    def _spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._announce:
            self._announce.notify_all()
        for thread in self._threads:
            thread.join(timeout)
