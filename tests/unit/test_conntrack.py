"""The conntrack flusher's queue and the command it runs (no kernel needed)."""

import ipaddress
import threading

from gw.conntrack import Flusher, delete_command
from gw.exposure import Exposure

E1 = Exposure(8080, "tcp", ipaddress.ip_address("10.30.0.1"), 80)
E2 = Exposure(8081, "udp", ipaddress.ip_address("fdff:2000::1"), 53)


def test_delete_command_matches_only_flows_dnated_through_the_exposure():
    assert delete_command(E2) == ["conntrack", "-D", "-f", "ipv6", "-p", "udp",
                                  "--orig-port-dst", "8081", "--reply-src", "fdff:2000::1",
                                  "--reply-port-src", "53", "--dst-nat"]


def test_a_re_added_exposure_is_not_flushed():
    release, done = threading.Event(), []

    def delete(batch):
        release.wait(5)
        done.append(list(batch))
        return 0

    flusher = Flusher(delete)
    flusher.flush([E2])          # the worker takes this one and blocks in delete()
    flusher.flush([E1, E2])      # queued behind it
    flusher.cancel([E1])         # E1 was added again meanwhile
    release.set()
    assert flusher.wait(5)
    assert done == [[E2], [E2]]
    flusher.close()
