"""The lab itself (gw/lab/topology.py): what the end-to-end tests and the demo rely on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gw import lab as L

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_the_tunnel_black_holes_full_size_segments_without_a_clamp():
    """Why the end-to-end download tests prove the MSS clamp: without the gateway (no table,
    no clamp, plain forwarding) a large download from a service stalls, while small answers
    pass; with a clamp rule alone it completes."""
    with L.Lab() as lab:
        lab.start_services()
        assert L.http_get(lab, "client", L.SERVICE_V4, 80, "/whoami")[0] == 200
        with pytest.raises(TimeoutError):
            L.http_get(lab, "client", L.SERVICE_V4, 80, "/bytes/2000000", timeout=1.5)
        lab.run("gateway", "nft", "add table inet t; add chain inet t f { type filter hook "
                "forward priority 0; }; add rule inet t f tcp flags syn oifname goProxyTun "
                "tcp option maxseg size set rt mtu")
        status, body = L.http_get(lab, "client", L.SERVICE_V4, 80, "/bytes/2000000")
        assert status == 200 and len(body) == 2_000_000


def test_the_lab_removes_everything_also_after_a_failure():
    with pytest.raises(RuntimeError):
        with L.Lab() as lab:
            proc = lab.start_services()
            names = list(lab.ns.values())
            state = lab.dir
            assert all(L.ns_path(n).exists() for n in names)
            raise RuntimeError("boom")
    assert proc.poll() is not None
    assert not any(L.ns_path(n).exists() for n in names)
    assert not state.exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_a_kept_lab_is_removed_by_its_tag():
    lab = L.Lab(keep=True)
    with lab:
        lab.start_services()
    assert lab.tag in L.list_labs()
    try:
        rc = subprocess.run([sys.executable, "-m", "gw.lab", "remove", lab.tag],
                            capture_output=True, text=True, timeout=30)
        assert rc.returncode == 0, rc.stderr
        assert lab.tag not in L.list_labs()
    finally:
        lab.remove()
