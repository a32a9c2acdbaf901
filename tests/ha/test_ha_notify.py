"""`oakestra-gw ha notify` with a real daemon: the role keepalived hands over reaches /api/ready,
/api/status, `oakestra-gw status` and /metrics, survives restarts of the daemon and of the
notify, and conntrackd's steps run in their order around it. First with a real FIFO written
by the test and a conntrackd recorder in PATH; then with real keepalived and conntrackd in two
gateway namespaces on shared segments: the higher priority is master, the other backup, and
cutting the master's link moves the role (and back when it returns). The pair is in Oakestra
mode, one gateway to the stand-in orchestrator on the internal segment: each new master, and
only a master, announces the pair."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gw.core import ha
from gw.core.ha_hold import HOLD_TABLE
from gw.core.config import load_config
from gw.lab.daemon import gateway_command
from gw.lab.netns import Netns, stop_process
from tests.api.harness import INTERNAL_V4, PUBLIC_V4, GatewayTestbed, require_root
from tests.helpers import wait_for
from tests.oakestra.orchestrator import Orchestrator

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def ha_table(state: Path, **changes) -> dict:
    return {"enabled": True, "public_interface": "vpub0",
            "public_addresses": ["198.18.50.10/24", "2001:db8:50::10/64"],
            "internal_interface": "int0", "sync_interface": "sync0",
            "sync_address": "192.168.100.1", "sync_peer": "192.168.100.2",
            "advert_interval": 0.1, "preempt_delay": 0, "state_dir": str(state), **changes}


def role(gw: GatewayTestbed, token: bool = True) -> str:
    status, body = gw.request("GET", "/api/ready", token="" if token else None)
    assert status == 200, body  # a backup is ready too
    return body["ha"]["role"]


def notify_argv(config: Path, *extra: str) -> list[str]:
    return [*gateway_command(), "ha", "notify", "--config", str(config), *extra]


# -- a real FIFO, a real daemon, conntrackd recorded -------------------------------------------

RECORDER = """\
#!/bin/sh
# conntrackd's client as `ha notify` runs it: record the command and the role the daemon
# would read at that moment. A commit (-c) waits while the file {gate} exists.
echo "$3 $(sed -n 's/.*"role": "\\([a-z]*\\)".*/\\1/p' {role} 2>/dev/null)" >> {calls}
if [ "$3" = "-c" ]; then
    i=0
    while [ -e {gate} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
fi
"""


@pytest.fixture
def single(tmp_path):
    require_root()
    state = tmp_path / "ha"
    gw = GatewayTestbed(tmp_path, config={"ha": ha_table(state, conntrack_external_cache=True)})
    try:
        gw.start()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        recorder = bin_dir / "conntrackd"
        recorder.write_text(RECORDER.format(role=state / "role", calls=tmp_path / "calls",
                                            gate=tmp_path / "commit-waits"))
        recorder.chmod(0o755)
        yield gw, state, tmp_path
    finally:
        gw.close()


def start_notify(gw, tmp_path, fifo: Path) -> subprocess.Popen:
    """In the gateway's namespace, as keepalived would run it there (the hold is nft's)."""
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    return gw.ns.popen(*notify_argv(gw.config_path, "--log-file", str(tmp_path / "notify.log"),
                                    str(fifo)), env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def dropped(gw) -> int:
    """Packets the hold's IPv4 rule dropped so far."""
    out = gw.nft("list", "table", "inet", HOLD_TABLE).stdout
    return int(re.search(r"@held_v4 counter packets (\d+)", out)[1])


def held(gw) -> bool:
    """The promotion hold's table is in the gateway's kernel."""
    return gw.nft("list", "table", "inet", HOLD_TABLE, check=False).returncode == 0


def calls(tmp_path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_notify_tells_a_real_daemon_in_order(single):
    gw, state, tmp_path = single
    fifo = state / "keepalived.fifo"
    state.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    assert role(gw) == "unknown"  # nothing said yet
    notify = start_notify(gw, tmp_path, fifo)
    try:
        with open(fifo, "w") as keepalived:  # returns once the notify holds the fifo open
            for line in ('INSTANCE "public_v4" BACKUP 150', 'GROUP "oakestra_gw" BACKUP 0'):
                print(line, file=keepalived, flush=True)
            wait_for(lambda: role(gw) == "backup", timeout=30, what="role backup")
            wait_for(lambda: calls(tmp_path) == ["-t backup", "-n backup"], timeout=30,
                     what="conntrackd's backup steps after the role")
            assert held(gw)  # with the external cache a backup holds the floating addresses
            print("garbage that is no event", file=keepalived, flush=True)
            print('GROUP "oakestra_gw" MASTER 0', file=keepalived, flush=True)
            wait_for(lambda: role(gw) == "master", timeout=30, what="role master")
        # The commit and the rest ran while the daemon read "promoting", before "master".
        assert calls(tmp_path)[2:] == ["-c promoting", "-f promoting", "-R promoting",
                                       "-B promoting"]
        assert not held(gw)
        assert role(gw, token=False) == "master"
        status, body = gw.request("GET", "/api/status")
        assert status == 200 and body["ha"]["role"] == "master" and "failed" not in body["ha"]
        _, metrics = gw.request("GET", "/metrics")
        assert 'oakestra_gw_ha_role{role="master"} 1.0' in metrics
        assert 'oakestra_gw_ha_role{role="backup"} 0.0' in metrics
        cli = gw.ns.run(*gateway_command(), "status", "--config", str(gw.config_path),
                        "--api", f"http://127.0.0.1:{gw.api_port}", check=False)
        assert "ha:        master since " in cli.stdout, cli.stdout + cli.stderr

        # The daemon restarts: keepalived says nothing again, the daemon still knows.
        gw.stop()
        gw.start()
        assert role(gw) == "master"
        # The notify survived keepalived closing the fifo and the garbage line, and reads on.
        assert notify.poll() is None
        with open(fifo, "w") as keepalived:
            print('GROUP "oakestra_gw" FAULT 0', file=keepalived, flush=True)
            wait_for(lambda: role(gw) == "fault", timeout=30, what="role fault")
            # keepalived stops: SIGTERM first, then its STOP lines, then it closes the fifo.
            notify.send_signal(signal.SIGTERM)
            print('GROUP "oakestra_gw" STOP 0', file=keepalived, flush=True)
            wait_for(lambda: role(gw) == "stopped", timeout=30, what="role stopped")
        assert notify.wait(timeout=30) == 0, notify.stderr.read()
    finally:
        stop_process(notify)
    log = (tmp_path / "notify.log").read_text()
    assert "ignored: not a VRRP notify line: 'garbage that is no event'" in log
    # A notify started again (keepalived restarted) leaves the role as it was.
    notify = start_notify(gw, tmp_path, fifo)
    try:
        wait_for(lambda: "reading keepalived's notify fifo" in
                 (tmp_path / "notify.log").read_text().split("notify fifo closed")[-1],
                 timeout=30, what="the second notify reading")
        assert role(gw) == "stopped"
    finally:
        stop_process(notify)


def test_a_missing_conntrackd_is_a_logged_error_and_the_role_changes(single):
    gw, state, tmp_path = single
    (tmp_path / "bin" / "conntrackd").unlink()
    fifo = state / "keepalived.fifo"
    state.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    env = {**os.environ, "PATH": str(tmp_path / "bin")}  # no conntrackd anywhere
    notify = subprocess.Popen([sys.executable, "-m", "gw.cli", "ha", "notify", "--config",
                               str(gw.config_path), "--log-file", str(tmp_path / "notify.log"),
                               str(fifo)], env=env, cwd=ROOT, stderr=subprocess.PIPE)
    try:
        with open(fifo, "w") as keepalived:
            print('GROUP "oakestra_gw" MASTER 0', file=keepalived, flush=True)
            wait_for(lambda: role(gw) == "master", timeout=30, what="role master")
        _, body = gw.request("GET", "/api/status")
        assert "conntrackd is not installed" in body["ha"]["failed"]
        assert notify.poll() is None
    finally:
        stop_process(notify)
    log = (tmp_path / "notify.log").read_text()
    assert log.count("conntrackd is not installed") == 1, log


def test_with_the_external_cache_traffic_waits_for_the_commit(tmp_path):
    """The promotion race (keepalived raises the addresses before the notify hears of it):
    with conntrackd's external cache, the synced flows reach the kernel only with the commit,
    so traffic to the floating addresses is dropped (not answered with a reset) on a backup
    and during the promotion, and flows the moment the commit is done. Real packets from a
    client to an exposure of the gateway's address, which stands for a floating one here."""
    require_root()
    state = tmp_path / "ha"
    gw = GatewayTestbed(tmp_path, config={"ha": ha_table(
        state, public_interface="pub0", public_addresses=[f"{PUBLIC_V4}/24"],
        conntrack_external_cache=True)})
    notify = None
    try:
        gw.start()
        # With ha the internal (SNAT) address is keepalived's, which runs on no node here:
        # it is put where keepalived puts it on a master, so replies find the gateway.
        gw.ns.run("ip", "addr", "add", f"{INTERNAL_V4}/32", "dev", "oakgw0")
        gw.open_path()
        status, body = gw.request("POST", "/api/service/exposure/add",
                                  {"exposed_port": 8080, "service_ip": "10.30.0.1",
                                   "service_port": 80})
        assert status == 201, body
        assert gw.exchange(8080) == "ping"  # no hold before keepalived said anything
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "conntrackd").write_text(RECORDER.format(
            role=state / "role", calls=tmp_path / "calls", gate=tmp_path / "commit-waits"))
        (bin_dir / "conntrackd").chmod(0o755)
        fifo = state / "keepalived.fifo"
        state.mkdir(exist_ok=True)
        os.mkfifo(fifo)
        notify = start_notify(gw, tmp_path, fifo)
        with open(fifo, "w") as keepalived:
            print('GROUP "oakestra_gw" BACKUP 0', file=keepalived, flush=True)
            wait_for(lambda: role(gw) == "backup", timeout=30, what="role backup")
            assert held(gw)
            assert gw.exchange(8080) == ""
            assert dropped(gw) > 0  # dropped, not refused: the client just waits
            (tmp_path / "commit-waits").touch()  # the commit takes its time
            print('GROUP "oakestra_gw" MASTER 0', file=keepalived, flush=True)
            wait_for(lambda: "-c promoting" in calls(tmp_path), timeout=30,
                     what="the commit started")
            assert role(gw) == "promoting" and held(gw)
            before = dropped(gw)
            assert gw.exchange(8080) == ""
            assert dropped(gw) > before
            (tmp_path / "commit-waits").unlink()  # the commit is done
            wait_for(lambda: role(gw) == "master", timeout=30, what="role master")
        assert not held(gw)
        assert gw.exchange(8080) == "ping"
        # The hold's table is not the daemon's: its drift watcher saw nothing to repair.
        assert "changed our table" not in gw.log()
        with open(fifo, "w") as keepalived:
            print('GROUP "oakestra_gw" FAULT 0', file=keepalived, flush=True)
            wait_for(lambda: role(gw) == "fault", timeout=30, what="role fault")
        assert held(gw)
        # Decommissioned: teardown removes the hold too.
        stop_process(notify)
        gw.stop()
        out = gw.ns.run(*gateway_command(), "teardown", "--config", str(gw.config_path),
                        "--json", cwd=ROOT)
        assert json.loads(out.stdout)["ha_hold_removed"] is True
        assert not held(gw)
    finally:
        if notify is not None:
            stop_process(notify)
        gw.close()


def test_without_ha_nothing_is_said_about_a_role(tmp_path):
    require_root()
    gw = GatewayTestbed(tmp_path)
    try:
        gw.start()
        for path in ("/api/ready", "/api/status"):
            status, body = gw.request("GET", path)
            assert status == 200 and "ha" not in body, body
        _, metrics = gw.request("GET", "/metrics")
        assert "oakestra_gw_ha_role" not in metrics
        cli = gw.ns.run(*gateway_command(), "status", "--config", str(gw.config_path),
                        "--api", f"http://127.0.0.1:{gw.api_port}")
        assert "ha:" not in cli.stdout and "exposures:" in cli.stdout
    finally:
        gw.close()


# -- real keepalived and conntrackd in two gateways --------------------------------------------

def pair_links(a: Netns, b: Netns, hub: Netns) -> None:
    """vpub0 and int0 of each gateway on a bridge of the hub (cut by setting the hub's port
    down, which the gateway sees as lost carrier); sync0 a veth between the two."""
    for ns in (a, b):
        ns.sysctl("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
    hub.ip("link add brpub type bridge", "link set brpub up",
           "link add brint type bridge", "link set brint up")
    for i, ns in enumerate((a, b), 1):
        for ifname, bridge in (("vpub0", "brpub"), ("int0", "brint")):
            port = f"{ifname[:3]}{i}"
            subprocess.run(["ip", "link", "add", ifname, "netns", ns.name, "type", "veth",
                            "peer", "name", port, "netns", hub.name], check=True)
            hub.ip(f"link set {port} master {bridge}", f"link set {port} up")
        ns.ip(f"addr add 198.18.50.{i}/24 dev vpub0", "link set vpub0 up",
              f"addr add 10.31.0.{i}/24 dev int0", "link set int0 up")
    subprocess.run(["ip", "link", "add", "sync0", "netns", a.name, "type", "veth", "peer",
                    "name", "sync0", "netns", b.name], check=True)
    for i, ns in enumerate((a, b), 1):
        ns.ip(f"addr add 192.168.100.{i}/24 dev sync0", "link set sync0 up")
    for ns in (a, b):
        ns.wait_links_up(["vpub0", "int0", "sync0"])


class Node:
    """One gateway of the pair: its daemon, and keepalived and conntrackd in its namespace."""

    def __init__(self, gw: GatewayTestbed, state: Path):
        self.gw, self.state = gw, state
        self.settings = load_config(gw.config_path).ha
        self.procs: list[subprocess.Popen] = []

    def start_conntrackd(self) -> None:
        Path(self.settings.conntrackd_conf).write_text(ha.render_conntrackd(self.settings))
        self.procs.append(self.gw.ns.popen(*ha.conntrackd_command(self.settings),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: self.gw.ns.run(*ha.conntrackd_command(self.settings, "-s"),
                                        check=False).returncode == 0,
                 timeout=30, what="conntrackd answers")

    def start_keepalived(self) -> None:
        command = " ".join(notify_argv(self.gw.config_path, "--log-file",
                                       str(self.state / "notify.log")))
        Path(self.settings.keepalived_conf).write_text(
            ha.render_keepalived(self.settings, command))
        check = self.gw.ns.run("keepalived", "--config-test", "-f",
                               self.settings.keepalived_conf, check=False)
        assert check.returncode == 0, check.stderr
        self.keepalived = self.gw.ns.popen(
            *ha.keepalived_command(self.settings), cwd=ROOT,
            stdout=open(self.state / "keepalived.log", "ab"), stderr=subprocess.STDOUT)
        self.procs.append(self.keepalived)

    def holds_public_address(self) -> bool:
        return "198.18.50.10/24" in self.gw.ns.run("ip", "-o", "addr", "show", "vpub0").stdout

    def notify_runs(self) -> list[str]:
        """The notify's log, one piece per notify started (keepalived starts one per reload)."""
        text = (self.state / "notify.log").read_text()
        return ["reading" + part for part in text.split("reading keepalived's")[1:]]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n" + (self.state / name).read_text()[-3000:]
                         for name in ("keepalived.log", "notify.log")
                         if (self.state / name).exists())

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, timeout=10)


# The stand-in orchestrator, on the hub's side of the internal segment (int0 is 10.31.0.1, .2).
CLUSTER_IP, CLUSTER_PORT = "10.31.0.254", 18081
NODE_IPS = {"a": "10.31.0.1", "b": "10.31.0.2"}


@pytest.fixture
def pair(tmp_path):
    require_root()
    gws, nodes, hub, cluster = [], [], None, None
    oakestra = {"cluster_url": f"http://{CLUSTER_IP}:{CLUSTER_PORT}", "gateway_id": "pair-1",
                "backoff_max": 0.5}
    try:
        for name, priority, address, peer in (("a", 150, "192.168.100.1", "192.168.100.2"),
                                              ("b", 100, "192.168.100.2", "192.168.100.1")):
            state = tmp_path / name / "ha"
            state.mkdir(parents=True)
            gws.append(GatewayTestbed(tmp_path / name, config={"ha": ha_table(
                state, priority=priority, router_id=f"gw-{name}", sync_address=address,
                sync_peer=peer), "oakestra": oakestra, "egress": {"enabled": False}}))
            nodes.append(Node(gws[-1], state))
        hub = Netns.create("oakhub")
        pair_links(gws[0].ns, gws[1].ns, hub)
        hub.ip(f"addr add {CLUSTER_IP}/24 dev brint")
        cluster = Orchestrator(host=CLUSTER_IP, port=CLUSTER_PORT, enter=hub.inside).start()
        for node in nodes:
            node.gw.start()
            node.start_conntrackd()
        yield nodes, hub, cluster.state
    finally:
        for node in nodes:
            node.stop()
        if cluster is not None:
            cluster.stop()
        for gw in gws:
            gw.close()
        if hub is not None:
            hub.delete()


def synced(node) -> bool:
    """The test's flow through A's exposure is in `node`'s kernel, with its NAT binding."""
    out = node.gw.ns.run("conntrack", "-L", "-p", "tcp", "--dport", "8080", check=False).stdout
    return "dport=8080 src=10.30.0.1 dst=10.30.255.1 sport=80" in out


def roles(nodes) -> tuple[str, str]:
    return tuple(role(n.gw) for n in nodes)


def announced(cluster, *nodes: str) -> bool:
    """The pair's announcements so far (ready calls) came from these nodes, in this order."""
    readies = [ip for step, ip in cluster.callers if step.endswith("/ready")]
    return readies == [NODE_IPS[n] for n in nodes]


def test_real_keepalived_pair_roles_follow_the_links(pair):
    (a, b), hub, cluster = pair
    logs = lambda: a.logs() + "\n" + b.logs()  # noqa: E731
    assert roles((a, b)) == ("unknown", "unknown")
    assert cluster.callers == []  # neither knows it is master: neither speaks
    # B first, alone: it takes the addresses; then A, of higher priority, takes them over.
    b.start_keepalived()
    wait_for(lambda: role(b.gw) == "master", timeout=60, what="B alone master", log=logs)
    wait_for(lambda: announced(cluster, "b"), what="B announced the pair", log=logs)
    a.start_keepalived()
    wait_for(lambda: roles((a, b)) == ("master", "backup"), timeout=60,
             what="A (priority 150) master, B (100) backup", log=logs)
    assert a.holds_public_address() and not b.holds_public_address()  # no split brain
    # Each new master registered once under the pair's id, then reported ready.
    wait_for(lambda: announced(cluster, "b", "a"), what="A announced the pair", log=logs)
    assert cluster.callers == [("POST /api/gateway/register", NODE_IPS["b"]),
                               ("POST /api/gateway/pair-1/ready", NODE_IPS["b"]),
                               ("POST /api/gateway/register", NODE_IPS["a"]),
                               ("POST /api/gateway/pair-1/ready", NODE_IPS["a"])]
    # Real conntrackd answered every step: the role files note no failure.
    for node in (a, b):
        _, body = node.gw.request("GET", "/api/status")
        assert "conntrackd" not in body["ha"], body["ha"]

    # keepalived raises the addresses before any notify runs (keepalived issue #2254): the
    # new master's kernel must hold the flows before its promotion. Without the external
    # cache conntrackd writes what the master syncs straight into the backup's kernel. A real
    # flow through A's exposure (DNAT to the service, SNAT to the shared internal address):
    # B's kernel holds it, NAT binding included, while B is still the backup.
    a.gw.open_path()
    status, body = a.gw.request("POST", "/api/service/exposure/add",
                                {"exposed_port": 8080, "service_ip": "10.30.0.1",
                                 "service_port": 80})
    assert status == 201, body
    assert a.gw.exchange(8080) == "ping"
    wait_for(lambda: synced(b), timeout=30, what="A's flow in B's kernel", log=logs)
    assert role(b.gw) == "backup"

    # keepalived reloads (SIGHUP): its notify ends, a new one starts and is told the states
    # again (fifo_write_vrrp_states_on_reload); the role and the address stay on A.
    a.keepalived.send_signal(signal.SIGHUP)
    wait_for(lambda: len(a.notify_runs()) == 2 and
             'GROUP "oakestra_gw" MASTER: this gateway becomes master' in a.notify_runs()[-1]
             and "role master written" in a.notify_runs()[-1],
             timeout=60, what="A's second notify told master again", log=logs)
    first = int(re.search(r"\(pid (\d+)\)", a.notify_runs()[0])[1])
    wait_for(lambda: not Path(f"/proc/{first}").exists(), timeout=30,
             what="the first notify ended", log=logs)
    assert roles((a, b)) == ("master", "backup") and a.holds_public_address()
    # Told master again, A announces again (harmless: the same node).
    wait_for(lambda: announced(cluster, "b", "a", "a"), what="A announced again", log=logs)

    # A's public link is cut (its segment port goes down): A faults, B takes over.
    hub.ip("link set vpu1 down")
    wait_for(lambda: roles((a, b)) == ("fault", "master"), timeout=60,
             what="A fault, B master", log=logs)
    assert b.holds_public_address() and not a.holds_public_address()
    assert synced(b)  # the promotion's resync kept it
    _, metrics = b.gw.request("GET", "/metrics")
    assert 'oakestra_gw_ha_role{role="master"} 1.0' in metrics
    # The new master announces the pair (ready again, no second registration).
    wait_for(lambda: announced(cluster, "b", "a", "a", "b"), what="B announced the pair",
             log=logs)

    # The link returns: A, the higher priority, takes the addresses back.
    hub.ip("link set vpu1 up")
    wait_for(lambda: roles((a, b)) == ("master", "backup"), timeout=60,
             what="A master again, B backup", log=logs)
    assert a.holds_public_address() and not b.holds_public_address()
    wait_for(lambda: announced(cluster, "b", "a", "a", "b", "a"), what="A announced again",
             log=logs)

    # keepalived stops: its STOP reaches the daemon, and the notify ends with it.
    for node in (b, a):
        node.keepalived.send_signal(signal.SIGTERM)
        assert node.keepalived.wait(timeout=30) == 0
    wait_for(lambda: roles((a, b)) == ("stopped", "stopped"), timeout=30, what="both stopped",
             log=logs)
    # Two registrations and five announcements in all, each from the master of the moment.
    assert [step for step, _ in cluster.callers].count("POST /api/gateway/register") == 2
    assert announced(cluster, "b", "a", "a", "b", "a")
    # No -t ran (it would flush the synced flows from a backup's kernel 15 s later).
    for node in (a, b):
        assert "flushing conntrack table" not in (node.state / "conntrackd.log").read_text()
    for node in (a, b):
        pid = int(re.search(r"\(pid (\d+)\)", (node.state / "notify.log").read_text())[1])
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=30,
                 what="the notify ended with keepalived", log=logs)
