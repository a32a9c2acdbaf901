"""The benchmark lab: three network namespaces the run creates and removes itself.

    client  c0 198.18.0.2/24 (+ .3-.6 as extra sources)
       |  veth
    gateway pub0 198.18.0.1/24 (our table's public address) and 198.18.0.11/24 (the baseline's)
            goProxyTun (veth, MTU 1450) -> 10.30.0.0/16, fdff::/16
            oakgw0 (bridge, no ports) 10.30.255.1/32, fdff::ffff:1/128 (the internal addresses)
       |  veth, MTU 1450 (the stand-in for NetManager's tunnel)
    worker  tun0 10.30.0.1/16, fdff::1/16 (the service IPs; nginx listens on 10.30.0.1:80)

Only addresses inside these namespaces are ever sent traffic. Every sysctl written is a
per-namespace one of the gateway, client or worker namespace, never the host's.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import wait_for  # noqa: F401 - also used by controlplane
from gw.lab.netns import Built, Netns, stop_process, veth

PUBLIC_IP = "198.18.0.1"      # what clients of our table connect to
BASELINE_IP = "198.18.0.11"   # what clients of the one-rule-per-port baseline connect to
CLIENT_IP = "198.18.0.2"
EXTRA_SOURCES = ["198.18.0.3", "198.18.0.4", "198.18.0.5", "198.18.0.6"]
INTERNAL_IPV4 = "10.30.255.1"
INTERNAL_IPV6 = "fdff::ffff:1"
SERVICE_IP = "10.30.0.1"      # the worker's address: every measured exposure points here
SERVICE_PORT = 80
TUNNEL_IF = "goProxyTun"
TUNNEL_MTU = 1450
BRIDGE_IF = "oakgw0"

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  keepalive_timeout 0;
  server {{
    listen {ip}:{port} backlog=8192 reuseport;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


class BenchLab(Built):
    """client -- gateway -- goProxyTun -- worker. Use as a context manager: everything it
    created (namespaces, processes inside them, temp files) goes on exit, also on failure."""

    def __init__(self, bridge: bool = True):
        self.bridge = bridge
        self.client = self.gateway = self.worker = None
        # On a disk filesystem (not a tmpfs /tmp): the store's fsyncs must be real.
        self.tmp = Path(tempfile.mkdtemp(prefix="oakgw-bench-", dir="/var/tmp"))
        self._procs: list[subprocess.Popen] = []

    # -- lifecycle ------------------------------------------------------------------------

    def _build(self) -> None:
        self.client, self.gateway, self.worker = (Netns.create(p) for p in
                                                  ("oakbc", "oakbg", "oakbw"))
        c, g, w = self.client, self.gateway, self.worker
        veth(c, "c0", g, "pub0")
        veth(g, TUNNEL_IF, w, "tun0", mtu=TUNNEL_MTU)
        c.run("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "c0")
        for ip in EXTRA_SOURCES:
            c.run("ip", "addr", "add", f"{ip}/24", "dev", "c0")
        g.run("ip", "addr", "add", f"{PUBLIC_IP}/24", "dev", "pub0")
        g.run("ip", "addr", "add", f"{BASELINE_IP}/24", "dev", "pub0")
        g.run("ip", "route", "add", "10.30.0.0/16", "dev", TUNNEL_IF)
        g.run("ip", "-6", "route", "add", "fdff::/16", "dev", TUNNEL_IF)
        if self.bridge:
            self.add_bridge()
        w.run("ip", "addr", "add", f"{SERVICE_IP}/16", "dev", "tun0")
        w.run("ip", "-6", "addr", "add", "fdff::1/16", "dev", "tun0", "nodad")
        # Per-namespace sysctls of namespaces this lab owns.
        g.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        g.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        c.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")

    def add_bridge(self) -> None:
        g = self.gateway
        g.run("ip", "link", "add", BRIDGE_IF, "type", "bridge")
        g.run("ip", "link", "set", BRIDGE_IF, "up")
        g.run("ip", "addr", "add", f"{INTERNAL_IPV4}/32", "dev", BRIDGE_IF)
        g.run("ip", "-6", "addr", "add", f"{INTERNAL_IPV6}/128", "dev", BRIDGE_IF, "nodad")

    def close(self) -> None:
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        for ns in (self.client, self.gateway, self.worker):
            if ns is not None:
                ns.delete()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- processes --------------------------------------------------------------------------

    def spawn(self, ns: Netns, *cmd: str, **kw) -> subprocess.Popen:
        """A process inside `ns`, stopped when the lab closes (or earlier with `stop`)."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = ns.popen(*cmd, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def start_nginx(self) -> subprocess.Popen:
        d = self.tmp / "nginx"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d, ip=SERVICE_IP, port=SERVICE_PORT))
        log = open(d / "stderr", "wb")
        proc = self.spawn(self.worker, "nginx", "-c", str(conf), "-e", "stderr", stderr=log)
        wait_for(lambda: self.worker.run("curl", "-sf", "-m", "1", "-o", "/dev/null",
                                         f"http://{SERVICE_IP}:{SERVICE_PORT}/",
                                         check=False).returncode == 0,
                 10, f"nginx in the worker namespace ({(d / 'stderr').read_text()[-300:]})")
        return proc

    # -- gateway namespace helpers ----------------------------------------------------------

    def nft(self, *args: str, input: str | None = None, timeout: float = 300) -> str:
        return self.gateway.run("nft", *args, input=input, timeout=timeout).stdout

    def conntrack_count(self) -> int:
        out = self.gateway.run("cat", "/proc/sys/net/netfilter/nf_conntrack_count").stdout
        return int(out.strip() or 0)

    def conntrack_flush(self) -> None:
        self.gateway.run("conntrack", "-F", check=False)
