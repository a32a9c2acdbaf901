"""TEST ONLY: faults for the crash and edge tests (tests/reliability), injected where the daemon
builds its objects (gw/daemon/build.py): wrappers of the firewall and the store (`wrap`), and
the store's file calls (`file_calls`); never by patching the daemon or the store.

OAKESTRA_GW_TEST_CRASH="before-kernel:N" makes the process die at once (os._exit, no cleanup:
like a crash) in its N-th change of exposures, after the store commit and before the kernel
commit; "after-kernel:N" right after the kernel commit, before the answer;
"refuse-then-store-fails:N" makes the N-th kernel commit refused and the store's next write
(the revert) fail; "sync-then-cut-fails:N" makes the N-th journal fdatasync fail (EIO) and the
truncate that takes the record back fail (EROFS). Two points make a real ext4 fail instead
(its state directory on one; tests/fs.py): "shutdown-before-sync:N" shuts the file system down
(EXT4_IOC_SHUTDOWN, NOLOGFLUSH: power loss as ext4 sees it) right before the N-th journal
fdatasync, after the record was written; "refuse-then-shutdown:N" shuts it down when the N-th
kernel commit comes, then refuses that commit, so the revert's write fails. The errors are the
kernel's (EIO), only the moment is chosen. "refuse-port:P" makes the kernel refuse every
element transaction that adds exposed port P, as it would an element it cannot take: the
others in the same group commit must not fail with it.
OAKESTRA_GW_TEST_REFUSE_LOADS=N: the N loads of the whole table after the first one (the
start) fail as a kernel refusal would, so a failing repair can be tested.
OAKESTRA_GW_TEST_SLOW_FLUSH=S: each flush of deleted exposures' flows starts S seconds late
(what a flush looks like on a loaded node, made certain rather than likely).
Read once at start; never set them in production.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from typing import Mapping

from ..core.errors import ConfigError, KernelRefused, StoreUnavailable
from ..store.files import FileCalls

log = logging.getLogger(__name__)

CRASH_ENV = "OAKESTRA_GW_TEST_CRASH"
CRASH_EXIT = 97
REFUSE_ENV = "OAKESTRA_GW_TEST_REFUSE_LOADS"
SLOW_FLUSH_ENV = "OAKESTRA_GW_TEST_SLOW_FLUSH"
POINTS = ("before-kernel", "after-kernel", "refuse-then-store-fails", "sync-then-cut-fails",
          "shutdown-before-sync", "refuse-then-shutdown", "refuse-port")
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def shut_down(fd: int) -> None:
    """Shuts down the ext4 file system `fd` is on, as a power loss would: what was not made
    durable is gone, and every further call on it fails (EIO) until it is mounted again."""
    fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))


def shut_down_path(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        shut_down(fd)
    finally:
        os.close(fd)


class _Wrapper:
    """Everything not overridden goes to the wrapped object."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FaultyStore(_Wrapper):
    """A store whose next commit can be made to fail as on a file system gone read-only."""

    _fail_next = False

    def fail_next_commit(self) -> None:
        self._fail_next = True

    def commit(self, *args, **kwargs):
        if self._fail_next:
            self._fail_next = False
            raise StoreUnavailable(f"cannot write the store's journal: "
                                   f"{os.strerror(errno.EROFS)} (test only)")
        return self.inner.commit(*args, **kwargs)


class FaultyFirewall(_Wrapper):
    """`apply` is what Gateway.add and Gateway.delete call exactly between their store commit
    and their answer; `load` is the whole table (start, reload, repair)."""

    def __init__(self, inner, store: FaultyStore, point: str | None = None, nth: int = 0,
                 refuse_loads: int = 0):
        super().__init__(inner)
        self.store, self.point, self.nth, self.refuse_loads = store, point, nth, refuse_loads
        self.applies = self.loads = 0

    def apply(self, add=(), remove=()):
        add, remove = list(add), list(remove)
        if self.point == "refuse-port" and any(e.exposed_port == self.nth for e in add):
            raise KernelRefused(f"{CRASH_ENV}: nftables refused port {self.nth} (test only)")
        self.applies += 1
        due = self.applies == self.nth
        if due and self.point == "refuse-then-store-fails":
            # A double failure: the kernel refuses, and the store's next write (the revert)
            # fails.
            self.store.fail_next_commit()
            raise KernelRefused(f"{CRASH_ENV}: nftables refused the transaction (test only)")
        if due and self.point == "refuse-then-shutdown":
            # The same double failure from a real file system: it dies now, so the revert's
            # journal write fails with ext4's own error.
            log.critical("%s: shutting down the file system of %s", CRASH_ENV,
                         self.store.path.parent)
            shut_down_path(self.store.path.parent)
            raise KernelRefused(f"{CRASH_ENV}: nftables refused the transaction (test only)")
        if due and self.point == "before-kernel":
            log.critical("%s: exiting after the store commit, before the kernel commit", CRASH_ENV)
            os._exit(CRASH_EXIT)
        self.inner.apply(add=add, remove=remove)
        if due and self.point == "after-kernel":
            log.critical("%s: exiting after the kernel commit, before the answer", CRASH_ENV)
            os._exit(CRASH_EXIT)

    def load(self, *args, **kwargs):
        self.loads += 1
        if 1 < self.loads <= 1 + self.refuse_loads:
            raise KernelRefused(f"nftables refused the change ({REFUSE_ENV}, load {self.loads})")
        return self.inner.load(*args, **kwargs)


def parse(environ: Mapping[str, str]) -> tuple[str | None, int, int]:
    """(crash point, N, refused loads) from the environment; ConfigError naming the variable."""
    point, nth, refuse = None, 0, 0
    if environ.get(CRASH_ENV):
        spec = environ[CRASH_ENV]
        point, _, count = spec.partition(":")
        if point not in POINTS or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"{CRASH_ENV}={spec!r}: expected one of {', '.join(POINTS)}, "
                              "then :N")
        nth = int(count)
    if environ.get(REFUSE_ENV):
        spec = environ[REFUSE_ENV]
        if not spec.isdigit():
            raise ConfigError(f"{REFUSE_ENV}={spec!r}: expected a number")
        refuse = int(spec)
    return point, nth, refuse


class SyncThenCutFails(FileCalls):
    """The nth journal fdatasync fails with EIO, then the truncate after it with EROFS: the
    record was written and stays in the journal (the store poisons itself)."""

    def __init__(self, nth: int):
        self.nth, self.syncs, self.cut_fails = nth, 0, False

    def sync(self, fd: int) -> None:
        self.syncs += 1
        if self.syncs != self.nth:
            return super().sync(fd)
        self.cut_fails = True
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (test only)")

    def truncate(self, fd: int, length: int) -> None:
        if self.cut_fails:
            self.cut_fails = False
            raise OSError(errno.EROFS, f"{os.strerror(errno.EROFS)} (test only)")
        super().truncate(fd, length)


class ShutdownBeforeSync(FileCalls):
    """Before the nth journal fdatasync, the file system is shut down; then the real fdatasync
    runs (and fails), and so does the truncate after it: the record was written whole and
    neither made durable nor taken back, as ext4 itself decides."""

    def __init__(self, nth: int):
        self.nth, self.syncs = nth, 0

    def sync(self, fd: int) -> None:
        self.syncs += 1
        if self.syncs == self.nth:
            log.critical("%s: shutting down the file system before fdatasync", CRASH_ENV)
            shut_down(fd)
        super().sync(fd)


def file_calls(environ: Mapping[str, str]) -> FileCalls | None:
    """The store's file calls the environment asks for; None: the real ones."""
    point, nth, _ = parse(environ)
    calls = {"sync-then-cut-fails": SyncThenCutFails, "shutdown-before-sync": ShutdownBeforeSync}
    return calls[point](nth) if point in calls else None


def wrap(store, firewall, environ: Mapping[str, str]):
    """(store, firewall) for the gateway: the ones given, or wrappers with the faults the
    environment asks for."""
    point, nth, refuse = parse(environ)
    if point is not None:
        log.warning("%s=%s: this process will crash on purpose (test only)", CRASH_ENV,
                    environ[CRASH_ENV])
    if refuse:
        log.warning("%s=%s: table loads after the first will fail on purpose (test only)",
                    REFUSE_ENV, refuse)
    if point in (None, "sync-then-cut-fails", "shutdown-before-sync") and not refuse:
        # the latter two: see file_calls
        return store, firewall
    faulty = FaultyStore(store)
    return faulty, FaultyFirewall(firewall, faulty, point, nth, refuse)


def flush_delete(delete, environ: Mapping[str, str]):
    """The flusher's delete of flows, late by the seconds the environment asks for."""
    spec = environ.get(SLOW_FLUSH_ENV)
    if not spec:
        return delete
    try:
        delay = float(spec)
    except ValueError:
        raise ConfigError(f"{SLOW_FLUSH_ENV} must be seconds, not {spec!r}") from None
    log.warning("TEST ONLY: every flush of flows starts %g s late (%s)", delay, SLOW_FLUSH_ENV)

    def late(exposures):
        time.sleep(delay)
        return delete(exposures)
    return late
