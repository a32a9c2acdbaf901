"""The etcd v3 JSON-gateway client against a real three-member etcd cluster in namespaces."""

from __future__ import annotations

import threading

import pytest

from gw.lab.http import in_netns
from gw.lab.netns import Netns
from gw.store import etcd_client as ec

from .lab import cluster_in

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    names = [Netns.create("oake") for _ in range(3)]
    try:
        with cluster_in(names) as cluster:
            yield cluster
    finally:
        for ns in names:
            ns.delete()


def client_of(cluster, name, **kw):
    return ec.EtcdClient([cluster.members[name].client_url], **kw)


def on(cluster, name, fn, *args):
    return in_netns(cluster.members[name].ns.name, fn, *args)


def test_prefix_end():
    assert ec.prefix_end(b"/a/") == b"/a0"
    assert ec.prefix_end(b"a\xff") == b"b"
    assert ec.prefix_end(b"\xff\xff") == b"\0"


def test_create_if_absent_decides_once(cluster):
    c = client_of(cluster, "m1")
    key = b"/t1/k"

    def create(value):
        return c.txn([ec.absent(key)], [ec.put(key, value)], [ec.get(key)])

    first = on(cluster, "m1", create, b"one")
    second = on(cluster, "m1", create, b"two")
    assert first.succeeded and not second.succeeded
    assert [kv.value for kv in second.ranges[0]] == [b"one"]
    assert second.ranges[0][0].mod_revision == first.revision
    # A delete that compares the revision it read: a stale one is refused.
    stale = on(cluster, "m1", lambda: c.txn([ec.unchanged(key, first.revision - 1)],
                                            [ec.delete(key)]))
    assert not stale.succeeded
    done = on(cluster, "m1", lambda: c.txn([ec.unchanged(key, first.revision)],
                                           [ec.delete(key)]))
    assert done.succeeded
    assert on(cluster, "m2", lambda: c.range(key))[1] == []


def test_watch_sees_changes_and_compaction(cluster):
    c = client_of(cluster, "m2")
    rev, _ = on(cluster, "m2", lambda: c.range(b"/t2/", ec.prefix_end(b"/t2/")))
    on(cluster, "m2", lambda: c.txn([], [ec.put(b"/t2/a", b"1"), ec.put(b"/t2/b", b"2")]))
    on(cluster, "m2", lambda: c.txn([], [ec.delete(b"/t2/a")]))

    def collect(start, n):
        seen = []
        for _, events in c.watch(b"/t2/", start, idle_timeout=10):
            seen += events
            if len(seen) >= n:
                return seen
    events = on(cluster, "m2", collect, rev + 1, 3)
    assert [(e.kv.key, e.kv.value, e.deleted) for e in events] == [
        (b"/t2/a", b"1", False), (b"/t2/b", b"2", False), (b"/t2/a", b"", True)]
    now = events[-1].kv.mod_revision
    on(cluster, "m2", lambda: c.compact(now))
    with pytest.raises(ec.Compacted) as caught:
        on(cluster, "m2", collect, rev + 1, 1)
    assert caught.value.revision == now


def test_cut_off_member_ends_the_watch_and_refuses_writes(cluster):
    """hasleader: a watch on a member that loses its leader ends (without it, it stays open
    and silent); a write there is refused within the client's timeout."""
    c = client_of(cluster, "m3", timeout=3)
    rev, _ = on(cluster, "m3", lambda: c.range(b"/t3/", ec.prefix_end(b"/t3/")))
    ended = {}
    started = threading.Event()

    def watch():
        try:
            started.set()
            for _ in c.watch(b"/t3/", rev + 1, idle_timeout=60):
                pass
        except ec.EtcdError as e:
            ended["error"] = e

    t = threading.Thread(target=on, args=(cluster, "m3", watch), daemon=True)
    t.start()
    started.wait(5)
    cluster.cut("m3")
    try:
        t.join(45)  # only catches a hang: etcd cancels such watches after a few elections
        assert isinstance(ended.get("error"), ec.WatchEnded), ended
        with pytest.raises(ec.EtcdError):
            on(cluster, "m3", lambda: c.txn([], [ec.put(b"/t3/x", b"1")]))
    finally:
        cluster.heal("m3")
    cluster.wait_healthy("m3")
    assert on(cluster, "m3", lambda: c.txn([], [ec.put(b"/t3/x", b"1")])).succeeded
