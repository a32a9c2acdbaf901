"""A gateway pair as the Ansible role makes it from one inventory: two booted Debian 12 gateway
nodes and an etcd witness (tests/node/pairnodelab.py), provisioned by one run of site.yml over
nsenter, then used as the cluster and a client would use them, through a power loss of the
master.

The inventory has the pair's group (both gateways, each with its priority, sync addresses and
etcd certificate) under oakestra_gateways, and the witness in oakestra_etcd_witnesses; etcd
speaks TLS with a throw-away CA made here. Before the run, gwa's store holds a table a single
gateway left there (written by the gateway's own store code): the pair's first start imports it.
The tests share the lab (module scope) and run in file order; the failover comes last.
"""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import pytest

from gw.core.exposure import Exposure
from gw.lab.certs import LabCA
from gw.lab.http import NetnsHttp, in_netns
from gw.store import etcd_client as ec
from gw.store.local import LocalStore
from tests.ha.lab import kernel_v4
from tests.helpers import wait_for

from . import nodelab
from .nodelab import HTTP_PORT, INTERNAL_V4, INTERNAL_V6, SERVICE_V4
from .pairnodelab import (GATEWAYS, PUBLIC_V4, PUBLIC_V6, WITNESS, PairNodeLab, etcd_address,
                          sync_address)
from .playbooks import (assert_changed_nothing, conntrack_max, node_rootfs, offline_build_vars,
                        recaps, run_playbook, snapshot_source)

pytestmark = [pytest.mark.slow, pytest.mark.kernel, pytest.mark.node,
              # Three nodes booted and provisioned in the first test's setup on a shared
              # 2-core machine: the default (300 s) is only a hang catch, and this one too.
              pytest.mark.timeout(900)]

PREFIX = "/oakgw-pair-nodes"
PRIORITY = {"gwa": 150, "gwb": 100}
MEMBERS = [{"name": name, "address": etcd_address(i)}
           for i, name in enumerate((*GATEWAYS, WITNESS), 1)]
# A single gateway's table on gwa before it joins the pair.
LEFT_BY_SINGLE = 8080
# etcd's copies of the TLS files on every member, and the daemon's on a gateway.
MEMBER_TLS_DIR = "/etc/etcd/oakestra-gw"
STORE_TLS = {"cafile": "/etc/oakestra-gw/etcd-ca.pem", "certfile": "/etc/oakestra-gw/etcd.pem",
             "keyfile": "/etc/oakestra-gw/etcd.key"}
UNITS = ["etcd", "oakestra-gw", "conntrackd", "keepalived"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    rootfs = node_rootfs()
    t0 = time.monotonic()
    pair = PairNodeLab(rootfs)
    try:
        pair.start()
        pair.timings = {"boot": time.monotonic() - t0}
        print(f"\npair lab: three nodes booted in {pair.timings['boot']:.1f}s")
        pair.tmp = tmp_path_factory.mktemp("pair")
        pair.src = snapshot_source(pair.tmp / "src")
        pair.ca = LabCA.create(pair.tmp / "etcd-tls")
        yield pair
    finally:
        pair.close()


def inventory(lab) -> Path:
    """One inventory for the whole pair, as an operator would write it."""
    def member(name: str, address: str) -> dict:
        tls = lab.ca.issue(name, ip=address, more_ips=("127.0.0.1",),
                           usages=("serverAuth", "clientAuth"))
        return {**lab.nodes[name].host_vars(),
                "oakestra_gateway_etcd_cert_file": str(tls.cert),
                "oakestra_gateway_etcd_key_file": str(tls.key)}

    etcd = {"oakestra_gateway_etcd_members": MEMBERS,
            "oakestra_gateway_etcd_ca_file": str(lab.ca.cert)}
    gateways = {}
    for i, name in enumerate(GATEWAYS, 1):
        gateways[name] = {**member(name, etcd_address(i)),
                          "oakestra_gateway_ha_priority": PRIORITY[name],
                          "oakestra_gateway_ha_sync_address": sync_address(i),
                          "oakestra_gateway_ha_sync_peer": sync_address(3 - i)}
    pair_vars = {
        **etcd, **offline_build_vars(lab.src),
        "oakestra_gateway_ha": True,
        "oakestra_gateway_internal_ipv4": INTERNAL_V4,
        "oakestra_gateway_internal_ipv6": INTERNAL_V6,
        "oakestra_gateway_public_interfaces": ["eth0"],
        "oakestra_gateway_ha_public_addresses": [f"{PUBLIC_V4}/24", f"{PUBLIC_V6}/64"],
        # The lab's internal segment stands in for the Oakestra network: the SNAT addresses
        # float there, where the worker finds them by ARP / NDP.
        "oakestra_gateway_ha_internal_interface": "goProxyTun",
        "oakestra_gateway_ha_sync_interface": "sync0",
        "oakestra_gateway_ha_preempt_delay": 1,
        "oakestra_gateway_store_prefix": PREFIX,
        "oakestra_gateway_conntrack_max": conntrack_max(lab.nodes["gwa"]),
    }
    text = {"all": {"children": {
        "oakestra_gateways": {"children": {"pair1": {"hosts": gateways, "vars": pair_vars}}},
        "oakestra_etcd_witnesses": {"hosts": {WITNESS: member(WITNESS, etcd_address(3))},
                                    "vars": etcd},
    }}}
    path = lab.tmp / "inventory.yml"
    path.write_text(json.dumps(text, indent=1))  # JSON is YAML
    return path


def leave_a_single_gateways_table(node: nodelab.Machine) -> None:
    """gwa's store as a single gateway leaves it (decommissioned without purge: test_node.py's
    test_decommission shows the store stays): one exposure, written by the gateway's own store."""
    path = node.merged / "var" / "lib" / "oakestra-gw" / "exposures.json"
    path.parent.mkdir(mode=0o700, parents=True)
    with LocalStore(path) as store:
        store.commit(put=[Exposure(LEFT_BY_SINGLE, "tcp", ipaddress.ip_address(SERVICE_V4),
                                   HTTP_PORT)])


@pytest.fixture(scope="module")
def provisioned(lab):
    leave_a_single_gateways_table(lab.nodes["gwa"])
    lab.inventory = inventory(lab)
    res = run_playbook(lab.inventory, lab.tmp)
    lab.timings["provisioning"] = res.elapsed
    print(f"\npair: one playbook run for the three nodes: {res.elapsed:.1f}s\n" +
          "\n".join(r["line"] for r in recaps(res).values()))
    if res.returncode != 0:
        pytest.fail("the pair's playbook failed:\n" + res.stdout[-8000:] + res.stderr[-3000:] +
                    "".join(f"\n--- {name} ---\n" + node.journal("etcd") + node.journal()
                            for name, node in lab.nodes.items()))
    return res


# -- the pair as provisioned ---------------------------------------------------------------------

def test_one_run_provisions_the_three_nodes(lab, provisioned):
    rows = recaps(provisioned)
    assert sorted(rows) == sorted([*GATEWAYS, WITNESS]), rows
    for row in rows.values():
        assert row["failed"] == 0 and row["unreachable"] == 0 and row["changed"] > 0, row["line"]


def etcd(lab, name: str = WITNESS) -> tuple[ec.EtcdClient, str]:
    """A TLS client of member `name` (with the witness's certificate) and its namespace."""
    index = [*GATEWAYS, WITNESS].index(name) + 1
    tls = lab.ca.directory
    client = ec.EtcdClient([f"https://{etcd_address(index)}:2379"], timeout=5,
                           ca_file=str(lab.ca.cert), cert_file=str(tls / f"{WITNESS}.pem"),
                           key_file=str(tls / f"{WITNESS}.key"))
    return client, lab.nodes[name].netns


def etcd_call(lab, name: str, path: str, body: dict | None = None) -> dict:
    client, ns = etcd(lab, name)
    return in_netns(ns, client.call, path, body or {})


def leaders(lab, names) -> dict[str, str]:
    """Each member's view of the leader (its member ID; "0" or absent: none)."""
    return {n: str(etcd_call(lab, n, "maintenance/status").get("leader", "0")) for n in names}


def test_etcd_has_three_started_members_and_a_leader(lab, provisioned):
    members = etcd_call(lab, WITNESS, "cluster/member/list")["members"]
    # A member that never started has no name and no client URLs in the list.
    started = {m.get("name"): m.get("clientURLs") for m in members}
    assert started == {m["name"]: [f"https://{m['address']}:2379"] for m in MEMBERS}, members
    seen = wait_for(lambda: (v := leaders(lab, [*GATEWAYS, WITNESS])) and
                    len(set(v.values())) == 1 and "0" not in v.values() and v,
                    30, "one leader, the same for every member")
    assert next(iter(seen.values())) in {str(m["ID"]) for m in members}, (seen, members)


def api_on(lab, name: str, timeout: float = 5) -> NetnsHttp:
    """Gateway `name`'s own daemon, on its loopback listener."""
    return NetnsHttp(lab.nodes[name].netns, host="127.0.0.1", port=11022, timeout=timeout)


def role_of(lab, name: str) -> str:
    try:
        body = api_on(lab, name).get("/api/ready").parsed()
    except OSError as exc:
        return f"no answer: {exc!r}"
    return body.get("ha", {}).get("role", "?") if isinstance(body, dict) else "?"


def addresses(lab, name: str) -> str:
    return lab.ns[name].run("ip", "-o", "addr", "show").stdout


def floating_on(lab, name: str) -> bool:
    out = addresses(lab, name)
    return all(a in out for a in (f"{PUBLIC_V4}/24", f"{PUBLIC_V6}/64", f"{INTERNAL_V4}/32",
                                  f"{INTERNAL_V6}/128"))


def journals(lab) -> str:
    return "".join(f"\n--- {name} ---\n" + lab.nodes[name].journal("keepalived", 30) +
                   lab.nodes[name].journal(lines=30) for name in GATEWAYS)


def test_one_gateway_is_master_and_holds_the_floating_addresses(lab, provisioned):
    # Both start as backup, and the first keepalived up is master alone for a moment: the
    # higher priority takes over once its preempt_delay is over, and keeps it while both are up.
    wait_for(lambda: [role_of(lab, n) for n in GATEWAYS] == ["master", "backup"], 60,
             "gwa master, gwb backup", log=lambda: journals(lab))
    assert floating_on(lab, "gwa"), addresses(lab, "gwa")
    out = addresses(lab, "gwb")
    assert not any(a + "/" in out for a in (PUBLIC_V4, PUBLIC_V6, INTERNAL_V4, INTERNAL_V6)), out
    status = json.loads(lab.nodes["gwa"].run(
        "env", "-i", "HOME=/root", "bash", "-lc", "oakestra-gw status --json", check=False).stdout)
    assert status["ha"]["role"] == "master", status


def test_services_run_in_order(lab, provisioned):
    for name in GATEWAYS:
        node = lab.nodes[name]
        for unit in UNITS:
            assert node.run("systemctl", "is-active", unit, check=False).stdout.strip() == \
                "active", node.journal(unit)
            assert node.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        started = [int(node.run("systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                                unit).stdout) for unit in UNITS]
        assert started == sorted(started), (name, dict(zip(UNITS, started)))
    # The witness is an etcd member and nothing else.
    witness = lab.nodes[WITNESS]
    assert witness.run("systemctl", "is-active", "etcd", check=False).stdout.strip() == "active"
    assert witness.run("test", "-e", "/opt/oakestra-gw", check=False).returncode == 1
    # Debian's postinst never started etcd with its defaults (it would have made a one-node
    # cluster of its own under /var/lib/etcd/default).
    for node in lab.nodes.values():
        assert node.run("test", "-e", "/var/lib/etcd/default", check=False).returncode == 1


def test_configs_are_the_daemons_rendering(lab, provisioned):
    for name in GATEWAYS:
        node = lab.nodes[name]
        for tool, path, extra in (("keepalived", "/etc/keepalived/keepalived.conf", []),
                                  ("conntrackd", "/etc/conntrackd/conntrackd.conf",
                                   ["--systemd"])):
            rendered = node.run("oakestra-gw", "ha", "render", tool, *extra).stdout
            assert node.run("cat", path).stdout == rendered, (name, tool)
        keepalived = node.run("cat", "/etc/keepalived/keepalived.conf").stdout
        assert f"{PUBLIC_V4}/24 dev eth0" in keepalived and f"priority {PRIORITY[name]}" in \
            keepalived, keepalived
        res = node.run("keepalived", "--config-test", "-f", "/etc/keepalived/keepalived.conf",
                       check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        # conntrackd runs with it: its client reaches the daemon through the rendered socket,
        # also under the name `oakestra-gw ha notify` uses (ha.state_dir).
        for conf in ("/etc/conntrackd/conntrackd.conf", "/run/oakestra-gw/ha/conntrackd.conf"):
            res = node.run("conntrackd", "-C", conf, "-s", "runtime", check=False)
            assert res.returncode == 0 and "daemon uptime" in res.stdout, res.stdout + res.stderr
        toml = node.run("cat", "/etc/oakestra-gw/gateway.toml").stdout
        own = etcd_address(GATEWAYS.index(name) + 1)
        others = [f'"https://{m["address"]}:2379"' for m in MEMBERS if m["address"] != own]
        assert f'endpoints = ["https://{own}:2379", {", ".join(others)}]' in toml, toml


# A TLS client on a gateway: the daemon's files, and maybe no certificate of its own.
TLS_CLIENT = ("import json, ssl, sys, urllib.request\n"
              "def tls(cert=True):\n"
              f"    files = {STORE_TLS!r}\n"
              "    context = ssl.create_default_context(cafile=files['cafile'])\n"
              "    if cert:\n"
              "        context.load_cert_chain(files['certfile'], files['keyfile'])\n"
              "    return context\n"
              "def ask(url, **kw):\n"
              "    try:\n"
              "        with urllib.request.urlopen(url, timeout=10, **kw) as r:\n"
              "            return f'{r.status} {r.read().decode().strip()}'\n"
              "    except Exception as exc:\n"
              "        return f'refused: {exc!r}'\n")


def test_etcd_speaks_tls_only_with_a_certificate(lab, provisioned):
    """Clients and peers alike, on every member (asked from gwa): the member answers over TLS
    to a client with a certificate of the CA, and to nothing else (no certificate; plain)."""
    script = TLS_CLIENT + (
        "out = {}\n"
        "for host in sys.argv[1:]:\n"
        "    for port in ('2379', '2380'):\n"
        "        base = f'https://{host}:{port}'\n"
        "        path = '/health' if port == '2379' else '/version'\n"
        "        out[f'{host}:{port}'] = {'cert': ask(base + path, context=tls()),\n"
        "            'no cert': ask(base + path, context=tls(cert=False)),\n"
        "            'plain': ask(base.replace('https', 'http') + path)}\n"
        "print(json.dumps(out))\n")
    hosts = [m["address"] for m in MEMBERS]
    out = json.loads(lab.nodes["gwa"].run("python3", "-c", script, *hosts).stdout)
    for host in hosts:
        client, peer = out[f"{host}:2379"], out[f"{host}:2380"]
        assert client["cert"].startswith("200 ") and '"health":"true"' in \
            client["cert"].replace(" ", ""), out
        assert peer["cert"].startswith("200 ") and "etcdserver" in peer["cert"], out
        for answer in (client, peer):
            assert not answer["no cert"].startswith("200"), out
            assert not answer["plain"].startswith("200"), out
    # etcd's own copies (the key for etcd alone) on every member; the daemon's, root's alone.
    for name, node in lab.nodes.items():
        files = node.run("stat", "-c", "%n %U %a", MEMBER_TLS_DIR,
                         f"{MEMBER_TLS_DIR}/member.key").stdout.split("\n")
        assert files[:2] == [f"{MEMBER_TLS_DIR} etcd 700",
                             f"{MEMBER_TLS_DIR}/member.key etcd 600"], (name, files)
    for name in GATEWAYS:
        assert lab.nodes[name].run("stat", "-c", "%U %a", STORE_TLS["keyfile"]).stdout.strip() \
            == "root 600", name


# -- the shared table --------------------------------------------------------------------------

def floating_api(lab, timeout: float = 10) -> NetnsHttp:
    """The pair's API where the cluster calls it: the floating internal IPv4, from the worker."""
    return NetnsHttp(lab.worker.name, host=INTERNAL_V4, port=11022, timeout=timeout)


def expose(lab, port: int) -> int | None:
    """The status of an add through the floating API; None when nothing answers there."""
    try:
        res = floating_api(lab).post("/api/service/exposure/add",
                                     {"exposed_port": port, "service_ip": SERVICE_V4,
                                      "service_port": HTTP_PORT}, token=None)
    except OSError:
        return None
    return res.status


def in_etcd(lab, port: int, member: str = WITNESS) -> dict | None:
    client, ns = etcd(lab, member)
    key = f"{PREFIX}/exposures/ipv4/tcp/{port}".encode()
    _, kvs = in_netns(ns, client.range, key)
    return json.loads(kvs[0].value) if kvs else None


def in_kernel(lab, name: str, port: int) -> bool:
    target = kernel_v4(lab.ns[name]).get(("ipv4", "tcp", port))
    return target == (ipaddress.ip_address(SERVICE_V4), HTTP_PORT)


def through_the_pair(lab, port: int) -> str | None:
    """A new connection from the client to the pair's public address: the page, or None."""
    try:
        res = NetnsHttp(lab.client.name, host=PUBLIC_V4, port=port, timeout=3).get("/hello.txt")
    except OSError:
        return None
    return res.body.decode() if res.status == 200 else None


HELLO = "hello from the worker\n"


def test_the_single_gateways_table_is_imported(lab, provisioned):
    """gwa was a single gateway: its first start on etcd imported that table into the
    shared one, which both kernels and the floating address carry."""
    imported = in_etcd(lab, LEFT_BY_SINGLE)
    assert imported is not None and imported["service_ip"] == SERVICE_V4, imported
    assert "imported this gateway's own table" in lab.nodes["gwa"].journal(lines=400)
    for name in GATEWAYS:
        wait_for(lambda: in_kernel(lab, name, LEFT_BY_SINGLE), 30, f"the import in {name}")
    assert wait_for(lambda: through_the_pair(lab, LEFT_BY_SINGLE), 30,
                    "traffic to the imported exposure") == HELLO


def test_an_exposure_through_the_floating_api_is_in_etcd_and_both_kernels(lab, provisioned):
    status = wait_for(lambda: expose(lab, 8090), 30, "the API on the floating address")
    assert status in (200, 201), status
    assert in_etcd(lab, 8090)["service_ip"] == SERVICE_V4
    for name in GATEWAYS:
        wait_for(lambda: in_kernel(lab, name, 8090), 30, f"port 8090 in {name}'s kernel",
                 log=lambda: lab.ns[name].run("nft", "list", "map", "inet", "oakestra_gw",
                                               "expose_v4", check=False).stdout)
    assert wait_for(lambda: through_the_pair(lab, 8090), 30,
                    "traffic through the floating address") == HELLO


def test_second_run_changes_nothing(lab, provisioned):
    res = run_playbook(lab.inventory, lab.tmp)
    lab.timings["second run"] = res.elapsed
    print(f"\npair: second run {res.elapsed:.1f}s")
    assert_changed_nothing(res)


def test_check_diff_mode_reports_nothing_to_do(lab, provisioned):
    res = run_playbook(lab.inventory, lab.tmp, "--check", "--diff")
    lab.timings["check run"] = res.elapsed
    print(f"\npair: check --diff run {res.elapsed:.1f}s")
    assert_changed_nothing(res)


# -- the master's power loss -----------------------------------------------------------------

def test_the_backup_takes_over_when_the_master_loses_power(lab, provisioned):
    assert role_of(lab, "gwa") == "master" and through_the_pair(lab, 8090) == HELLO
    t0 = time.monotonic()
    lab.power_loss("gwa")
    wait_for(lambda: role_of(lab, "gwb") == "master", 120, "gwb master",
             log=lambda: lab.nodes["gwb"].journal("keepalived", 40))
    to_master = time.monotonic() - t0
    wait_for(lambda: floating_on(lab, "gwb"), 60, "the floating addresses on gwb",
             log=lambda: addresses(lab, "gwb"))
    assert wait_for(lambda: through_the_pair(lab, 8090), 120,
                    "new connections through the public address after the failover",
                    log=lambda: lab.nodes["gwb"].journal(lines=40)) == HELLO
    lab.timings["failover: gwb master"] = to_master
    lab.timings["failover: first new connection"] = time.monotonic() - t0
    print(f"\npair: power loss of gwa -> gwb master {to_master:.1f}s, first new connection "
          f"through {PUBLIC_V4} {time.monotonic() - t0:.1f}s")


def test_etcd_keeps_its_quorum_and_a_new_exposure_reaches_the_new_master(lab, provisioned,
                                                                        record_property):
    survivors = ["gwb", WITNESS]
    members = etcd_call(lab, WITNESS, "cluster/member/list")["members"]
    survivor_ids = {str(m["ID"]) for m in members if m.get("name") in survivors}
    assert len(survivor_ids) == 2, members
    # Both survivors name the same leader, and it is one of them: until they notice the dead
    # member's absence they may still agree on it.
    wait_for(lambda: (v := leaders(lab, survivors)) and len(set(v.values())) == 1
             and set(v.values()) <= survivor_ids and v, 60, "a leader among the two left",
             log=lambda: f"{leaders(lab, survivors)} of {members}")
    t0 = time.monotonic()
    wait_for(lambda: expose(lab, 8091) in (200, 201), 60,
             "a new exposure acknowledged through the floating API",
             log=lambda: lab.nodes["gwb"].journal(lines=40))
    assert in_etcd(lab, 8091)["service_ip"] == SERVICE_V4
    wait_for(lambda: in_kernel(lab, "gwb", 8091), 30, "port 8091 in gwb's kernel")
    assert wait_for(lambda: through_the_pair(lab, 8091), 30, "traffic to the new exposure") \
        == HELLO
    lab.timings["after the failover: a new exposure carries traffic"] = time.monotonic() - t0
    record_property("pair_nodes_s", {k: round(v, 2) for k, v in lab.timings.items()})
