"""Filesystems for tests: a private mount namespace, a loop-mounted ext4 image in it that can
lose power (EXT4_IOC_SHUTDOWN / NOLOGFLUSH), and a helper that fills a filesystem.

Everything here cleans up after itself: the namespace, and every mount and loop device made in
it, go away with the helper's close() (or unmount()), also after a failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gw.daemon.faults import shut_down_path


def require_tools(*names: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


class MountNamespace:
    """A private mount namespace held by a child process (`unshare --mount --propagation
    private cat`). Mounts made in it are seen by no other namespace: not even by one that
    another process creates meanwhile (`ip netns exec` does, and would keep a copy of the
    mount, and its loop device, alive); and when the holder ends, its mounts go with it (it ends
    when our end of its stdin closes, also if this process dies without cleaning up). Other
    processes reach the mounts through /proc/<holder>/root (see `path`)."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "cat"],
                                       stdin=subprocess.PIPE)
        for _ in range(500):
            if os.path.realpath(f"/proc/{self.holder.pid}/exe").endswith("/cat"):
                return
            time.sleep(0.01)
        self.close()
        raise RuntimeError("unshare --mount did not start")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", *argv],
                              check=check, capture_output=True, text=True, timeout=60)

    def path(self, path: Path) -> Path:
        """`path` (inside the namespace) as any process sees it."""
        return Path(f"/proc/{self.holder.pid}/root") / Path(path).relative_to("/")

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.stdin.close()
            try:
                self.holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()


@contextlib.contextmanager
def mount_namespace():
    require_tools("unshare", "nsenter", "mount")
    ns = MountNamespace()
    try:
        yield ns
    finally:
        ns.close()


class Ext4:
    """A loop-mounted ext4 image in a private mount namespace; `path` is its mount point as
    every process sees it. Creating one makes the image (mkfs.ext4) and the mount point."""

    def __init__(self, ns: MountNamespace, directory: Path, size_mb: int = 64):
        self.ns = ns
        self.image = directory / "ext4.img"
        self.mountpoint = directory / "mnt"
        self.path = ns.path(self.mountpoint)
        self.loop: str | None = None
        with open(self.image, "wb") as f:
            f.truncate(size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True,
                       capture_output=True, text=True)
        self.mountpoint.mkdir()

    def mount(self) -> None:
        loop = subprocess.run(["losetup", "--find", "--show", str(self.image)], check=True,
                              capture_output=True, text=True).stdout.strip()
        try:
            self.ns.run("mount", "-t", "ext4", loop, str(self.mountpoint))
        except BaseException:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
            raise
        self.loop = loop

    def shutdown(self) -> None:
        """Power loss: what was not fsync'd (and committed to ext4's journal) is gone."""
        shut_down_path(self.path)

    def unmount(self) -> None:
        if self.loop:
            for _ in range(50):
                if self.ns.run("umount", str(self.mountpoint), check=False).returncode == 0:
                    break
                time.sleep(0.1)
            # If still busy, the loop device goes when its last user (the namespace) does.
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None

    def remount(self) -> None:
        self.unmount()
        self.mount()


def fill(directory: Path) -> Path:
    """Fills the filesystem to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"x" * size)
    return filler
