"""A real gateway node: Debian 12 booted with systemd-nspawn in a lab of network namespaces
(tests/node/nodelab.py), provisioned with the Ansible role over nsenter (no SSH), then used the
way an operator and a client would: systemctl, the API on 11022, traffic through an exposure,
reload repairing a tampered map, restart keeping an established connection, a second playbook
run that changes nothing, and decommissioning.

The tests share one node (module scope) and run in file order; each checks its own
preconditions. Run them alone with `make test-node`.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import time

import pytest

from gw.store.local import LocalStore
from tests.helpers import wait_for

from . import nodelab
from .nodelab import (ECHO_PORT, HTTP_PORT, INTERNAL_V4, INTERNAL_V6, NODE_V4,
                      NODE_V6, SERVICE_V4, SERVICE_V6)
from .playbooks import (conntrack_max, node_rootfs, offline_build_vars, recap, run_playbook,
                        snapshot_source)

pytestmark = [pytest.mark.slow, pytest.mark.kernel, pytest.mark.node]

API = f"http://{INTERNAL_V4}:11022"
# What Ansible's apt module reads as the age of the apt cache (the stamp first, if apt wrote one).
APT_CACHE_STAMPS = ("/var/lib/apt/periodic/update-success-stamp", "/var/lib/apt/lists")
APT_LISTS_AGE_DAYS = 30


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    t0 = time.monotonic()
    rootfs = node_rootfs()
    t1 = time.monotonic()
    node_lab = nodelab.NodeLab(rootfs)
    try:
        node_lab.start()
        print(f"\nnodelab: root file system {t1 - t0:.1f}s, lab and boot "
              f"{time.monotonic() - t1:.1f}s")
        # Prove the role turns forwarding on: start from a node that has it off.
        node_lab.node("sysctl", "-q", "-w", "net.ipv4.ip_forward=0",
                      "net.ipv6.conf.all.forwarding=0")
        # And from apt lists weeks old, as on a node installed long before it is provisioned:
        # with the refresh off (the default) the role must not reach for a mirror, which the
        # isolated run (like many gateway nodes) has no route to.
        node_lab.node("touch", "-c", "-d", f"{APT_LISTS_AGE_DAYS} days ago", *APT_CACHE_STAMPS)
        node_lab.tmp = tmp_path_factory.mktemp("node")
        node_lab.src = snapshot_source(node_lab.tmp / "src")
        yield node_lab
    finally:
        node_lab.close()


def playbook(lab, *args: str, **extra_vars) -> subprocess.CompletedProcess:
    hostvars = {
        "oakestra_gateway_internal_ipv4": INTERNAL_V4,
        "oakestra_gateway_internal_ipv6": INTERNAL_V6,
        "oakestra_gateway_public_interfaces": ["eth0"],
        "oakestra_gateway_conntrack_max": lab.conntrack_max,
        **offline_build_vars(lab.src),
    }
    inventory = lab.inventory(lab.tmp / "inventory.yml", **hostvars)
    return run_playbook(inventory, lab.tmp, *args, **extra_vars)


def api(lab, method: str, path: str, body: dict | None = None,
        base: str = API) -> tuple[int, dict]:
    """Call the management API from inside the node."""
    script = (
        "import json, sys, urllib.request, urllib.error\n"
        "method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "req = urllib.request.Request(url, method=method, data=body.encode() or None,\n"
        "                             headers={'Content-Type': 'application/json'})\n"
        "try:\n"
        "    r = urllib.request.urlopen(req, timeout=10); code, data = r.status, r.read()\n"
        "except urllib.error.HTTPError as e:\n"
        "    code, data = e.code, e.read()\n"
        "print(json.dumps({'status': code, 'body': data.decode()}))\n")
    res = lab.node("python3", "-c", script, method, base + path,
                   json.dumps(body) if body is not None else "", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    try:
        return out["status"], json.loads(out["body"] or "{}")
    except ValueError:
        return out["status"], {"text": out["body"]}


def http_get(lab, url: str, timeout: float = 5) -> subprocess.CompletedProcess:
    """GET from the client namespace, as a client on the Internet side would."""
    script = ("import sys, urllib.request\n"
              "print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))"
              ".read().decode(), end='')\n")
    return lab.client("python3", "-c", script, url, str(timeout), check=False,
                      timeout=timeout + 10)


def expose(lab, exposed_port: int, service_ip: str, service_port: int,
           base: str = API) -> None:
    status, body = api(lab, "POST", "/api/service/exposure/add",
                       {"exposed_port": exposed_port, "service_ip": service_ip,
                        "service_port": service_port}, base)
    assert status in (200, 201), (status, body)


@pytest.fixture(scope="module")
def provisioned(lab):
    lab.conntrack_max = conntrack_max(lab.box)
    # Check mode on the new node first: it must get through and change nothing.
    check = playbook(lab, "--check", "--diff")
    lab.fresh_check = check
    lab.fresh_check_left = lab.node(
        "sh", "-c", "ls -A /opt; ls -d /etc/oakestra-gw /etc/systemd/system/oakestra-gw.service "
                    "/etc/sysctl.d/60-oakestra-gw.conf 2>/dev/null; true").stdout
    res = playbook(lab)
    print(f"\nfirst playbook run: {res.elapsed:.1f}s: {recap(res)['line']}")
    if res.returncode != 0:
        pytest.fail("the playbook failed:\n" + res.stdout[-6000:] + res.stderr[-3000:] +
                    "\n--- journal ---\n" + lab.journal())
    return res


def test_first_run_provisions(provisioned):
    r = recap(provisioned)
    assert r["failed"] == 0 and r["unreachable"] == 0 and r["changed"] > 0, r["line"]


def test_first_run_leaves_old_apt_lists_alone(lab, provisioned):
    mtime = float(lab.node("stat", "-c", "%Y", "/var/lib/apt/lists").stdout)
    age_days = (time.time() - mtime) / 86400
    assert age_days > APT_LISTS_AGE_DAYS - 1, (
        f"the role refreshed the apt lists (now {age_days:.2f} days old) though "
        "oakestra_gateway_apt_update_cache is off")


def test_check_mode_on_a_new_node_changes_nothing(lab, provisioned):
    res = lab.fresh_check
    r = recap(res)
    print(f"\ncheck --diff on the new node: {res.elapsed:.1f}s: {r['line']}")
    assert res.returncode == 0 and r["failed"] == 0, res.stdout[-4000:]
    assert r["changed"] > 0, "check mode should report what the first run would do"
    assert "+++ after" in res.stdout, "--diff shows no differences"
    assert lab.fresh_check_left == "", f"check mode left: {lab.fresh_check_left}"


def test_service_is_active(lab, provisioned):
    state = lab.node("systemctl", "is-active", "oakestra-gw", check=False).stdout.strip()
    assert state == "active", lab.journal()
    assert lab.node("systemctl", "is-enabled", "oakestra-gw").stdout.strip() == "enabled"
    # The unit as installed, with its real ExecStart, verifies inside the node.
    res = lab.node("systemd-analyze", "verify", "/etc/systemd/system/oakestra-gw.service",
                   check=False)
    assert res.returncode == 0 and "oakestra-gw" not in res.stdout + res.stderr, \
        res.stdout + res.stderr


def test_kernel_settings(lab, provisioned):
    def get(key):
        return lab.node("sysctl", "-n", key).stdout.strip()
    assert get("net.ipv4.ip_forward") == "1"
    assert get("net.ipv6.conf.all.forwarding") == "1"
    assert get("net.ipv6.conf.eth0.accept_ra") == "2"
    conf = lab.node("cat", "/etc/sysctl.d/60-oakestra-gw.conf").stdout
    assert "net.ipv4.ip_forward=1" in conf and "net.ipv6.conf.eth0.accept_ra=2" in conf


def test_api_answers(lab, provisioned):
    assert lab.node("ss", "-Htln", "sport = :11022").stdout.strip(), "nothing listens on 11022"
    status, _ = api(lab, "GET", "/api/health")
    assert status == 200
    wait_for(lambda: api(lab, "GET", "/api/ready")[0] == 200, 30, "/api/ready to answer 200")


QUICK_START = nodelab.REPO / "docs" / "quickstart.md"
PROMPTS = {"root@gateway:~# ": "node", "user@client:~$ ": "client",
           "you@controller:~/oakestra-gw/ansible$ ": "controller"}


def quick_start_steps(text: str) -> list[tuple[str, str, list[str]]]:
    """(where, command, output lines) of every prompt line in the page's console blocks."""
    steps, block = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            block = line.strip() == "```console"
            continue
        if not block:
            continue
        prompt = next((p for p in PROMPTS if line.startswith(p)), None)
        if prompt is not None:
            steps.append((PROMPTS[prompt], line[len(prompt):], []))
        elif steps:
            steps[-1][2].append(line)
    return steps


def words(lines) -> list[str]:
    return [" ".join(line.split()) for line in lines if line.strip()]


def test_quick_start_session(lab, provisioned):
    """The operator quick start (docs/quickstart.md), replayed: the node's commands by their
    bare names in a root login shell, the client's from the Internet side; each prints what
    the page shows. The controller's steps are what this module's playbook runs do."""
    steps = quick_start_steps(QUICK_START.read_text())
    assert sum(where == "node" for where, _, _ in steps) >= 8, steps
    transcript = []
    for where, command, shown in steps:
        if where == "controller":
            continue
        if where == "node":
            res = lab.node("env", "-i", "HOME=/root", "TERM=dumb", "bash", "-lc", command,
                           check=False)
        else:
            res = lab.client("bash", "-c", command, check=False)
        prompt = next(p for p, w in PROMPTS.items() if w == where)
        transcript.append(prompt + command + "\n" + res.stdout + res.stderr)
        assert res.returncode == 0, f"{command} -> {res.returncode}\n{res.stdout}{res.stderr}"
        assert words(res.stdout.splitlines()) == words(shown), \
            f"{command} printed:\n{res.stdout}\nthe page shows:\n" + "\n".join(shown)
    print("\n--- the quick start on the node ---\n" + "".join(transcript))


def test_bare_command_and_bash_completion(lab, provisioned):
    login = ["env", "-i", "HOME=/root", "TERM=dumb", "bash", "-lc"]
    assert lab.node(*login, "command -v oakestra-gw").stdout.strip() == \
        "/usr/local/bin/oakestra-gw"
    script = ("source /usr/share/bash-completion/completions/oakestra-gw && "
              "complete -p oakestra-gw && "
              "COMP_WORDS=(oakestra-gw ex) COMP_CWORD=1 && "
              "_oakestra_gw_completion oakestra-gw && "
              "printf '%s\\n' \"${COMPREPLY[@]}\"")
    res = lab.node(*login, script, check=False)
    assert res.returncode == 0 and "expose" in res.stdout.split(), res.stdout + res.stderr


def test_exposure_carries_client_traffic(lab, provisioned):
    # Positive control first: the worker serves the page on the service address.
    expose(lab, 8080, SERVICE_V4, HTTP_PORT)
    expose(lab, 8080, SERVICE_V6, HTTP_PORT)
    res = wait_for(lambda: (r := http_get(lab, f"http://{NODE_V4}:8080/hello.txt")).returncode
                   == 0 and r, 15, "IPv4 traffic through the exposure")
    assert res.stdout == "hello from the worker\n"
    res = wait_for(lambda: (r := http_get(lab, f"http://[{NODE_V6}]:8080/hello.txt")).returncode
                   == 0 and r, 15, "IPv6 traffic through the exposure")
    assert res.stdout == "hello from the worker\n"
    # And a port that is not exposed does not reach it.
    assert http_get(lab, f"http://{NODE_V4}:8081/hello.txt", timeout=3).returncode != 0


def map_has(lab, port: int) -> bool:
    out = lab.node("nft", "list", "map", "inet", "oakestra_gw", "expose_v4").stdout
    # nft 1.0.6 lists the protocol as a number (6) in a concatenated key.
    return re.search(rf"(tcp|6) \. {port} :", out) is not None


def test_reload_repairs_a_tampered_map(lab, provisioned):
    expose(lab, 8080, SERVICE_V4, HTTP_PORT)
    assert map_has(lab, 8080)
    lab.node("nft", "delete", "element", "inet", "oakestra_gw", "expose_v4", "{ tcp . 8080 }")
    lab.node("systemctl", "reload", "oakestra-gw")
    wait_for(lambda: map_has(lab, 8080), 15, "the map element to come back")
    res = wait_for(lambda: (r := http_get(lab, f"http://{NODE_V4}:8080/hello.txt")).returncode
                   == 0 and r, 15, "traffic after the repair")
    assert res.stdout == "hello from the worker\n"
    assert lab.node("systemctl", "is-active", "oakestra-gw").stdout.strip() == "active"


class EchoClient:
    """A long-lived TCP connection from the client namespace through the gateway."""

    def __init__(self, lab, host: str, port: int):
        script = ("import socket, sys\n"
                  "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)\n"
                  "print('connected', flush=True)\n"
                  "for line in sys.stdin:\n"
                  "    s.sendall(line.encode()); data = b''\n"
                  "    while not data.endswith(b'\\n'):\n"
                  "        chunk = s.recv(4096)\n"
                  "        if not chunk: raise SystemExit('closed by peer')\n"
                  "        data += chunk\n"
                  "    print(data.decode().strip(), flush=True)\n")
        self.proc = lab.client_popen("python3", "-c", script, host, str(port),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        assert self._readline(20) == "connected", self.proc.stderr.read()

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError("no answer through the long-lived connection")
        return self.proc.stdout.readline().strip()

    def echo(self, text: str, timeout: float = 10) -> str:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._readline(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def main_pid(lab) -> int:
    return int(lab.node("systemctl", "show", "-P", "MainPID", "oakestra-gw").stdout)


def test_restart_keeps_an_established_connection(lab, provisioned):
    expose(lab, 9000, SERVICE_V4, ECHO_PORT)
    client = wait_for(lambda: _try_connect(lab, NODE_V4, 9000), 15, "the echo service")
    try:
        assert client.echo("before restart") == "before restart"
        pid = main_pid(lab)
        lab.node("systemctl", "restart", "oakestra-gw", timeout=120)
        assert lab.node("systemctl", "is-active", "oakestra-gw").stdout.strip() == "active"
        assert main_pid(lab) not in (0, pid), "the daemon did not restart"
        assert client.echo("after restart") == "after restart"
        # The table stayed while the process was gone, and it still carries new flows.
        res = http_get(lab, f"http://{NODE_V4}:8080/hello.txt")
        assert res.returncode == 0 and res.stdout == "hello from the worker\n", res.stderr
    finally:
        client.close()


def _try_connect(lab, host, port):
    try:
        return EchoClient(lab, host, port)
    except AssertionError:
        return None


def test_second_run_changes_nothing(lab, provisioned):
    res = playbook(lab)
    r = recap(res)
    print(f"\nsecond playbook run: {res.elapsed:.1f}s: {r['line']}")
    assert res.returncode == 0, res.stdout[-4000:]
    changed = re.findall(r"^changed: \[.*$|^TASK \[.*$", res.stdout, re.M)
    assert r["changed"] == 0 and r["failed"] == 0, "\n".join(changed)
    assert lab.node("systemctl", "is-active", "oakestra-gw").stdout.strip() == "active"


def test_check_diff_mode_reports_nothing_to_do(lab, provisioned):
    res = playbook(lab, "--check", "--diff")
    r = recap(res)
    print(f"\ncheck --diff run: {res.elapsed:.1f}s: {r['line']}")
    assert res.returncode == 0 and r["changed"] == 0 and r["failed"] == 0, res.stdout[-4000:]


def status(lab) -> dict:
    """`oakestra-gw status --json` on the node, by its bare name."""
    res = lab.node("env", "-i", "HOME=/root", "bash", "-lc", "oakestra-gw status --json",
                   check=False)
    assert res.returncode in (0, 1), res.stdout + res.stderr
    return json.loads(res.stdout)


def handlers_run(res) -> dict[str, str]:
    """The role's handlers that ran, and whether each changed something."""
    return dict(re.findall(r"RUNNING HANDLER \[oakestra_gateway : (.+?)\] \*+\n(\w+):",
                           res.stdout))


def test_live_config_change_reloads(lab, provisioned):
    pid = main_pid(lab)
    res = playbook(lab, oakestra_gateway_reserved_ports=["22/tcp", "50103/udp", "9999/tcp"])
    r = recap(res)
    assert res.returncode == 0 and r["changed"] >= 1, res.stdout[-4000:]
    assert handlers_run(res) == {"Reload oakestra-gw": "changed"}, res.stdout[-4000:]
    assert main_pid(lab) == pid, "a change a reload applies must reload, not restart"
    # The running daemon took it: 9999/tcp is reserved now.
    wait_for(lambda: api(lab, "POST", "/api/service/exposure/add",
                         {"exposed_port": 9999, "service_ip": SERVICE_V4,
                          "service_port": 80})[0] == 400, 15, "9999/tcp to be reserved")
    assert status(lab)["restart_needed"] == []
    # A config the daemon rejects never replaces the working one.
    res = playbook(lab, oakestra_gateway_tunnel_interface="oakgw0")
    assert res.returncode != 0 and "failed to validate" in res.stdout, res.stdout[-3000:]
    assert '"9999/tcp"' in lab.node("cat", "/etc/oakestra-gw/gateway.toml").stdout
    assert lab.node("systemctl", "is-active", "oakestra-gw").stdout.strip() == "active"


def test_restart_needing_change_restarts_and_is_live(lab, provisioned):
    pid = main_pid(lab)
    assert "oakestra_gw_exposure_new_connections" not in api(lab, "GET", "/metrics")[1]["text"]
    res = playbook(lab, oakestra_gateway_reserved_ports=["22/tcp", "50103/udp", "9999/tcp"],
                   oakestra_gateway_api_per_exposure_metrics=True)
    assert res.returncode == 0, res.stdout[-4000:]
    # Restarted, and not reloaded on top.
    ran = handlers_run(res)
    assert ran.get("Restart oakestra-gw") == "changed", res.stdout[-4000:]
    assert ran.get("Reload oakestra-gw") in (None, "skipping"), res.stdout[-4000:]
    assert main_pid(lab) not in (0, pid), "api.per_exposure_metrics needs a restart"
    wait_for(lambda: api(lab, "GET", "/api/ready")[0] == 200, 30, "ready after the restart")
    # The running daemon has the new value: per-exposure series are on /metrics.
    assert "oakestra_gw_exposure_new_connections" in api(lab, "GET", "/metrics")[1]["text"]
    assert status(lab)["restart_needed"] == []
    again = playbook(lab, oakestra_gateway_reserved_ports=["22/tcp", "50103/udp", "9999/tcp"],
                     oakestra_gateway_api_per_exposure_metrics=True)
    assert again.returncode == 0 and recap(again)["changed"] == 0, again.stdout[-4000:]


def test_new_code_restarts_and_keeps_the_exposures(lab, provisioned):
    expose(lab, 8080, SERVICE_V4, HTTP_PORT)
    pid = main_pid(lab)
    with open(lab.src / "gw" / "__init__.py", "a") as f:  # a new build of the gateway
        f.write("\n# rebuilt by the node test\n")
    res = playbook(lab)
    assert res.returncode == 0, res.stdout[-4000:]
    assert re.search(r"RUNNING HANDLER \[oakestra_gateway : Restart oakestra-gw\] \*+\n"
                     r"changed:", res.stdout), res.stdout[-4000:]
    assert main_pid(lab) not in (0, pid), "new code must restart the daemon"
    assert "rebuilt by the node test" in lab.node(
        "sh", "-c", "cat /opt/oakestra-gw/lib/python3*/site-packages/gw/__init__.py").stdout
    # One wheelhouse on the node: the old one is gone.
    assert len(lab.node("ls", "/var/cache/oakestra-gw/wheelhouse").stdout.split()) == 1
    # The exposures came back from the store.
    res = wait_for(lambda: (r := http_get(lab, f"http://{NODE_V4}:8080/hello.txt")).returncode
                   == 0 and r, 15, "traffic after the upgrade")
    assert res.stdout == "hello from the worker\n"


def test_decommission(lab, provisioned):
    expose(lab, 8080, SERVICE_V4, HTTP_PORT)
    res = playbook(lab, oakestra_gateway_state="absent")
    assert res.returncode == 0, res.stdout[-4000:]
    assert lab.node("systemctl", "is-active", "oakestra-gw", check=False).stdout.strip() \
        in ("inactive", "unknown")
    assert lab.node("test", "-e", "/etc/systemd/system/oakestra-gw.service",
                    check=False).returncode == 1
    assert lab.node("nft", "list", "table", "inet", "oakestra_gw", check=False).returncode != 0
    assert http_get(lab, f"http://{NODE_V4}:8080/hello.txt", timeout=3).returncode != 0
    # The store stays unless purged: the exposures are still on disk (read with the gateway's
    # own store code, from the host). A node like this that joins a pair keeps them:
    # test_pair_nodes.py starts a pair's gateway on such a table and finds it imported.
    store = lab.box.merged / "var" / "lib" / "oakestra-gw" / "exposures.json"
    with LocalStore(store, shared=True) as table:
        assert table.get(("ipv4", "tcp", 8080)) is not None, table.exposures()
    again = playbook(lab, oakestra_gateway_state="absent")
    assert again.returncode == 0 and recap(again)["changed"] == 0, again.stdout[-3000:]
