"""Joining the Oakestra cluster (docs/oakestra.md, "Joining the cluster").

1. ``POST {cluster_url}/api/gateway/register`` ``{"gateway_id", "gateway_ipv4", "gateway_ipv6"}``
   (the public addresses; the id is "" on a first start) -> ``{"gateway_id"}``.
2. ``GET {cluster_url}/api/gateway/<id>/ip``
   -> ``{"oakestra_gateway_ipv4", "oakestra_gateway_ipv6"}``.
3. The bridge carries the internal addresses; the server loads the table and binds the API.
4. ``POST {cluster_url}/api/gateway/<id>/ready`` ``{"oakestra_gateway_ipv4",
   "oakestra_gateway_ipv6", "api_port", "api_token"}``.

Every call is retried with capped exponential backoff, one log line per failed try.

- First start (no id and addresses in the store): steps 1 and 2 block the start. Connection
  failures, timeouts and 5xx/408/429 answers are retried until ``oakestra.give_up_after``
  seconds have passed; any other 4xx, or an answer that does not hold what the contract says,
  ends the start at once. Either way a `ClusterError` with a sentence saying what happened, and
  nothing was changed but the id `register` answered (kept in the store's meta, so the next
  start registers under it and not as a new gateway): no bridge, no address. Only after both
  answers are validated are the bridge set up and the addresses stored.
- Restart (id and addresses stored): the stored addresses are used at once, so the server loads
  the table and traffic flows without waiting for the cluster; step 1 runs in the background
  under the stored id, retried for as long as the process lives. Step 2 follows only when the
  cluster answers another id (a new registration): Oakestra's root service manager hands out a
  new address on every call, so asking again for the same registration would churn. Should
  the addresses differ, the store is updated (they take effect at the next start; the running
  process keeps the ones it serves on, and says so).
- Step 4 always runs in the background once the API listens, after steps 1-2 succeeded, in
  one announcer thread: a newer announcement (a rotated token) replaces an older one.
- Standalone (no ``cluster_url``): the addresses come from the config; only step 3.
- Replicas (``cluster_url`` a list): every call goes to the orchestrator in use and moves to
  the next on a failure that may work elsewhere. Once ready, the one in use is probed every
  ``oakestra.probe_interval``; when it stops answering the gateway switches and announces
  itself to the next (steps 1, 2 and 4 again, under its id).

The server calls `bring_up` and `announce_ready` (and `stop` at shutdown); their signatures are
the contract between gw.daemon.server and this module.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import __version__

from ..kernel import netlink
from ..core.config import Settings
from ..core.errors import ConfigError, GatewayError

log = logging.getLogger(__name__)

GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
FIRST_DELAY = 0.5
REQUEST_TIMEOUT = (3.05, 10.0)  # connect, read
RETRY_STATUS = {408, 425, 429}


class ClusterError(GatewayError):
    """Joining the cluster failed; the message says at which step and why."""

    code = "cluster_error"


class ClusterUnreachable(ClusterError):
    """No usable answer before `oakestra.give_up_after` ran out."""

    code = "cluster_unreachable"


class ClusterRefused(ClusterError):
    """The cluster answered with a client error (4xx): trying again will not help."""

    code = "cluster_refused"


class ClusterGarbage(ClusterError):
    """The cluster answered 2xx with something the contract does not allow."""

    code = "cluster_invalid_answer"


class _Retryable(Exception):
    """A failed try that may work later (connection refused, timeout, 5xx)."""


class _Stopped(Exception):
    """stop() was called while waiting for the next try."""


# -- the HTTP client ---------------------------------------------------------------------------

class ClusterClient:
    """One call per contract step; each returns validated values or raises `_Retryable`,
    `ClusterRefused` or `ClusterGarbage`.

    `url` may be a list: the orchestrator and the replicas that take over when it fails
    (Oakestra's gateway error-handling design). Calls go to the current one; a failure that
    may work elsewhere (connection refused, timeout, 5xx) moves to the next before the
    caller's retry."""

    def __init__(self, url: str | tuple[str, ...], timeout=REQUEST_TIMEOUT, session=None):
        import requests

        self.urls = tuple(u.rstrip("/") for u in ((url,) if isinstance(url, str) else url))
        self._index = 0
        self.timeout = timeout
        self._requests = requests
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"oakestra-gw/{__version__}"

    @property
    def url(self) -> str:
        """The orchestrator in use."""
        return self.urls[self._index]

    def advance(self, why: str) -> None:
        """Move to the next orchestrator of the list (a list of one stays)."""
        if len(self.urls) < 2:
            return
        old = self.url
        self._index = (self._index + 1) % len(self.urls)
        log.warning("cluster orchestrator %s failed (%s): switching to %s", old, why, self.url)

    def probe(self) -> None:
        """Whether the orchestrator in use answers at all: any answer below 500 to
        ``GET /`` counts (the contract has no side-effect-free call to use instead)."""
        self._call("GET", "/", None, want_json=False, probe=True)

    def register(self, gateway_id: str, public_ipv4: str, public_ipv6: str) -> str:
        body = {"gateway_id": gateway_id, "gateway_ipv4": public_ipv4,
                "gateway_ipv6": public_ipv6}
        answer = self._call("POST", "/api/gateway/register", body)
        new_id = _field(answer, "gateway_id", "POST /api/gateway/register")
        if not isinstance(new_id, str) or not GATEWAY_ID_RE.fullmatch(new_id):
            raise ClusterGarbage(f"the cluster's answer to POST /api/gateway/register holds "
                                 f"gateway_id {_show(new_id)}, not an id (1-128 of A-Z a-z 0-9 "
                                 "and . _ : -)")
        return new_id

    def internal_ips(self, gateway_id: str) -> tuple[str, str]:
        what = f"GET /api/gateway/{gateway_id}/ip"
        answer = self._call("GET", f"/api/gateway/{gateway_id}/ip", None)
        return (_internal(answer, "oakestra_gateway_ipv4", 4, what),
                _internal(answer, "oakestra_gateway_ipv6", 6, what))

    def ready(self, gateway_id: str, ipv4: str, ipv6: str, api_port: int,
              token: str | None) -> None:
        self._call("POST", f"/api/gateway/{gateway_id}/ready",
                   {"oakestra_gateway_ipv4": ipv4, "oakestra_gateway_ipv6": ipv6,
                    "api_port": api_port, "api_token": token}, want_json=False)

    def _call(self, method: str, path: str, body: dict | None, want_json: bool = True,
              probe: bool = False) -> Any:
        try:
            return self._call_one(method, path, body, want_json, probe)
        except _Retryable as exc:
            self.advance(str(exc))
            raise

    def _call_one(self, method: str, path: str, body: dict | None, want_json: bool,
                  probe: bool) -> Any:
        what = f"{method} {path}"
        try:
            resp = self.session.request(method, self.url + path, json=body,
                                        timeout=self.timeout, allow_redirects=False)
        except self._requests.Timeout:
            raise _Retryable(f"{what}: no answer within {self.timeout[1]:g} s") from None
        except self._requests.ConnectionError as exc:
            raise _Retryable(f"{what}: cannot connect to {self.url} ({_conn_reason(exc)})") \
                from None
        except self._requests.RequestException as exc:
            raise _Retryable(f"{what}: {exc}") from None
        status = resp.status_code
        if status >= 500 or status in RETRY_STATUS:
            raise _Retryable(f"{what}: the cluster answered {status} {resp.reason}"
                             f"{_excerpt(resp.text)}")
        if probe:
            return None  # it answers: alive, whatever it thinks of GET /
        if status >= 300:
            raise ClusterRefused(f"the cluster refused {what}: {status} {resp.reason}"
                                 f"{_excerpt(resp.text)}")
        if not want_json:
            return None
        try:
            answer = resp.json()
        except ValueError:
            raise ClusterGarbage(f"the cluster's answer to {what} is not JSON"
                                 f"{_excerpt(resp.text) or ' (empty body)'}") from None
        if not isinstance(answer, dict):
            raise ClusterGarbage(f"the cluster's answer to {what} is not a JSON object "
                                 f"but {_show(answer)}")
        return answer


def _field(answer: dict, name: str, what: str) -> Any:
    if name not in answer:
        raise ClusterGarbage(f"the cluster's answer to {what} has no {name!r} "
                             f"(it has: {', '.join(sorted(map(str, answer))) or 'nothing'})")
    return answer[name]


def _internal(answer: dict, name: str, version: int, what: str) -> str:
    value = _field(answer, name, what)
    try:
        ip = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        ip = None
    if ip is None or ip.version != version:
        raise ClusterGarbage(f"the cluster's answer to {what} holds {name} {_show(value)}, "
                             f"not an IPv{version} address")
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        raise ClusterGarbage(f"the cluster's answer to {what} holds {name} {ip}, which cannot "
                             "be the gateway's internal address")
    return str(ip)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _excerpt(text: str) -> str:
    text = " ".join((text or "").split())
    if not text:
        return ""
    return ": " + (text if len(text) <= 160 else text[:157] + "...")


def _conn_reason(exc: BaseException) -> str:
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return m[1].strip() if m else "connection failed"


# -- retries -----------------------------------------------------------------------------------

def retry(what: str, attempt: Callable[[], Any], *, give_up_after: float | None,
          backoff_max: float, stop: threading.Event, retry_all: bool = False,
          clock=time.monotonic) -> Any:
    """Call `attempt` until it returns. A `_Retryable` failure (and with `retry_all` any
    `ClusterError`) waits 0.5 s, 1 s, 2 s, ... up to `backoff_max`, one warning per try. With
    `give_up_after` (seconds) raise `ClusterUnreachable` once that has passed."""
    start = clock()
    delay, tries = FIRST_DELAY, 0
    while True:
        tries += 1
        try:
            return attempt()
        except _Retryable as exc:
            problem = str(exc)
        except ClusterError as exc:
            if not retry_all:
                raise
            problem = exc.message
        elapsed = clock() - start
        if give_up_after is not None:
            left = give_up_after - elapsed
            if left <= 0:
                raise ClusterUnreachable(
                    f"gave up joining the Oakestra cluster after {tries} tr"
                    f"{'y' if tries == 1 else 'ies'} in {elapsed:.1f} s "
                    f"(oakestra.give_up_after = {give_up_after:g}): {problem}")
            wait = min(delay, left)
        else:
            wait = delay
        log.warning("%s: try %d failed: %s; next try in %.1f s", what, tries, problem, wait)
        if stop.wait(wait):
            raise _Stopped()
        delay = min(delay * 2, backoff_max)


# -- membership --------------------------------------------------------------------------------

@dataclass
class Joined:
    gateway_id: str
    ipv4: str
    ipv6: str


class Membership:
    """The gateway's membership in one cluster, for the life of one process."""

    def __init__(self, settings: Settings, store, client: ClusterClient | None = None,
                 readdress: Callable[[str, str], None] | None = None):
        self.settings = settings
        self.store = store
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
                raise ConfigError(f"gateway_id {_show(gid)} is not an id")
            if v4 is None and v6 is None:
                return gid
            self.settings.with_internal_ips(str(v4), str(v6))
        except ConfigError as exc:
            raise ClusterError(f"the store {self.store.path} holds an unusable registration "
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
        except _Stopped:
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
                raise _Retryable(exc.message) from None
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
        except _Stopped:
            return
        except GatewayError as exc:  # e.g. the public addresses cannot be found
            log.error("re-registration failed: %s", exc.message)
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

    def announce_ready(self, token: str | None) -> None:
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
        except _Retryable as exc:
            log.warning("the cluster orchestrator stopped answering (%s): announcing the "
                        "gateway to %s", exc, self.client.url)
        self._rejoin_ok = False
        self._rejoined.clear()
        self._rejoin()
        return self._rejoin_ok and self._send_ready()

    def _send_ready(self) -> bool:
        """Step 4, retried (through the replicas) until it works; every try carries the newest
        token. False when stopped."""
        oak = self.settings.oakestra
        self._apply_new_addresses()
        joined = self._joined
        try:
            retry("report ready to the cluster",
                  lambda: self.client.ready(joined.gateway_id, joined.ipv4, joined.ipv6,
                                            self.settings.api.port, self._token),
                  give_up_after=None, backoff_max=oak.backoff_max, stop=self._stop,
                  retry_all=True)
        except _Stopped:
            return False
        log.info("reported ready to %s: gateway %s, API on port %d", self.client.url,
                 joined.gateway_id, self.settings.api.port)
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


# -- the server's entry points -----------------------------------------------------------------

_current: Membership | None = None
_current_lock = threading.Lock()


def bring_up(settings: Settings, store,
             readdress: Callable[[str, str], None] | None = None) -> Settings:
    """Before the table is loaded and the API binds: returns the settings with the internal
    IPs filled in (standalone: from the config; Oakestra mode: stored or from the cluster),
    after the bridge towards the Oakestra network carries them. Raises a GatewayError (a
    `ClusterError` when the cluster cannot be joined on a first start) with a clear message;
    the server exits 1 with it. `readdress(ipv4, ipv6)` applies new internal addresses the
    cluster hands out later, live."""
    global _current
    membership = Membership(settings, store, readdress=readdress)
    with _current_lock:
        if _current is not None:
            _current.stop(timeout=0)
        _current = membership
    return membership.bring_up()


def announce_ready(settings: Settings, store, token: str | None) -> None:
    """After the API listens: the ready callback to the cluster (Oakestra mode only; runs
    in the background with retries, never blocks serving)."""
    global _current
    with _current_lock:
        membership = _current
        if membership is None or membership.store is not store:
            # bring_up ran elsewhere (a reload): the stored registration is authoritative.
            membership = Membership(settings, store)
            meta = store.meta()
            if not settings.standalone and meta.get("gateway_id"):
                membership._joined = Joined(meta["gateway_id"],
                                            str(settings.network.internal_ipv4),
                                            str(settings.network.internal_ipv6))
                membership._rejoin_ok = True
                membership._rejoined.set()
            _current = membership
    membership.announce_ready(token)


def gateway_id() -> str | None:
    """The id this gateway is registered under (None before the first registration)."""
    with _current_lock:
        return _current.gateway_id if _current is not None else None


def cluster_status() -> dict:
    """Which orchestrator the gateway uses ({} in standalone mode)."""
    with _current_lock:
        membership = _current
    if membership is None or membership.client is None:
        return {}
    return {"mode": "http", "active": membership.client.url,
            "configured": list(membership.settings.oakestra.cluster_urls)}


def stop() -> None:
    """At shutdown: end the background retries."""
    with _current_lock:
        if _current is not None:
            _current.stop()
