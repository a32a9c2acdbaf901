"""The etcd store under the Gateway, on a real three-member cluster: a change the kernel
refuses is undone in etcd (the undo compares the revision it wrote) and answered 503."""

from __future__ import annotations

import ipaddress
import tempfile

import pytest

from gw.core import ruleset
from gw.core.errors import KernelRefused, StoreUnavailable
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


def table_of(client, prefix):
    head = f"{prefix}/exposures/".encode()
    _, kvs = client.range(head, ec.prefix_end(head))
    return {kv.key.decode()[len(head):]: kv.value for kv in kvs}


def test_a_single_gateways_table_moves_into_etcd_when_it_joins(cluster):  # noqa: F811
    """A single gateway turned into one of a pair (backend tinydb -> etcd) keeps its table:
    its exposures are added to the shared table, beside those already there, and from then on
    its store is a copy of etcd's (a later start imports nothing again)."""
    member = cluster.members["m1"]
    client = ec.EtcdClient([member.client_url])
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/exposures.json"
        with LocalStore(path) as own:
            own.commit(put=[exposure(8080), exposure(8081, "10.30.0.2")])

        def scenario():
            EtcdStore(client, "/join", LocalStore(f"{tmp}/other.json")).open().commit(
                put=[exposure(9000, "10.30.0.3")])
            store = EtcdStore(client, "/join", LocalStore(path)).open()
            held = [(e.key, str(e.service_ip)) for e in store.exposures()]
            unreachable = store.unreachable
            store.close()
            in_etcd = table_of(client, "/join")
            client.txn([], [ec.delete(b"/join/exposures/ipv4/tcp/8080")], [])
            again = EtcdStore(client, "/join", LocalStore(path)).open()
            after = [e.key for e in again.exposures()]
            again.close()
            return held, unreachable, in_etcd, after, table_of(client, "/join")
        held, unreachable, in_etcd, after, in_etcd_after = in_netns(member.ns.name, scenario)
    assert unreachable is None
    assert held == [(("ipv4", "tcp", 8080), "10.30.0.1"), (("ipv4", "tcp", 8081), "10.30.0.2"),
                    (("ipv4", "tcp", 9000), "10.30.0.3")]
    assert sorted(in_etcd) == ["ipv4/tcp/8080", "ipv4/tcp/8081", "ipv4/tcp/9000"]
    assert after == [("ipv4", "tcp", 8081), ("ipv4", "tcp", 9000)]
    assert sorted(in_etcd_after) == ["ipv4/tcp/8081", "ipv4/tcp/9000"]


def test_a_table_that_conflicts_with_the_shared_one_is_not_imported(cluster):  # noqa: F811
    """The same port with another target on both sides: nothing is imported, nothing changed
    in etcd or in the gateway's own store; the gateway forwards with its own table, refuses
    changes, and says which port conflicts."""
    member = cluster.members["m1"]
    client = ec.EtcdClient([member.client_url])
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/exposures.json"
        with LocalStore(path) as own:
            own.commit(put=[exposure(8080), exposure(8082)])

        def scenario():
            EtcdStore(client, "/clash", LocalStore(f"{tmp}/other.json")).open().commit(
                put=[exposure(8080, "10.30.0.9")])
            before = table_of(client, "/clash")
            store = EtcdStore(client, "/clash", LocalStore(path)).open()
            held = [(e.key, str(e.service_ip)) for e in store.exposures()]
            with pytest.raises(StoreUnavailable) as refused:
                store.commit(put=[exposure(8083)])
            unreachable = store.unreachable
            store.close()
            return before, table_of(client, "/clash"), held, unreachable, refused.value.message
        before, after, held, unreachable, refused = in_netns(member.ns.name, scenario)
        with LocalStore(path, shared=True) as own:
            still = [(e.key, str(e.service_ip)) for e in own.exposures()]
            meta = own.meta()
    assert after == before
    assert held == still == [(("ipv4", "tcp", 8080), "10.30.0.1"),
                             (("ipv4", "tcp", 8082), "10.30.0.1")]
    assert "ipv4/tcp/8080" in unreachable and "conflict" in unreachable
    assert "ipv4/tcp/8080" in refused
    assert meta == {}
