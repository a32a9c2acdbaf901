"""The input chain caps open API connections per source, so one allowed host cannot take all
of waitress's connection slots; other sources still get in."""

import subprocess
import sys
import textwrap

import pytest

from gw.core import ruleset
from gw.core.config import parse_config
from gw.lab.netns import netns, veth

pytestmark = pytest.mark.kernel

SETTINGS = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1"}})

CONNECT = textwrap.dedent("""
    import socket, sys
    held = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket()
        s.settimeout(1)
        s.bind((sys.argv[1], 0))
        try:
            s.connect(("10.30.255.1", 11022))
            held.append(s)
        except OSError:
            pass
    print(len(held))
""")


def connections(ns, source: str, tries: int) -> int:
    out = ns.run(sys.executable, "-c", CONNECT, source, str(tries), timeout=120).stdout
    return int(out)


def test_one_source_gets_at_most_64_api_connections():
    with netns("oaklg") as gw, netns("oaklc") as client:
        veth(gw, "eth0", client, "eth0")
        gw.run("ip", "addr", "add", "10.30.255.1/24", "dev", "eth0")
        client.run("ip", "addr", "add", "10.30.255.2/24", "dev", "eth0")
        client.run("ip", "addr", "add", "10.30.255.3/24", "dev", "eth0")
        subprocess.run(gw.argv("nft", "-f", "-"), input=ruleset.render(SETTINGS), text=True,
                       check=True)
        server = gw.popen(sys.executable, "-c", textwrap.dedent("""
            import socket, time
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("10.30.255.1", 11022)); s.listen(1024)
            print("listening", flush=True)
            held = []
            while True:
                held.append(s.accept()[0])
        """), stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            # positive control first: a few connections from a source work
            assert connections(client, "10.30.255.3", 3) == 3
            assert connections(client, "10.30.255.2", 70) == 64
            # the cap is per source: another one still gets in meanwhile
            assert connections(client, "10.30.255.3", 3) == 3
        finally:
            server.kill()
            server.wait()


def test_the_global_cap_in_the_skeleton_is_below_waitress_limit():
    text = ruleset.skeleton_path().read_text()
    assert f"ct state new ct count over {ruleset.API_REMOTE_CAP} drop" in text
    assert ruleset.API_REMOTE_CAP < ruleset.API_CONNECTION_LIMIT
