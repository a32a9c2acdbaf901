"""The conntrack flusher's queue, the command it runs, and how a sweep tells orphan flows
from explained ones (no kernel needed)."""

import ipaddress
import threading

from gw.kernel.conntrack import IPS_DST_NAT, Flusher, orphans, parse_flows, through_filter
from gw.core.exposure import Exposure

E1 = Exposure(8080, "tcp", ipaddress.ip_address("10.30.0.1"), 80)
E2 = Exposure(8081, "udp", ipaddress.ip_address("fdff:2000::1"), 53)
# `conntrack -L --dst-nat -o extended` as conntrack 1.4.7 prints it
DUMP = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=198.18.0.1 sport=40000 dport=8080 src=10.30.0.1 dst=10.30.255.1 sport=80 dport=40000 [ASSURED] mark=0 use=1
ipv4     2 tcp      6 431999 ESTABLISHED src=198.18.0.2 dst=198.18.0.1 sport=40001 dport=8080 src=10.30.0.9 dst=10.30.255.1 sport=80 dport=40001 [ASSURED] mark=0 use=1
ipv6     10 udp      17 29 src=2001:db8::2 dst=2001:db8::1 sport=5000 dport=8081 [UNREPLIED] src=fdff:2000::1 dst=fdff:ffff::1 sport=53 dport=5000 mark=0 use=1
ipv4     2 tcp      6 100 ESTABLISHED src=198.18.0.2 dst=198.18.0.1 sport=40002 dport=9999 src=10.19.0.5 dst=198.18.0.2 sport=80 dport=40002 [ASSURED] mark=0 use=1
ipv4     2 icmp     1 29 src=198.18.0.2 dst=198.18.0.1 type=8 code=0 id=7 src=10.30.0.1 dst=10.30.255.1 type=0 code=0 id=7 mark=0 use=1
"""
OURS = {"10.30.255.1", "fdff:ffff::1"}


def test_the_kernel_filters_the_dump_by_the_exposures_ports_and_dnat():
    f = through_filter(E2)
    assert f["CTA_TUPLE_ORIG"] == {"attrs": [["CTA_TUPLE_PROTO", {"attrs": [
        ["CTA_PROTO_NUM", 17], ["CTA_PROTO_DST_PORT", 8081]]}]]}
    assert f["CTA_TUPLE_REPLY"] == {"attrs": [["CTA_TUPLE_PROTO", {"attrs": [
        ["CTA_PROTO_NUM", 17], ["CTA_PROTO_SRC_PORT", 53]]}]]}
    assert f["CTA_STATUS"] == f["CTA_STATUS_MASK"] == IPS_DST_NAT
    # each tuple is judged on exactly the fields given: protocol and the port
    assert f["CTA_FILTER"] == {"attrs": [["CTA_FILTER_ORIG_FLAGS", (1 << 3) | (1 << 5)],
                                         ["CTA_FILTER_REPLY_FLAGS", (1 << 3) | (1 << 4)]]}


def blocking_flusher():
    """A Flusher whose deletes wait for `release`, recording each batch in `done`."""
    started, release, done = threading.Event(), threading.Event(), []

    def delete(batch):
        started.set()
        release.wait(5)
        done.append(list(batch))
        return 0

    return Flusher(delete), started, release, done


def test_flushes_queued_together_are_one_job_each_exposure_once():
    flusher, started, release, done = blocking_flusher()
    flusher.flush([E1])          # the worker takes this one and blocks in delete()
    assert started.wait(5)
    flusher.flush([E2])          # these three queue behind it: a burst
    flusher.flush([E1])
    flusher.flush([E2])
    release.set()
    assert flusher.wait(5)
    assert done == [[E1], [E2, E1]]
    flusher.close()


def test_a_dump_parses_into_tuples_and_skips_what_has_no_ports():
    flows = parse_flows(DUMP)
    assert len(flows) == 4
    f = flows[2]
    assert (f.family, f.protocol, f.src, f.dst, f.sport, f.dport) == (
        "ipv6", "udp", "2001:db8::2", "2001:db8::1", 5000, 8081)
    assert (f.reply_src, f.reply_sport, f.reply_dst) == ("fdff:2000::1", 53, "fdff:ffff::1")


def test_orphans_are_our_flows_that_no_exposure_explains():
    flows = parse_flows(DUMP)
    explained = {(*e.key, *e.target) for e in (E1, E2)}
    # 40001 goes to another target than 8080's exposure; 40002 was NATed by someone else
    assert [f.sport for f in orphans(flows, OURS, explained)] == [40001]
    assert [f.sport for f in orphans(flows, OURS, set())] == [40000, 40001, 5000]


def test_a_re_added_exposure_is_not_flushed():
    flusher, started, release, done = blocking_flusher()
    flusher.flush([E2])          # the worker takes this one and blocks in delete()
    assert started.wait(5)
    flusher.flush([E1, E2])      # queued behind it
    flusher.settle([E1])         # E1 was added again meanwhile: its queued flush goes
    release.set()
    assert flusher.wait(5)
    assert done == [[E2], [E2]]
    flusher.close()


def test_a_re_add_waits_for_the_running_flush_of_the_same_exposure():
    started, release, events = threading.Event(), threading.Event(), []

    def delete(batch):
        started.set()
        release.wait(5)
        events.append("flushed")
        return 0

    flusher = Flusher(delete)
    flusher.flush([E1])
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    flusher.settle([E1])         # returns only once the running flush of E1 is over
    events.append("settled")
    assert events == ["flushed", "settled"]
    flusher.settle([E2])         # nothing of E2 queued or running: returns at once
    flusher.close()


def test_a_sweep_asks_what_is_explained_after_the_dump_and_removes_the_rest():
    calls, removed = [], []

    def dump():
        calls.append("dump")
        return parse_flows(DUMP)

    def explained():
        calls.append("explained")
        return {(*E1.key, *E1.target)}

    flusher = Flusher(dump=dump, remove=lambda flows: removed.extend(flows) or len(flows))
    flusher.sweep(OURS, explained)
    assert flusher.wait(5)
    assert calls == ["dump", "explained"]
    assert [f.sport for f in removed] == [40001, 5000]
    flusher.close()
