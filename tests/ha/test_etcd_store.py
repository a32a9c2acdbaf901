"""The etcd store under the Gateway, on a real three-member cluster: a change the kernel
refuses is undone in etcd (the undo compares the revision it wrote) and answered 503."""

from __future__ import annotations

import ipaddress
import tempfile

import pytest

from gw.core import ruleset
from gw.core.errors import KernelRefused
from gw.core.exposure import DeleteRequest, Exposure
from gw.kernel.fake import FakeNft
from gw.kernel.firewall import Firewall
from gw.lab.http import in_netns
from gw.service.gateway import Gateway
from gw.store import etcd_client as ec
from gw.store.etcd import EtcdStore
from gw.store.local import LocalStore
from tests.gateway_machine import SETTINGS

from .test_etcd_client import cluster  # noqa: F401 - the module's cluster fixture

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


class RefusingFirewall(Firewall):
    """Refuses element changes while `refuse` is set, as nftables does (KernelRefused)."""
    refuse = False

    def apply(self, add=(), remove=()):
        if self.refuse:
            raise KernelRefused("nftables refused the change (test)")
        return super().apply(add, remove)


def exposure(port, ip="10.30.0.1"):
    return Exposure(port, "tcp", ipaddress.ip_address(ip), 80)


def test_a_refused_kernel_change_is_undone_in_etcd(cluster):  # noqa: F811
    member = cluster.members["m1"]
    client = ec.EtcdClient([member.client_url])
    with tempfile.TemporaryDirectory() as tmp:
        def scenario():
            store = EtcdStore(client, "/refuse", LocalStore(f"{tmp}/exposures.json")).open()
            firewall = RefusingFirewall(FakeNft(), ruleset.skeleton_vars(SETTINGS))
            gw = Gateway(store, firewall)
            gw.load()
            gw.add([exposure(8080)])
            firewall.refuse = True
            with pytest.raises(KernelRefused):
                gw.add([exposure(8081)])
            with pytest.raises(KernelRefused):
                gw.delete(DeleteRequest(8080, "tcp", None))
            firewall.refuse = False
            head = b"/refuse/exposures/"
            _, kvs = client.range(head, ec.prefix_end(head))
            gw.close()
            return {kv.key for kv in kvs}, [e.key for e in store.exposures()]
        keys, held = in_netns(member.ns.name, scenario)
    assert keys == {b"/refuse/exposures/ipv4/tcp/8080"}
    assert held == [("ipv4", "tcp", 8080)]


class RacingClient(ec.EtcdClient):
    """Runs `race` once, after a range has been answered and before its caller uses it: a
    commit that lands between a re-read's answer and its use."""
    race = None

    def range(self, *args, **kw):
        answer = super().range(*args, **kw)
        race, self.race = self.race, None
        if race is not None:
            race()
        return answer


def test_a_reread_keeps_what_a_commit_learnt_while_it_was_answered(cluster):  # noqa: F811
    """The follower reads the table again without holding changes back (Gateway.resync): a
    commit between the read's answer and its use must not be forgotten."""
    member = cluster.members["m1"]
    client = RacingClient([member.client_url])
    with tempfile.TemporaryDirectory() as tmp:
        def scenario():
            store = EtcdStore(client, "/race", LocalStore(f"{tmp}/exposures.json")).open()
            store.commit(put=[exposure(9000)])
            client.race = lambda: store.commit(put=[exposure(9001)], delete=[("ipv4", "tcp", 9000)])
            store.read_all()  # answered with 9000 only; 9001 is committed before it is used
            held = [e.key for e in store.exposures()]
            store.close()
            return held
        held = in_netns(member.ns.name, scenario)
    assert held == [("ipv4", "tcp", 9001)]
