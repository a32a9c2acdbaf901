"""Our table beside real iptables-nft rules on the node (Debian's iptables, nf_tables backend).

- NetManager DNATs host ports in its own `OAKESTRA` chain of iptables' `nat` table, jumped to
  from `PREROUTING` (priority `dstnat`) with no address match. Our prerouting chain runs at
  `dstnat - 10`: for an exposed port ours binds the flow first, whichever was loaded first.
  Positive control: a port we do not expose is DNATed by that chain.
- Our forward chain accepts what it DNATed, but another table's forward `policy drop` still
  drops it: every base chain on the hook must accept a packet (docs/operations.md).
"""

from __future__ import annotations

import shutil

import pytest

from gw import lab as L

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# What NetManager's chain points the exposed port at: nothing listens there.
ELSEWHERE_V4, ELSEWHERE_V6 = "10.30.99.99", "fdff:99::99"
FAMILIES = {"ipv4": ("iptables", L.GATEWAY_V4, L.SERVICE_V4, ELSEWHERE_V4),
            "ipv6": ("ip6tables", L.GATEWAY_V6, L.SERVICE_V6, ELSEWHERE_V6)}
EXPOSED, NOT_EXPOSED = 8080, 8081


def require_iptables() -> None:
    if not (shutil.which("iptables") and shutil.which("ip6tables")):
        pytest.skip("needs Debian's iptables (make deps installs it)")


def load_oakestra_chain(lab) -> None:
    """NetManager's DNAT chain, made by the iptables tool as NetManager makes it."""
    for tool, _public, service, elsewhere in FAMILIES.values():
        def target(ip, port):
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        for args in (["-N", "OAKESTRA"], ["-A", "PREROUTING", "-j", "OAKESTRA"],
                     ["-A", "OAKESTRA", "-p", "tcp", "--dport", str(EXPOSED), "-j", "DNAT",
                      "--to-destination", target(elsewhere, 80)],
                     ["-A", "OAKESTRA", "-p", "tcp", "--dport", str(NOT_EXPOSED), "-j", "DNAT",
                      "--to-destination", target(service, 80)]):
            lab.run("gateway", tool, "-t", "nat", *args)


def get(lab, host: str, port: int) -> int | str:
    try:
        return L.http_get(lab, "client", host, port, "/whoami", timeout=3)[0]
    except OSError as exc:
        return type(exc).__name__


@pytest.mark.parametrize("order", ["before", "after"],
                         ids=["iptables-loaded-first", "iptables-loaded-later"])
def test_an_exposure_wins_over_netmanagers_iptables_dnat_chain(order):
    require_iptables()
    with L.Lab() as lab:
        lab.start_services()
        if order == "before":
            load_oakestra_chain(lab)
        daemon = L.lab_daemon(lab).start()
        if order == "after":
            load_oakestra_chain(lab)
        listing = lab.run("gateway", "nft", "list", "chain", "ip", "nat", "OAKESTRA").stdout
        assert f"dport {EXPOSED}" in listing and "dnat to" in listing, listing
        status, answer = daemon.request("POST", "/api/service/exposure/add", {"exposures": [
            {"exposed_port": EXPOSED, "service_ip": service, "service_port": 80}
            for _tool, _public, service, _elsewhere in FAMILIES.values()]})
        assert status == 201, answer
        for family, (_tool, public, _service, _elsewhere) in FAMILIES.items():
            assert get(lab, public, EXPOSED) == 200, f"{family}: NetManager's DNAT won"
            # Positive control: the chain is live, it DNATs the port we leave alone.
            assert get(lab, public, NOT_EXPOSED) == 200, f"{family}: the OAKESTRA chain is dead"
        assert daemon.stop() == 0, daemon.log_tail()


def test_another_tables_forward_drop_drops_what_we_accept():
    with L.Lab() as lab:
        lab.start_services()
        daemon = L.lab_daemon(lab).start()
        status, answer = daemon.request("POST", "/api/service/exposure/add", {
            "exposed_port": EXPOSED, "service_ip": L.SERVICE_V4, "service_port": 80})
        assert status == 201, answer
        assert get(lab, L.GATEWAY_V4, EXPOSED) == 200
        lab.run("gateway", "nft", "add table inet other; add chain inet other forward "
                "{ type filter hook forward priority filter; policy drop; }")
        # Our table still accepts the flow (ct status dnat accept); the other table drops it.
        assert get(lab, L.GATEWAY_V4, EXPOSED) == "TimeoutError"
        lab.run("gateway", "nft", "delete table inet other")
        assert get(lab, L.GATEWAY_V4, EXPOSED) == 200
        assert daemon.stop() == 0, daemon.log_tail()
