"""Every gateway follows the shared table: a thread that watches the etcd prefix from the
revision this gateway has read and hands each message's news to `Gateway.follow` (element
transactions in the kernel, flushes for what went away).

Whenever the watch is lost (compacted, cancelled, a member without a leader, etcd unreachable)
the table is read again at one revision and the kernel reloaded in one transaction if it
differs (`Gateway.resync`), then the watch resumes from that revision. A watch that only went
quiet resumes where it was. Until etcd answers again the gateway is not ready, cause "etcd",
and forwards with the table it has.
"""

from __future__ import annotations

import logging
import threading

from ..core.errors import GatewayError
from ..store import etcd_client as ec
from ..store.etcd import EtcdStore
from ..store.etcd_keys import table_prefix
from .gateway import Gateway

log = logging.getLogger(__name__)

CAUSE = "etcd"


class Follower:
    RETRY_MIN, RETRY_MAX = 0.1, 2.0

    def __init__(self, gateway: Gateway, store: EtcdStore, *, idle_timeout: float = 30.0):
        self.gateway = gateway
        self.store = store
        self.idle_timeout = idle_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if store.unreachable:
            gateway.health.set(CAUSE, f"not following the shared table since the start, "
                                      f"serving the local copy of it: {store.unreachable}")

    def start(self, read_first: bool = False) -> Follower:
        self._thread = threading.Thread(target=self._run, args=(read_first,),
                                        name="etcd-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, read_first: bool) -> None:
        must_read = read_first or bool(self.store.unreachable)
        wait = self.RETRY_MIN
        while not self._stop.is_set():
            try:
                if must_read:
                    self.gateway.resync(self.store.read_all)
                    must_read, wait = False, self.RETRY_MIN
                    log.info("read the shared table at revision %d", self.store.revision)
                self._watch()
            except ec.WatchIdle:
                continue
            except ec.Compacted as e:
                log.warning("the watch's revision was compacted (%s): reading the table again",
                            e.message)
                must_read = True
                continue
            except ec.EtcdError as e:
                self._lost(e.message)
                must_read = True
            except GatewayError as e:
                self._lost(e.message)
                must_read = True
            except Exception as e:  # noqa: BLE001 - the follower must go on
                log.exception("the etcd follower failed")
                self._lost(f"{type(e).__name__}: {e}")
                must_read = True
            self._stop.wait(wait)
            wait = min(wait * 2, self.RETRY_MAX)
        log.info("stopped following the shared table")

    def _watch(self) -> None:
        head = table_prefix(self.store.prefix)
        for revision, events in self.store.client.watch(head, self.store.revision + 1,
                                                        idle_timeout=self.idle_timeout):
            self.store.reachable()
            if CAUSE in self.gateway.health:
                self.gateway.health.clear(CAUSE)
                log.info("following the shared table again from revision %d",
                         self.store.revision)
            if self._stop.is_set():
                return
            if events:
                self.gateway.follow(lambda r=revision, ev=events: self.store.events(r, ev))
            else:
                self.store.events(revision, [])

    def _lost(self, why: str) -> None:
        if CAUSE not in self.gateway.health:
            log.warning("lost the shared table on etcd: %s; forwarding with the table held, "
                        "changes refused until it is back", why)
        self.gateway.health.set(CAUSE, f"the shared table on etcd: {why}")
