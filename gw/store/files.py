"""The store's files: durable directories and replaces, reads that say why they failed, the
lock, and the names of a store's files. Also used for other files that must survive a crash
(the daemon's generated token)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from gw.core.errors import StoreCorrupt, StoreLocked, StoreUnavailable


class FileCalls:
    """The two calls a journal record's durability rests on. A test hands the store failing
    ones (gw/daemon/faults.py) to reach the states a dying disk leaves."""

    def sync(self, fd: int) -> None:
        os.fdatasync(fd)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def store_exists(path: Path) -> bool:
    """Whether anything was ever stored at `path`: the snapshot or a journal (a daemon that
    never compacted has only a journal)."""
    return path.parent.is_dir() and any(p.name == path.name or
                                        p.name.startswith(path.name + ".journal")
                                        for p in path.parent.iterdir())


def segments(path: Path) -> list[tuple[int, Path]]:
    """The earlier journals of the store at `path`, oldest first."""
    prefix = path.name + ".journal."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreUnavailable(f"cannot list {path.parent}: {why(e)}") from e
    return sorted((int(name[len(prefix):]), path.parent / name) for name in names
                  if name.startswith(prefix) and name[len(prefix):].isdigit())


def why(e: OSError) -> str:
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    return f"{e.strerror} ({code})" if e.strerror and code else str(e)


def corrupt(path: Path, problem: str) -> StoreCorrupt:
    return StoreCorrupt(f"{path}: {problem}. The store was not opened and no file was changed "
                        "(see 'Recovery' in the store documentation).")


def read_bytes(path: Path) -> bytes:
    """The file's bytes; a missing file reads as empty."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise StoreUnavailable(f"cannot read {path}: {why(e)}") from e


def fsync_dir(directory: Path) -> None:
    """Makes the names in `directory` (a file created, renamed or removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(directory: Path) -> None:
    """Creates the store's directory, durably, if it is missing."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    fsync_dir(directory.parent)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def keep_backup(path: Path) -> None:
    """Makes the current snapshot the .bak one. A hard link: it costs nothing whatever its size,
    and the snapshot is never written in place, only replaced."""
    if not path.exists():
        return
    bak, tmp = sibling(path, ".bak"), sibling(path, ".bak.tmp")
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    os.replace(tmp, bak)


def take_lock(path: Path, *, shared: bool) -> int:
    """flock's the store's lock file, shared (a reader) or exclusive (the writer); returns the
    fd that holds it. Raises StoreLocked when another process holds it the other way."""
    lock_path = sibling(path, ".lock")
    try:
        make_dir(path.parent)
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StoreUnavailable(f"cannot open the store's lock file {lock_path}: "
                               f"{why(e)}") from e
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = ("another process holds it for writing (the oakestra-gw daemon?)"
                  if shared else "another process holds it (another oakestra-gw "
                                 "daemon, or a CLI command reading the store?)")
        raise StoreLocked(f"the store {path} is in use: {lock_path} is locked; "
                          f"{holder}") from None
    return fd
