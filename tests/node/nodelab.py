"""A real gateway node for tests: a Debian 12 root file system (debootstrap, cached) booted with
`systemd-nspawn -b` inside a lab of network namespaces.

    client netns                node netns (the nspawn container)           worker netns
    eth0 198.18.0.2/24  ----  eth0 198.18.0.1/24                 goProxyTun ---- tun0  (MTU 1450)
         2001:db8::2/64            2001:db8::1/64                fe80::1          fe80::2
                                   routes 10.30.0.0/16, fdff::/16 via goProxyTun  10.30.0.1, fdff:2000::1
                                                                                  HTTP :80, echo :7000

`Machine` is one booted node on its own; `NodeLab` wires the namespaces above around one, and
tests/node/pairnodelab.py three of them into a gateway pair.

The root file system is built once and cached under /var/cache/oakestra-gw-test/ (keyed by a
digest of the recipe and package list); every boot runs on a throwaway overlay of it, so the
cache stays clean. Everything is removed again in `close()`: the container is powered off
(killed if it does not stop), the namespaces deleted, the overlay unmounted and removed.

Known constraints of the machine this runs on (no machined, no D-Bus on the host): nspawn runs
with `--keep-unit --register=no`; the container joins the lab namespace with
`--network-namespace-path` and may write its /proc/sys/net (`SYSTEMD_NSPAWN_API_VFS_WRITABLE=
network`); commands inside run through `nsenter -t <pid of the container's systemd> -a`.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from gw.lab.netns import Netns, veth

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "ansible" / "roles" / "oakestra_gateway"
CACHE = Path(os.environ.get("OAKGW_NODE_CACHE", "/var/cache/oakestra-gw-test"))
SUITE = "bookworm"
MIRROR = os.environ.get("OAKGW_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the node carries besides the role's own packages: an init, what Ansible's modules use
# (python3-apt for the apt module, procps for sysctl), and a few tools for the checks.
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-apt", "procps",
                 "iproute2", "iputils-ping"]
# Bump when the customisation below changes: a new digest builds a new root file system.
RECIPE = 3
# Timers that would start apt or disk jobs in the middle of a test.
MASKED_UNITS = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
                "e2scrub_all.timer", "fstrim.timer", "e2scrub_reap.service"]

NODE_HOSTNAME = "oakgw-node"
CLIENT_V4, NODE_V4 = "198.18.0.2", "198.18.0.1"
CLIENT_V6, NODE_V6 = "2001:db8::2", "2001:db8::1"
SERVICE_V4, SERVICE_V6 = "10.30.0.1", "fdff:2000::1"
INTERNAL_V4, INTERNAL_V6 = "10.30.255.254", "fdff::fe"
TUNNEL_MTU = 1450
HTTP_PORT, ECHO_PORT = 80, 7000


def tools_missing() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "ip", "mount")
            if shutil.which(t) is None]


def role_packages() -> list[str]:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    return list(defaults["oakestra_gateway_packages"])


def rootfs_packages() -> list[str]:
    return sorted(set(BASE_PACKAGES) | set(role_packages()))


def cached_packages() -> list[str]:
    """What the role installs on a gateway of a pair (keepalived, conntrackd, etcd-server):
    downloaded into the root file system's apt cache but not installed, so that the role's own
    apt step installs them in the booted node (their postinst scripts run there, as on a real
    node) without a mirror, which the isolated test run cannot reach."""
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    wanted = defaults["oakestra_gateway_ha_packages"] + defaults["oakestra_gateway_etcd_packages"]
    return sorted(set(wanted) - set(rootfs_packages()))


def rootfs_key() -> str:
    recipe = json.dumps({"suite": SUITE, "mirror": MIRROR, "packages": rootfs_packages(),
                         "cached": cached_packages(), "masked": MASKED_UNITS,
                         "recipe": RECIPE}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def ensure_rootfs(log=print) -> Path:
    """The cached root file system, built first if needed (about a minute with a mirror)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    final = CACHE / f"{SUITE}-{rootfs_key()}"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final / "rootfs"
        work = Path(tempfile.mkdtemp(prefix=f".build-{SUITE}-", dir=CACHE))
        try:
            root = work / "rootfs"
            log(f"nodelab: building {final} with debootstrap from {MIRROR}")
            subprocess.run(["debootstrap", "--variant=minbase",
                            "--include=" + ",".join(rootfs_packages()), SUITE, str(root),
                            MIRROR], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=1800)
            _customise(root)
            (work / ".complete").write_text(json.dumps({"packages": rootfs_packages(),
                                                       "built": time.time()}))
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return final / "rootfs"


def wheels_key() -> str:
    text = json.dumps([requirements(), (REPO / "pyproject.toml").read_text(), sys.version])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def wheels_dir() -> Path:
    return CACHE / f"wheels-{wheels_key()}"


def requirements() -> list[str]:
    """The gateway's runtime dependencies (setup.cfg) and what building its wheel needs."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    install = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    return install + ["setuptools>=61", "wheel"]


def _cached(final: Path, what: str, argv: list[str], log) -> Path:
    """`final`, filled once by running `argv` with the work directory appended (under the
    cache lock; a half-done download never becomes `final`)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        work = Path(tempfile.mkdtemp(prefix=".wheels-", dir=CACHE))
        try:
            log(f"nodelab: downloading {what} into {final}")
            subprocess.run([*argv, str(work), *requirements()], check=True, timeout=1800)
            (work / ".complete").write_text(json.dumps(requirements()))
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return final


PIP = [sys.executable, "-m", "pip"]
PIP_QUIET = ["--quiet", "--disable-pip-version-check"]


def ensure_wheels(log=print) -> Path:
    """Wheels of the gateway's dependencies (and of its build backend), cached: the test run is
    cut off from PyPI, so the role's controller-side `pip wheel` resolves from here
    (`--no-index --find-links`). Needs PyPI the first time (`nodelab.py prepare`)."""
    return _cached(wheels_dir(), "the dependency wheels",
                   [*PIP, "wheel", *PIP_QUIET, "--wheel-dir"], log)


FOREIGN_ARCH = "aarch64"  # the wheelhouse test builds for it from an x86_64 machine
FOREIGN_PYTHON = "3.11"    # Debian 12's


def foreign_wheels_dir() -> Path:
    return CACHE / f"{FOREIGN_ARCH}-wheels-{wheels_key()}"


def build_wheelhouse_script() -> Path:
    return ROLE / "files" / "build_wheelhouse.py"


def ensure_foreign_wheels(log=print) -> Path:
    """The dependency wheels for arm64 nodes (binary ones for aarch64 and CPython 3.11),
    downloaded with the platform tags the role uses, so the wheelhouse test can build an arm64
    wheelhouse offline. Needs PyPI the first time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_wheelhouse", build_wheelhouse_script())
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    platforms = [a for tag in script.platforms(FOREIGN_ARCH) for a in ("--platform", tag)]
    abi = "cp" + FOREIGN_PYTHON.replace(".", "")
    return _cached(foreign_wheels_dir(), f"the {FOREIGN_ARCH} dependency wheels",
                   [*PIP, "download", *PIP_QUIET, "--only-binary=:all:", *platforms,
                    "--python-version", FOREIGN_PYTHON, "--implementation", "cp",
                    "--abi", abi, "--abi", "abi3", "--abi", "none", "--dest"], log)


def prepared() -> str | None:
    """None when the cache holds what the node tests need, else what to run."""
    missing = []
    if not (CACHE / f"{SUITE}-{rootfs_key()}" / ".complete").exists():
        missing.append("the Debian 12 root file system")
    if not (wheels_dir() / ".complete").exists():
        missing.append("the dependency wheels")
    if not (foreign_wheels_dir() / ".complete").exists():
        missing.append(f"the {FOREIGN_ARCH} dependency wheels")
    if not missing:
        return None
    return (f"{' and '.join(missing)} not in {CACHE}: these need network, which the isolated "
            f"test run lacks; run `{sys.executable} tests/node/nodelab.py prepare` "
            "(or `make test-node`) first")


def _customise(root: Path) -> None:
    (root / "etc" / "hostname").write_text(NODE_HOSTNAME + "\n")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {NODE_HOSTNAME}\n"
                                        "::1 localhost ip6-localhost ip6-loopback\n")
    # A fresh machine id per boot (the overlay is thrown away anyway).
    (root / "etc" / "machine-id").write_text("")
    for unit in MASKED_UNITS:
        link = root / "etc" / "systemd" / "system" / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True)
    # After the clean: these .debs (and what they depend on) stay in /var/cache/apt/archives.
    subprocess.run(["chroot", str(root), "apt-get", "install", "--download-only", "-y", "-qq",
                    "--no-install-recommends", *cached_packages()], check=True,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def _run(*cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True,
                          timeout=timeout, **kw)


class Machine:
    """One booted node: systemd-nspawn on a throwaway overlay of the cached root file system,
    in the network namespace `netns` (made by the caller). Commands run in it through nsenter;
    Ansible reaches it the same way (`host_vars`)."""

    def __init__(self, rootfs: Path, machine: str, netns: str,
                 hostname: str = NODE_HOSTNAME, log=print):
        # `machine` must be unique per run: nspawn keeps per-machine state under
        # /run/systemd/nspawn/.
        self.rootfs, self.machine, self.netns, self.hostname = rootfs, machine, netns, hostname
        self.log = log
        self.run_dir: Path | None = None
        self.merged: Path | None = None
        self.nspawn: subprocess.Popen | None = None
        self.pid1: int | None = None
        self.console_log: Path | None = None

    def boot(self) -> "Machine":
        self.start()
        return self.wait_booted()

    def start(self) -> None:
        """Mount the overlay and start the container, without waiting for its boot (so that
        several nodes boot at once)."""
        runs = CACHE / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        reap_stale_runs(runs)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.", dir=runs))
        for d in ("upper", "work", "merged"):
            (self.run_dir / d).mkdir()
        self.merged = self.run_dir / "merged"
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.rootfs},upperdir={self.run_dir / 'upper'},"
             f"workdir={self.run_dir / 'work'}", str(self.merged))
        if self.hostname != NODE_HOSTNAME:  # the cached root file system names NODE_HOSTNAME
            (self.merged / "etc" / "hostname").write_text(self.hostname + "\n")
            (self.merged / "etc" / "hosts").write_text(
                f"127.0.0.1 localhost\n127.0.1.1 {self.hostname}\n"
                "::1 localhost ip6-localhost ip6-loopback\n")
        self.console_log = self.run_dir / "console.log"
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        with open(self.console_log, "wb") as console:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--directory", str(self.merged),
                 "--machine", self.machine, "--hostname", self.hostname,
                 "--keep-unit", "--register=no",
                 "--capability=CAP_NET_ADMIN", "--console=read-only",
                 f"--network-namespace-path=/run/netns/{self.netns}"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)

    def wait_booted(self) -> "Machine":
        self.pid1 = self._find_pid1()
        # "running" or "degraded": either way the boot is over and systemd takes commands.
        # Until systemd listens on its private socket, systemctl fails at once: retry.
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited during boot:\n{self.console()}")
            res = self.run("systemctl", "is-system-running", "--wait", check=False,
                           timeout=120)
            state = res.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.3)
        if state not in ("running", "degraded"):
            raise RuntimeError(f"{self.hostname} did not boot: {state}\n{self.console()}")
        if state == "degraded":
            self.log(f"nodelab: {self.hostname} degraded: " + self.run(
                "systemctl", "--failed", "--no-legend", check=False).stdout)
        return self

    def _find_pid1(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited early:\n{self.console()}")
            for child in _children(self.nspawn.pid):
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                    nspid = [line for line in Path(f"/proc/{child}/status").read_text()
                             .splitlines() if line.startswith("NSpid:")][0].split()[1:]
                except (OSError, IndexError):
                    continue
                if comm == "systemd" and nspid[-1] == "1":
                    return child
            time.sleep(0.1)
        raise RuntimeError(f"no systemd in the container:\n{self.console()}")

    # -- use -------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the booted node (all of its namespaces)."""
        res = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *cmd], input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"in {self.hostname}: {' '.join(cmd)} -> {res.returncode}\n"
                                 f"{res.stdout}{res.stderr}")
        return res

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-4000:]
        except (OSError, AttributeError):
            return ""

    def journal(self, unit: str = "oakestra-gw", lines: int = 80) -> str:
        return self.run("journalctl", "--no-pager", "-u", unit, "-n", str(lines),
                        check=False).stdout

    def host_vars(self) -> dict:
        """How Ansible reaches the node: through nsenter (no SSH)."""
        return {"ansible_connection": "community.docker.nsenter", "ansible_become": False,
                "ansible_nsenter_pid": self.pid1,
                "ansible_python_interpreter": "/usr/bin/python3"}

    # -- teardown --------------------------------------------------------------------------------
    def power_loss(self) -> None:
        """The node stops at once, as when its power goes: SIGKILL to its init ends every
        process in the container, with no shutdown and nothing sent on the way out."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        os.kill(self.pid1, signal.SIGKILL)
        self.nspawn.wait(30)

    def close(self) -> None:
        errors = []
        for step in (self._poweroff, self._unmount):
            try:
                step()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{step.__name__}: {exc}")
        if errors:
            raise RuntimeError(f"{self.hostname}: " + "; ".join(errors))

    def ask_poweroff(self) -> None:
        """SIGTERM to nspawn asks the container's systemd for a clean poweroff (`close` waits
        for it): several nodes shut down at once."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)

    def _poweroff(self) -> None:
        proc = self.nspawn
        if proc is None or proc.poll() is not None:
            return
        self.ask_poweroff()
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            if self.pid1:
                _kill_tree(self.pid1)
            proc.wait(15)

    def _unmount(self) -> None:
        if self.run_dir is None:
            return
        if self.merged and os.path.ismount(self.merged):
            res = _run("umount", str(self.merged), check=False)
            if res.returncode != 0:
                _run("umount", "-l", str(self.merged))
        shutil.rmtree(self.run_dir)
        self.run_dir = None


def start_worker_servers(worker: Netns) -> tuple[list[subprocess.Popen], Path]:
    """The worker's services on every address of its namespace: HTTP on HTTP_PORT serving
    hello.txt, and a TCP echo on ECHO_PORT. Returns the processes and the served directory."""
    www = Path(tempfile.mkdtemp(prefix="oakgw-www."))
    (www / "hello.txt").write_text("hello from the worker\n")
    servers = [worker.popen("python3", "-m", "http.server", str(HTTP_PORT), "--bind", "::",
                            "--directory", str(www), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)]
    echo = textwrap.dedent(f"""
        import socket, threading
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", {ECHO_PORT})); s.listen(16)
        def serve(c):
            with c:
                while data := c.recv(4096):
                    c.sendall(data)
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    """)
    servers.append(worker.popen("python3", "-c", echo, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = worker.run("ss", "-Htln").stdout
        if f":{HTTP_PORT} " in out and f":{ECHO_PORT} " in out:
            return servers, www
        time.sleep(0.1)
    stop_worker_servers(servers, www)
    raise RuntimeError("the worker's servers did not start")


def stop_worker_servers(servers: list[subprocess.Popen], www: Path | None) -> None:
    for proc in servers:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    servers.clear()
    if www is not None:
        shutil.rmtree(www, ignore_errors=True)


class NodeLab:
    """The client, node and worker namespaces, the booted node, and the worker's servers."""

    def __init__(self, rootfs: Path, log=print):
        self.rootfs = rootfs
        self.log = log
        tag = f"{os.getpid() % 100000}"
        self.ns_client, self.ns_node, self.ns_worker = (f"ogn{tag}{r}" for r in "cnw")
        self.client_ns, self.node_ns, self.worker_ns = (
            Netns(name) for name in (self.ns_client, self.ns_node, self.ns_worker))
        self.box = Machine(rootfs, f"oakgw-node-{tag}", self.ns_node, log=log)
        self.servers: list[subprocess.Popen] = []
        self.www: Path | None = None

    @property
    def pid1(self) -> int | None:
        return self.box.pid1

    # -- setup ---------------------------------------------------------------------------------
    def start(self) -> "NodeLab":
        self._netns()
        self.servers, self.www = start_worker_servers(self.worker_ns)
        self.box.boot()
        return self

    def _netns(self) -> None:
        c, n, w = (Netns.create(name=ns.name) for ns in
                   (self.client_ns, self.node_ns, self.worker_ns))
        veth(c, "eth0", n, "eth0")
        veth(n, "goProxyTun", w, "tun0", mtu=TUNNEL_MTU)
        script = {
            c: f"""
                ip addr add {CLIENT_V4}/24 dev eth0
                ip addr add {CLIENT_V6}/64 dev eth0 nodad
                ip link set eth0 up
                ip route add default via {NODE_V4}
                ip -6 route add default via {NODE_V6}
            """,
            n: f"""
                ip addr add {NODE_V4}/24 dev eth0
                ip addr add {NODE_V6}/64 dev eth0 nodad
                ip link set eth0 up
                ip addr add fe80::1/64 dev goProxyTun nodad
                ip link set goProxyTun up
                ip route add 10.30.0.0/16 dev goProxyTun
                ip -6 route add fdff::/16 via fe80::2 dev goProxyTun
            """,
            w: f"""
                ip addr add fe80::2/64 dev tun0 nodad
                ip addr add {SERVICE_V4}/32 dev tun0
                ip addr add {SERVICE_V6}/128 dev tun0 nodad
                ip link set tun0 up
                ip route add {INTERNAL_V4}/32 dev tun0
                ip -6 route add {INTERNAL_V6}/128 via fe80::1 dev tun0
            """,
        }
        for ns, text in script.items():
            ns.sh(textwrap.dedent(text))

    # -- use -------------------------------------------------------------------------------------
    def node(self, *cmd: str, check: bool = True, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the booted node (all of its namespaces)."""
        return self.box.run(*cmd, check=check, timeout=timeout, input=input)

    def client(self, *cmd: str, check: bool = True, timeout: float = 60,
               **kw) -> subprocess.CompletedProcess:
        res = self.client_ns.run(*cmd, check=False, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"in the client: {' '.join(cmd)} -> {res.returncode}\n"
                                 f"{res.stdout}{res.stderr}")
        return res

    def client_popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return self.client_ns.popen(*cmd, **kw)

    def console(self) -> str:
        return self.box.console()

    def journal(self, unit: str = "oakestra-gw", lines: int = 80) -> str:
        return self.box.journal(unit, lines)

    def inventory(self, path: Path, **hostvars: object) -> Path:
        """An Ansible inventory that reaches the node through nsenter (no SSH)."""
        host = {**self.box.host_vars(), **hostvars}
        path.write_text(yaml.safe_dump(
            {"all": {"children": {"oakestra_gateways": {"hosts": {NODE_HOSTNAME: host}}}}}))
        return path

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        errors = []
        for step in (self._stop_servers, self.box.close, self._delete_netns):
            try:
                step()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{step.__name__}: {exc}")
        if errors:
            raise RuntimeError("nodelab teardown: " + "; ".join(errors))

    def _stop_servers(self) -> None:
        stop_worker_servers(self.servers, self.www)
        self.www = None

    def _delete_netns(self) -> None:
        left = [ns.name for ns in (self.client_ns, self.node_ns, self.worker_ns)
                if not ns.delete()]
        if left:
            raise RuntimeError(f"namespaces not removed: {left}")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _kill_tree(pid: int) -> None:
    for child in _children(pid):
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reap_stale_runs(runs: Path) -> None:
    """Overlays left behind by a run that was killed: unmount and remove them."""
    for d in runs.iterdir():
        pid = d.name.split(".", 1)[0]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        merged = d / "merged"
        if os.path.ismount(merged):
            if _run("umount", str(merged), check=False).returncode != 0:
                continue  # still in use (a container is running on it): leave it
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    # `nodelab.py prepare`: build what the node tests take from the cache (needs network).
    if sys.argv[1:] != ["prepare"]:
        raise SystemExit(f"usage: {sys.argv[0]} prepare")
    t0 = time.monotonic()
    rootfs, wheels = ensure_rootfs().parent, ensure_wheels()
    foreign = ensure_foreign_wheels()
    print(f"root file system: {rootfs}\ndependency wheels: {wheels}\n"
          f"{FOREIGN_ARCH} dependency wheels: {foreign}")
    for old in [*CACHE.glob(f"{SUITE}-*"), *CACHE.glob("wheels-*"),
                *CACHE.glob(f"{FOREIGN_ARCH}-wheels-*")]:
        if old not in (rootfs, wheels, foreign):  # an older recipe or requirement set
            print(f"removing {old}")
            shutil.rmtree(old, ignore_errors=True)
    print(f"prepared in {time.monotonic() - t0:.1f}s")
