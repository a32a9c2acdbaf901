"""Decommissioning a gateway of a pair takes its etcd member out of the cluster
(tasks/etcd_leave.yml, which absent.yml includes before it stops etcd): the role's own tasks,
run by ansible-playbook on the controller alone (connection local) against a real etcd cluster
of three members over TLS in a network namespace. What needs a node (absent.yml stopping and
disabling etcd.service and removing the member's data) is not run here: see the role's README."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.request

import pytest
import yaml

from gw.lab.etcd import EtcdCluster
from gw.lab.http import in_netns
from gw.lab.netns import Netns
from tests.node.test_ansible_lint import ANSIBLE, env, tool

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ROLE = ANSIBLE / "roles" / "oakestra_gateway"
# Three members on loopback addresses of one namespace: the two gateways and the witness.
MEMBERS = {"gwa": "127.0.0.11", "gwb": "127.0.0.12", "witness": "127.0.0.13"}


@pytest.fixture
def cluster():
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (make ha-deps)")
    ns = Netns.create("oakl")
    try:
        with EtcdCluster([(name, ns, address) for name, address in MEMBERS.items()],
                         tls=True) as etcd:
            yield etcd
    finally:
        ns.delete()


def members(etcd: EtcdCluster, ask: str) -> set[str]:
    """The names of the members in the cluster's list, as the member `ask` gives it."""
    m = etcd.members[ask]
    context = ssl.create_default_context(cafile=str(etcd.ca.cert))
    context.load_cert_chain(str(etcd.client.cert), str(etcd.client.key))

    def listing():
        req = urllib.request.Request(f"{m.client_url}/v3/cluster/member/list", data=b"{}")
        with urllib.request.urlopen(req, timeout=10, context=context) as answer:
            return json.load(answer)["members"]
    return {member["name"] for member in in_netns(m.ns.name, listing)}


def leave(etcd: EtcdCluster, name: str, tmp) -> subprocess.CompletedProcess:
    """The role's etcd_leave.yml for the gateway whose member is `name`, as a pair over TLS
    (its daemon's files: here the lab's CA and client certificate) would run it."""
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "oakestra_gateway_ha": True, "oakestra_gateway_etcd_name": name,
            "oakestra_gateway_etcd_members": [{"name": n, "address": a}
                                              for n, a in MEMBERS.items()],
            "oakestra_gateway_etcd_ca_file": str(etcd.ca.cert),
            "oakestra_gateway_etcd_cert_file": str(etcd.client.cert),
            "oakestra_gateway_etcd_key_file": str(etcd.client.key)}
    (tmp / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": {name: host}}}))
    play = [{"hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Leave", "ansible.builtin.include_role": {
            "name": "oakestra_gateway", "tasks_from": "etcd_leave"}}]}]
    (tmp / "play.yml").write_text(yaml.safe_dump(play))
    # The role's files on the node are role constants (vars/main.yml): only extra vars come
    # before them.
    files = {"oakestra_gateway_store_tls_ca": str(etcd.ca.cert),
             "oakestra_gateway_store_tls_cert": str(etcd.client.cert),
             "oakestra_gateway_store_tls_key": str(etcd.client.key)}
    ns = next(iter(etcd.members.values())).ns
    return ns.run(tool("ansible-playbook"), "-i", str(tmp / "inventory.yml"),
                  "--extra-vars", json.dumps(files), str(tmp / "play.yml"), check=False,
                  timeout=300, cwd=ANSIBLE,
                  env=dict(env(), ANSIBLE_ROLES_PATH=str(ROLE.parent)))


def changed(res: subprocess.CompletedProcess) -> int:
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return int(res.stdout.rsplit("changed=", 1)[1].split()[0])


def test_a_gateway_leaves_while_others_remain_and_the_last_member_stays(cluster, tmp_path):
    assert members(cluster, "gwb") == set(MEMBERS)
    # gwa leaves: by its own ID, through its own member, over TLS with client certificates.
    assert changed(leave(cluster, "gwa", tmp_path)) == 1
    assert members(cluster, "gwb") == {"gwb", "witness"}
    cluster.wait_healthy("gwb")
    # gwb leaves too: the witness remains, with a quorum of its own.
    assert changed(leave(cluster, "gwb", tmp_path)) == 1
    assert members(cluster, "witness") == {"witness"}
    cluster.wait_healthy("witness")
    # The last member is never removed (etcd cannot, and it holds the table).
    assert changed(leave(cluster, "witness", tmp_path)) == 0
    assert members(cluster, "witness") == {"witness"}
