"""A node without /etc/protocols (Debian's netbase is not installed on a minimal system, e.g.
a debootstrap --variant=minbase node): libnftables then resolves no protocol name it does not
know itself (the skeleton must say `icmpv6`, not `ipv6-icmp`, or the daemon cannot start) and
lists the protocol of a map key as its number (6, 17) instead of tcp/udp. The daemon and
`oakestra-gw rules diff` must still start and read the kernel as equal to the store, not as
"2 missing, 2 unexpected" on every reconcile."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.api.harness import GatewayTestbed, gw_command, require_root
from tests.helpers import ex, wait_for

pytestmark = [pytest.mark.kernel]

# A private mount namespace in which /etc/protocols is empty.
NO_PROTOCOLS = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind /dev/null /etc/protocols && exec "$0" "$@"']


def test_daemon_and_rules_diff_without_a_protocols_database(tmp_path):
    require_root()
    gw = GatewayTestbed(tmp_path / "gw", drift_watch=False)
    try:
        with open(gw.log_path, "ab") as log:
            gw.proc = gw.ns.popen(*NO_PROTOCOLS, *gw_command(), "serve", "--config",
                                  str(gw.config_path), stdout=log, stderr=subprocess.STDOUT)
        gw.wait_serving()
        api = gw.http()
        assert api.add(ex(8080)).status == 201
        assert api.add(ex(5353, protocol="udp")).status == 201
        listing = gw.ns.run(*NO_PROTOCOLS, "nft", "list", "map", "inet", "oakestra_gw",
                            "expose_v4").stdout
        assert "6 . 8080" in listing, listing  # the condition this test is about

        gw.send(signal.SIGHUP)
        line = wait_for(lambda: next((x for x in gw.log().splitlines()
                                      if "reconcile: " in x), None), 30, "the reconcile")
        assert "reconcile: kernel in sync" in line, line

        res = gw.ns.run(*NO_PROTOCOLS, *gw_command(), "rules", "diff", "--config",
                        str(gw.config_path), check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith("in sync: 2 exposure(s)"), res.stdout
    finally:
        gw.close()
