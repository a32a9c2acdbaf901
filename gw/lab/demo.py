"""`oakestra-gw demo` (`make demo`): the gateway doing its job with real packets, in a lab of
network namespaces (gw.lab) that is removed again at the end, also on Ctrl-C or failure.

It runs the real daemon (`oakestra-gw serve`) in the gateway namespace, exposes a service of
the worker namespace through the HTTP API, and shows a client on the public side reaching it
over IPv4 and IPv6 (HTTP over TCP, and UDP), then a container of the worker reaching a server
on the public side through the gateway (egress, masqueraded to its public address), then the
conntrack entries and the ruleset.
`--keep` leaves the lab running for exploring and prints how to remove it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from gw import lab as L

TOOLS = ("ip", "nft", "conntrack", "curl", "socat", "sysctl")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, total: int, text: str) -> None:
    _say(f"\n==> [{n}/{total}] {text}")


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


def _show_cmd(lab: L.Lab, role: str, *cmd: str, timeout: float = 10,
              expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command in a namespace and print it with its output, as a user would type it."""
    _say(f"  {role}$ {shlex.join(cmd)}")
    proc = lab.run(role, *cmd, check=False, timeout=timeout)
    out = (proc.stdout + proc.stderr).strip()
    if out:
        _say(_indent(out))
    if expect_ok and proc.returncode != 0:
        raise L.LabError(f"`{' '.join(cmd)}` in the {role} namespace failed "
                         f"(exit {proc.returncode})")
    return proc


def _json_lines(doc) -> str:
    """JSON with each element of a list of exposures on a line of its own."""
    if isinstance(doc, dict) and isinstance(doc.get("exposures"), list) and doc["exposures"]:
        rest = {k: v for k, v in doc.items() if k != "exposures"}
        items = ",\n".join("      " + json.dumps(e) for e in doc["exposures"])
        tail = (", " + json.dumps(rest)[1:-1]) if rest else ""
        return '{"exposures": [\n' + items + "\n    ]" + tail + "}"
    return json.dumps(doc) if not isinstance(doc, str) else doc.strip()


def _api(daemon: L.GatewayDaemon, method: str, path: str, body=None, want: tuple = (200, 201)):
    _say(f"  {method} http://{daemon.api_host}:{daemon.api_port}{path}"
         + (f"  {_json_lines(body)}" if body is not None else ""))
    status, answer = daemon.request(method, path, body)
    _say(f"    -> {status} {_json_lines(answer)}")
    if status not in want:
        raise L.LabError(f"{method} {path} answered {status}")
    return answer


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "the demo needs root (it creates network namespaces); run it with sudo"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (run `make setup`)"
    try:
        import nftables  # noqa: F401
    except ImportError:
        return "python3-nftables is missing (run `make setup`)"
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(keep: bool = False) -> int:
    """Build the lab, show the gateway working, remove everything (unless `keep`).
    Returns the exit code: 0 on success."""
    problem = _preflight()
    if problem:
        print(f"oakestra-gw demo: {problem}", file=sys.stderr)
        return 2
    # SIGINT too: a process started in the background by a shell without job control (as CI
    # runners and scripts do) inherits SIGINT ignored, and a Ctrl-C or kill -INT must still
    # remove the lab.
    previous = {s: signal.signal(s, _raise_interrupt)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    lab = L.Lab()
    daemon: L.GatewayDaemon | None = None
    started = time.monotonic()
    remove = True
    try:
        daemon = _run(lab, started)
        if keep:
            remove = False
            _explain_keep(lab, daemon)
        return 0
    except KeyboardInterrupt as exc:
        print(f"\noakestra-gw demo: interrupted ({str(exc) or 'Ctrl-C'}); removing the lab",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report, clean up, exit 1
        print(f"\noakestra-gw demo: FAILED: {exc}", file=sys.stderr)
        if lab.daemon is not None:
            print("the daemon's log:\n" + _indent(lab.daemon.log_tail(), "  | "),
                  file=sys.stderr)
        if keep:
            remove = False
            print(f"the lab was kept for inspection; remove it with: "
                  f"{sys.executable} -m gw.lab remove {lab.tag}", file=sys.stderr)
        return 1
    finally:
        try:
            if remove:
                left = lab.remove()
                if left:
                    print(f"oakestra-gw demo: could not remove {', '.join(left)}",
                          file=sys.stderr)
                else:
                    _say("removed the lab: its namespaces, processes and files are gone")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _run(lab: L.Lab, started: float) -> L.GatewayDaemon:
    total = 8
    _step(1, total, "the lab: three network namespaces (nothing outside them is touched)")
    lab.build()
    _say(f"  client   {lab.ns['client']:<28} eth0 {L.CLIENT_V4}, {L.CLIENT_V6} "
         "(routes 10.30.0.0/16 and fdff::/16 via the gateway)")
    _say(f"  gateway  {lab.ns['gateway']:<28} pub0 {L.GATEWAY_V4}, {L.GATEWAY_V6}; "
         f"goProxyTun (veth, MTU {L.TUNNEL_MTU}) -> worker")
    _say(f"  worker   {lab.ns['worker']:<28} service IPs {L.SERVICE_V4}, {L.SERVICE_V6}: "
         f"HTTP :{L.HTTP_PORT}, UDP echo :{L.UDP_PORT}")
    _say(f"           {'':<28} a container {L.CONTAINER_V4}, {L.CONTAINER_V6} "
         "(default route into the tunnel)")
    lab.start_services()
    lab.start_services("client")  # a server on the Internet, for the egress step

    _step(2, total, "the gateway daemon: `oakestra-gw serve` in the gateway namespace")
    daemon = lab.daemon = L.lab_daemon(lab, overrides={"egress": {"enabled": True}})
    _say(f"  config {daemon.config_path}:")
    _say(_indent(daemon.config_path.read_text(), "    | "))
    daemon.start()
    _say("  daemon log:")
    _say(_indent(daemon.log_tail(), "    | "))
    _api(daemon, "GET", "/api/ready", want=(200,))

    _step(3, total, "expose the worker's services through the management API")
    _api(daemon, "POST", "/api/service/exposure/add", {"exposures": [
        {"exposed_port": 8080, "service_ip": L.SERVICE_V4, "service_port": 80,
         "service_id": "demo-web"},
        {"exposed_port": 8080, "service_ip": L.SERVICE_V6, "service_port": 80,
         "service_id": "demo-web"},
        {"exposed_port": 5353, "service_ip": L.SERVICE_V4, "service_port": 53,
         "protocol": "udp", "service_id": "demo-dns"},
        {"exposed_port": 5353, "service_ip": L.SERVICE_V6, "service_port": 53,
         "protocol": "udp", "service_id": "demo-dns"},
    ]}, want=(201,))

    _step(4, total, "the client fetches a page through the gateway (public IP -> DNAT -> "
                    "goProxyTun, SNAT to the internal IP)")
    _show_cmd(lab, "client", "curl", "-sS", "--max-time", "5", f"http://{L.GATEWAY_V4}:8080/")
    _show_cmd(lab, "client", "curl", "-sS", "--max-time", "5", "-g",
              f"http://[{L.GATEWAY_V6}]:8080/")
    _say("  ... and 5 MB through the 1450-byte tunnel (the gateway clamps the TCP MSS):")
    _show_cmd(lab, "client", "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
              "%{size_download} bytes in %{time_total} s\\n",
              f"http://{L.GATEWAY_V4}:8080/bytes/5000000")

    _step(5, total, "a UDP exchange through the gateway")
    for target in (f"UDP4:{L.GATEWAY_V4}:5353", f"UDP6:[{L.GATEWAY_V6}]:5353"):
        proc = _show_cmd(lab, "client", "sh", "-c", f"echo hello | socat -t 2 - {target}")
        if "echo hello" not in proc.stdout:
            raise L.LabError(f"no UDP answer from {target}")
    _say("  what the gateway does not expose stays out of reach, although the client routes "
         "to it:")
    proc = _show_cmd(lab, "client", "curl", "-sS", "--max-time", "2",
                     f"http://{L.SERVICE_V4}:80/", expect_ok=False)
    if proc.returncode == 0:
        raise L.LabError("the client reached a service IP directly")
    _say("    (no answer: dropped by the gateway's forward chain, as it should be)")

    _step(6, total, "egress: a container of the worker fetches a page from a server on the "
                    "public side (tunnel -> masquerade to the public IP)")
    proc = _show_cmd(lab, "worker", "curl", "-sS", "--max-time", "5", "--interface",
                     L.CONTAINER_V4, f"http://{L.CLIENT_V4}/")
    if f"it sees you as {L.GATEWAY_V4}" not in proc.stdout:
        raise L.LabError("the public server did not see the gateway's public address")
    _say("    (the server saw the gateway's public address; the public side routes no "
         "container network back)")

    _step(7, total, "the gateway's conntrack entries (exposed flows: client -> public IP, "
                    "reply service -> internal IP; egress: container -> server, reply to the "
                    "public IP)")
    _show_cmd(lab, "gateway", "conntrack", "-L", "--dst-nat")
    _show_cmd(lab, "gateway", "conntrack", "-L", "-s", L.CONTAINER_V4)

    _step(8, total, "the gateway's nftables table (a table of its own; exposures are map "
                    "elements)")
    _show_cmd(lab, "gateway", "nft", "list", "table", "inet", "oakestra_gw")

    _say(f"\nSUCCESS: the client reached the worker's service through the gateway over IPv4 "
         f"and IPv6, TCP and UDP, and a container reached the Internet through it "
         f"({time.monotonic() - started:.1f} s)")
    return daemon


def _explain_keep(lab: L.Lab, daemon: L.GatewayDaemon) -> None:
    g, c = lab.ns["gateway"], lab.ns["client"]
    _say(f"""
The lab is still up (--keep), the daemon running in {g}.
Explore it:
  ip netns exec {c} curl http://{L.GATEWAY_V4}:8080/
  ip netns exec {g} nft list table inet oakestra_gw
  ip netns exec {g} conntrack -L
  ip netns exec {g} curl -H 'Authorization: Bearer {daemon.token}' \\
      http://{daemon.api_host}:{daemon.api_port}/api/service/exposure
  ip netns exec {g} bash        # a shell in the gateway namespace
  daemon state and log: {daemon.dir}
Remove it (daemon, services, namespaces, files):
  {sys.executable} -m gw.lab remove {lab.tag}""")
