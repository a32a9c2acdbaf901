"""The Store protocol (gw/store/protocol.py) as the gateway relies on it, checked against both
backends as the daemon builds them from [store]: the embedded TinyDB store, and the etcd store
on a real etcd member, over plain HTTP and over TLS with client certificates (the member in a
namespace of its own; the test's thread enters it, so the store's requests reach it there).

Only what the protocol promises is here; each backend's own matters (the journal, torn records,
locks; conflicts between gateways, the watch) have their own tests beside it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gw.core.errors import InvalidInput, StoreUnavailable
from gw.core.exposure import Exposure
from gw.core.settings import StoreSettings
from gw.daemon import build
from gw.lab.certs import LabCA
from gw.lab.etcd import EtcdCluster
from gw.lab.netns import Netns
from gw.store import etcd_client as ec

_prefixes = itertools.count()


def doc(port=8080, protocol="tcp", family="ipv4", ip=None, service_port=80, service_id=None):
    ip = ip or ("10.30.0.1" if family == "ipv4" else "fdff::1")
    return Exposure(port, protocol, ipaddress.ip_address(ip), service_port, service_id)


class Backend:
    """Opens one store again and again (a reopen is a restart of the gateway), on a directory
    (and for etcd a prefix) of its own, the way the daemon builds it from [store]."""

    def __init__(self, kind: str, cluster: EtcdCluster | None = None):
        self.kind, self.cluster = kind, cluster
        self.dir = Path(tempfile.mkdtemp(prefix="oakgw-contract-"))
        self.prefix = f"/contract{next(_prefixes)}"
        self.opened: list = []

    def settings(self, **tls) -> StoreSettings:
        path = str(self.dir / "exposures.json")
        if self.cluster is None:
            return StoreSettings(path=path)
        if self.cluster.ca is not None and not tls:
            tls = {"ca_file": str(self.cluster.ca.cert),
                   "cert_file": str(self.cluster.client.cert),
                   "key_file": str(self.cluster.client.key)}
        return StoreSettings(path=path, backend="etcd", endpoints=tuple(self.cluster.endpoints),
                             prefix=self.prefix, **tls)

    def open(self, **tls):
        store = build.store(self.settings(**tls))
        self.opened.append(store)
        if self.cluster is not None and not tls:
            assert store.unreachable is None, store.unreachable
        return store

    def etcd_keys(self) -> set[bytes] | None:
        """What etcd holds under this store's prefix (None for the local store)."""
        if self.cluster is None:
            return None
        s = self.settings()
        client = ec.EtcdClient(s.endpoints, ca_file=s.ca_file, cert_file=s.cert_file,
                               key_file=s.key_file)
        head = f"{self.prefix}/".encode()
        _, kvs = client.range(head, ec.prefix_end(head))
        return {kv.key for kv in kvs}

    def close(self) -> None:
        for store in self.opened:
            store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def one_member(tls: bool) -> Iterator[EtcdCluster]:
    ns = Netns.create("oakc")
    try:
        with EtcdCluster([("m1", ns, "127.0.0.1")], tls=tls) as cluster:
            yield cluster
    finally:
        ns.delete()


@pytest.fixture(scope="module")
def etcd_plain():
    with one_member(tls=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def etcd_tls():
    with one_member(tls=True) as cluster:
        yield cluster


ETCD = [pytest.mark.kernel, pytest.mark.slow]


@pytest.fixture(params=["local", pytest.param("etcd", marks=ETCD),
                        pytest.param("etcd-tls", marks=ETCD)])
def backend(request):
    if request.param == "local":
        b = Backend("local")
        yield b
        b.close()
        return
    cluster = request.getfixturevalue({"etcd": "etcd_plain", "etcd-tls": "etcd_tls"}[
        request.param])
    # What an operator's environment may hold must not override [store]: a CA bundle other
    # than store.ca_file, a proxy between the gateway and etcd.
    monkeypatch = request.getfixturevalue("monkeypatch")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, "/etc/ssl/certs/ca-certificates.crt")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.9:9")
    with cluster.members["m1"].ns.inside():
        b = Backend(request.param, cluster)
        try:
            yield b
        finally:
            b.close()


def test_a_new_store_is_empty(backend):
    store = backend.open()
    assert store.exposures() == [] and store.meta() == {} and not store.counts()
    assert store.get(("ipv4", "tcp", 80)) is None


def test_round_trip_sorted_counted_and_kept_over_a_reopen(backend):
    docs = [doc(9000, family="ipv6"), doc(80, "udp"), doc(80), doc(443, service_id="web")]
    store = backend.open()
    store.commit(put=docs)
    expected = sorted(docs, key=lambda e: e.key)
    assert store.exposures() == expected
    assert store.get(("ipv4", "tcp", 443)) == doc(443, service_id="web")
    assert store.counts() == Counter({("ipv4", "tcp"): 2, ("ipv4", "udp"): 1,
                                      ("ipv6", "tcp"): 1})
    store.close()
    again = backend.open()
    assert again.exposures() == expected and again.get(("ipv6", "tcp", 9000)) == docs[0]


def test_a_put_replaces_the_whole_exposure(backend):
    store = backend.open()
    store.commit(put=[doc(80, service_id="old")])
    store.commit(put=[doc(80, ip="10.30.0.9")])
    assert store.exposures() == [doc(80, ip="10.30.0.9")]  # the service id went too


def test_deletes_apply_before_puts_and_a_missing_key_is_no_error(backend):
    store = backend.open()
    store.commit(put=[doc(80), doc(81)])
    store.commit(put=[doc(80, service_port=8)],
                 delete=[("ipv4", "tcp", 80), ("ipv4", "tcp", 81), ("ipv6", "udp", 1)])
    assert store.exposures() == [doc(80, service_port=8)]
    store.close()
    assert backend.open().exposures() == [doc(80, service_port=8)]


def test_meta_merges_none_removes_and_it_is_kept(backend):
    store = backend.open()
    store.commit(meta={"gateway_id": "g1", "internal_ipv4": "10.30.255.1"})
    store.commit(meta={"internal_ipv4": None, "internal_ipv6": "fdff::1"})
    assert store.meta() == {"gateway_id": "g1", "internal_ipv6": "fdff::1"}
    store.close()
    assert backend.open().meta() == {"gateway_id": "g1", "internal_ipv6": "fdff::1"}


def test_what_a_read_returns_cannot_change_the_store(backend):
    store = backend.open()
    store.commit(put=[doc(80)], meta={"m": [1]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        store.get(("ipv4", "tcp", 80)).service_port = 2
    listed = store.exposures()
    listed.clear()
    store.meta()["m"].append(2)
    assert store.exposures() == [doc(80)] and store.meta() == {"m": [1]}


@pytest.mark.parametrize("bad", [
    pytest.param({"put": [doc(0)]}, id="port-0"),
    pytest.param({"put": [doc(70000)]}, id="port-70000"),
    pytest.param({"put": [doc(protocol="sctp")]}, id="protocol-sctp"),
    pytest.param({"put": [doc(80, service_port="80")]}, id="service-port-a-string"),
    pytest.param({"put": [doc(80).to_dict()]}, id="a-dict-not-an-exposure"),
    pytest.param({"put": [Exposure(80, "tcp", "10.30.0.1", 80)]}, id="service-ip-a-string"),
    pytest.param({"put": [doc(80, service_id=7)]}, id="service-id-a-number"),
    pytest.param({"put": [doc(80), doc(80, service_port=9)]}, id="one-key-twice"),
    pytest.param({"delete": [("ip", "tcp", 80)]}, id="delete-family-ip"),
    pytest.param({"delete": [("ipv4", "tcp")]}, id="delete-short-key"),
])
def test_an_invalid_commit_raises_and_changes_nothing(backend, bad):
    store = backend.open()
    store.commit(put=[doc(1)])
    before = backend.etcd_keys()
    with pytest.raises(InvalidInput):
        store.commit(**bad)
    assert store.exposures() == [doc(1)] and backend.etcd_keys() == before
    store.close()
    assert backend.open().exposures() == [doc(1)]


def test_a_commit_after_close_raises_and_changes_nothing(backend):
    store = backend.open()
    store.commit(put=[doc(80)])
    before = backend.etcd_keys()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.commit(put=[doc(81)])
    with pytest.raises(StoreUnavailable):
        store.commit(delete=[("ipv4", "tcp", 80)])
    assert backend.etcd_keys() == before
    assert backend.open().exposures() == [doc(80)]


ports = st.integers(1, 6)
keys = st.tuples(st.sampled_from(["ipv4", "ipv6"]), st.just("tcp"), ports)
changes = st.lists(st.tuples(
    st.lists(st.builds(lambda k, sp: doc(k[2], k[1], k[0], service_port=sp), keys,
                       st.integers(1, 3)), max_size=3, unique_by=lambda e: e.key),
    st.lists(keys, max_size=2),
    st.booleans()), max_size=8)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=changes)
def test_any_sequence_of_commits_and_reopens_holds_what_was_committed(backend, changes):
    """Against a dict: each commit (deletes, then puts), sometimes followed by a reopen."""
    backend.prefix += "x"        # every example on a fresh prefix and directory
    shutil.rmtree(backend.dir, ignore_errors=True)
    model: dict = {}
    store = backend.open()
    for put, delete, reopen in changes:
        store.commit(put=put, delete=delete)
        for k in delete:
            model.pop(k, None)
        model.update((e.key, e) for e in put)
        if reopen:
            store.close()
            store = backend.open()
        assert store.exposures() == sorted(model.values(), key=lambda e: e.key)
    store.close()


@pytest.mark.parametrize("wrong", ["no client certificate", "another CA"])
@pytest.mark.kernel
@pytest.mark.slow
def test_etcd_over_tls_refuses_a_client_it_cannot_trust_and_nothing_changes(etcd_tls, tmp_path,
                                                                              wrong):
    with etcd_tls.members["m1"].ns.inside():
        b = Backend("etcd-tls", etcd_tls)
        try:
            b.open().commit(put=[doc(80)])
            b.opened.pop().close()
            if wrong == "no client certificate":
                tls = {"ca_file": str(etcd_tls.ca.cert)}
            else:
                other = LabCA.create(tmp_path / "other", "some other CA")
                client = other.issue("client", usages=("clientAuth",))
                tls = {"ca_file": str(other.cert), "cert_file": str(client.cert),
                       "key_file": str(client.key)}
            store = b.open(**tls)
            # It starts from its local copy, says why etcd is out of reach, and takes no change.
            assert "TLS: " in store.unreachable and store.exposures() == [doc(80)]
            with pytest.raises(StoreUnavailable, match="etcd"):
                store.commit(put=[doc(81)])
            assert b.etcd_keys() == {f"{b.prefix}/exposures/ipv4/tcp/80".encode()}
            print(f"\n{wrong}: {store.unreachable}")
        finally:
            b.close()
