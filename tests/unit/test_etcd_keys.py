"""The etcd store's pure parts: key encoding and the transaction of a commit."""

from __future__ import annotations

import base64
import ipaddress

from hypothesis import given, strategies as st

from gw.core.exposure import Exposure
from gw.store import etcd_client as ec
from gw.store import etcd_keys as k

PREFIX = "/gw"
keys = st.tuples(st.sampled_from(["ipv4", "ipv6"]), st.sampled_from(["tcp", "udp"]),
                 st.integers(1, 65535))


@given(keys)
def test_a_key_round_trips(key):
    raw = k.key_bytes(PREFIX, key)
    assert raw == f"/gw/exposures/{key[0]}/{key[1]}/{key[2]}".encode()
    assert k.key_from(PREFIX, raw) == key


def test_keys_that_name_no_exposure_are_not_ours():
    for raw in (b"/gw/exposures/ipv4/tcp/0", b"/gw/exposures/ipv4/tcp/080",
                b"/gw/exposures/ipv5/tcp/80", b"/gw/exposures/ipv4/tcp/80/x",
                b"/other/exposures/ipv4/tcp/80", b"/gw/exposures/ipv4/sctp/80"):
        assert k.key_from(PREFIX, raw) is None, raw


def e(port, ip="10.30.0.1", sid=None):
    return Exposure(port, "tcp", ipaddress.ip_address(ip), 80, sid)


def test_a_value_round_trips_and_a_mismatch_is_dropped():
    x = e(8080, sid="svc")
    kv = ec.KeyValue(k.key_bytes(PREFIX, x.key), k.encode(x), 5, 5)
    assert k.read_kv(PREFIX, kv) == (x.key, x)
    other = ec.KeyValue(k.key_bytes(PREFIX, ("ipv4", "tcp", 9)), k.encode(x), 5, 5)
    assert k.read_kv(PREFIX, other) is None
    assert k.read_kv(PREFIX, ec.KeyValue(kv.key, b"{not json", 5, 5)) is None


def unb(text):
    return base64.b64decode(text)


def test_a_commit_compares_what_it_believes():
    new, held, gone = e(1), e(2, "10.30.0.2"), ("ipv4", "tcp", 3)
    compare, success, failure = k.commit_txn(PREFIX, [new, held], [gone],
                                             {held.key: 7, gone: 9})
    by_key = {unb(c["key"]): c for c in compare}
    assert by_key[k.key_bytes(PREFIX, new.key)]["target"] == "CREATE"
    assert by_key[k.key_bytes(PREFIX, new.key)]["create_revision"] == "0"
    assert by_key[k.key_bytes(PREFIX, held.key)]["mod_revision"] == "7"
    assert by_key[k.key_bytes(PREFIX, gone)]["mod_revision"] == "9"
    assert [list(op)[0] for op in success] == ["request_delete_range", "request_put",
                                               "request_put"]
    assert len(failure) == 3 and all("request_range" in op for op in failure)


def test_a_put_and_a_delete_of_one_key_is_one_put():
    """A revert of a relabel puts the old exposure back under the key it deletes: etcd takes
    no two operations on one key in a transaction."""
    x = e(1)
    compare, success, _ = k.commit_txn(PREFIX, [x], [x.key], {x.key: 4})
    assert len(compare) == 1 and [list(op)[0] for op in success] == ["request_put"]
