"""The HA tests' own small topology: namespaces joined on one etcd segment (a bridge in a hub
namespace, 198.19.200.0/24), and an etcd member in each."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Iterator

from gw.core.ruleset import parse_listing
from gw.lab.etcd import EtcdCluster
from gw.lab.http import in_netns
from gw.lab.netns import Netns, run
from gw.store import etcd_client as ec
from gw.store.etcd import lost_quorum

SEGMENT = "198.19.200"


@contextmanager
def etcd_segment(namespaces: list[Netns]) -> Iterator[tuple[Netns, list[str]]]:
    """Each namespace gets `etcd0` on one bridge, at SEGMENT.1, .2, ...: yields the hub (where
    the i-th namespace's port is `p<i>`) and the addresses."""
    hub = Netns.create("oakh")
    try:
        hub.ip("link add br0 type bridge", "link set br0 up")
        addresses = []
        for i, ns in enumerate(namespaces, 1):
            run(["ip", "link", "add", "etcd0", "netns", ns.name, "type", "veth", "peer", "name",
                 f"p{i}", "netns", hub.name])
            hub.ip(f"link set p{i} master br0", f"link set p{i} up")
            ns.ip(f"addr add {SEGMENT}.{i}/24 dev etcd0", "link set etcd0 up")
            addresses.append(f"{SEGMENT}.{i}")
        for ns in namespaces:
            ns.wait_links_up(["etcd0"])
        yield hub, addresses
    finally:
        hub.delete()


@contextmanager
def cluster_in(namespaces: list[Netns]) -> Iterator[EtcdCluster]:
    """A member named m1, m2, ... in each namespace, on the etcd segment (`cluster.hub`)."""
    with etcd_segment(namespaces) as (hub, addresses):
        with EtcdCluster([(f"m{i}", ns, a) for i, (ns, a) in
                          enumerate(zip(namespaces, addresses), 1)]) as cluster:
            cluster.hub = hub
            yield cluster


def kernel_v4(ns: Netns) -> dict:
    """The IPv4 exposures in a gateway's kernel: {(family, protocol, port): target}."""
    out = ns.run("nft", "-j", "list", "map", "inet", "oakestra_gw", "expose_v4").stdout
    return dict(parse_listing(json.loads(out)).elements)


def etcd_exposures(cluster: EtcdCluster, prefix: str, member: str = "m3") -> dict:
    """The exposures etcd holds under `prefix`, read from one member: {port: exposure}. A read
    that meets an election (just after a cut heals: "leader changed", "no leader") is made
    again: the tests ask what etcd holds, and an election changes none of it."""
    c = ec.EtcdClient([cluster.members[member].client_url])
    head = f"{prefix}/exposures/".encode()
    deadline = time.monotonic() + 30
    while True:
        try:
            _, kvs = in_netns(cluster.members[member].ns.name, c.range, head,
                              ec.prefix_end(head))
            break
        except ec.EtcdError as exc:
            if not lost_quorum(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}
