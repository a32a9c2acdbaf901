"""The gateway service over the real store and the real kernel: after every operation the
kernel's maps equal the store, which equals a model of what was acknowledged."""

import subprocess

import pytest

from gw.core import ruleset
from gw.core.config import parse_config
from gw.core.errors import Conflict, KernelRefused, NotFound, StoreUnavailable
from gw.core.exposure import DeleteRequest
from gw.kernel.firewall import Firewall
from gw.service.gateway import Gateway
from gw.kernel.nft import NftSession, NoSuchObject
from gw.store.local import LocalStore
from tests import oracle
from tests.gateway_machine import (MACHINE_SETTINGS, SETTINGS, GatewayMachine, RealKernel,
                                   by_key, ex, store_state)

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_table")]


def kernel_state() -> dict:
    """The maps as the nft tool lists them (tests/oracle.py, independent of the code under
    test)."""
    return by_key(oracle.read())


def open_gateway(path) -> Gateway:
    gw = Gateway(LocalStore(path), Firewall(NftSession(), ruleset.skeleton_vars(SETTINGS)))
    gw.load()
    return gw


@pytest.fixture
def gateway(tmp_path):
    gw = open_gateway(tmp_path / "exposures.json")
    yield gw
    gw.close()


def test_add_is_idempotent_relabels_and_conflicts(gateway):
    e = ex(8080, "10.30.0.1")
    assert [r.outcome for r in gateway.add([e])] == ["created"]
    assert [r.outcome for r in gateway.add([e])] == ["unchanged"]
    assert [r.outcome for r in gateway.add([ex(8080, "10.30.0.1", service_id="web")])] == [
        "relabelled"]
    assert gateway.store.get(e.key).service_id == "web"
    with pytest.raises(Conflict) as info:
        gateway.add([ex(8080, "10.30.0.2")])
    assert info.value.field == "exposed_port" and "10.30.0.1:80" in info.value.message
    assert kernel_state() == store_state(gateway.store) == {e.key: ("10.30.0.1", 80)}


def test_a_batch_is_all_or_nothing(gateway):
    gateway.add([ex(80, "10.30.0.1")])
    with pytest.raises(Conflict) as info:
        gateway.add([ex(81, "10.30.0.1"), ex(82, "fdff::1"), ex(80, "10.30.0.9")])
    assert info.value.field == "exposures[2].exposed_port"
    assert kernel_state() == store_state(gateway.store) == {("ipv4", "tcp", 80): ("10.30.0.1", 80)}


def test_delete_one_family_or_both(gateway):
    gateway.add([ex(80, "10.30.0.1"), ex(80, "fdff::1"), ex(80, "10.30.0.1", proto="udp")])
    assert [e.family for e in gateway.delete(DeleteRequest(80, "tcp", "ipv6"))] == ["ipv6"]
    assert [e.family for e in gateway.delete(DeleteRequest(80, "tcp", None))] == ["ipv4"]
    with pytest.raises(NotFound):
        gateway.delete(DeleteRequest(80, "tcp", None))
    assert kernel_state() == store_state(gateway.store) == {("ipv4", "udp", 80): ("10.30.0.1", 80)}


def test_kernel_refusal_rolls_the_store_back(gateway):
    gateway.add([ex(80, "10.30.0.1")])
    before = store_state(gateway.store)
    # Break the kernel side for real: without our table every transaction is refused.
    subprocess.run(["nft", "delete", "table", "inet", "oakestra_gw"], check=True)
    with pytest.raises(KernelRefused) as info:
        gateway.add([ex(81, "10.30.0.2")])
    assert "No such file or directory" in info.value.message
    assert isinstance(info.value, NoSuchObject)  # the refusal code branches on
    assert store_state(gateway.store) == before
    assert "firewall" in gateway.health
    gateway.load()
    assert kernel_state() == before and not gateway.health.snapshot()


def test_a_delete_converges_when_the_kernel_lost_the_element(gateway):
    gateway.add([ex(80, "10.30.0.1"), ex(81, "10.30.0.1")])
    subprocess.run(["nft", "flush", "map", "inet", "oakestra_gw", "expose_v4"], check=True)
    gateway.delete(DeleteRequest(80, "tcp", None))
    assert kernel_state() == {}
    assert store_state(gateway.store) == {("ipv4", "tcp", 81): ("10.30.0.1", 80)}


def test_store_failure_leaves_the_kernel_untouched(tmp_path):
    """The store on a real, tiny filesystem that fills up."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        gw = open_gateway(mnt / "exposures.json")
        gw.add([ex(80, "10.30.0.1")])
        filler = mnt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
        with pytest.raises(StoreUnavailable) as info:
            gw.add([ex(81 + i, "10.30.0.2") for i in range(200)])
        assert "space" in info.value.message.lower()
        assert kernel_state() == store_state(gw.store) == {("ipv4", "tcp", 80): ("10.30.0.1", 80)}
        filler.unlink()
        gw.add([ex(81, "10.30.0.2")])  # recovers once there is room again
        assert len(kernel_state()) == 2
        gw.store.close()
        assert store_state(LocalStore(mnt / "exposures.json", shared=True)) == kernel_state()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_reconcile_reports_and_repairs_drift(gateway):
    gateway.add([ex(80, "10.30.0.1"), ex(443, "fdff::1", 443)])
    subprocess.run(["nft", "flush", "map", "inet", "oakestra_gw", "expose_v6"], check=True)
    subprocess.run(["nft", "add", "element", "inet", "oakestra_gw", "expose_v4",
                    "{ udp . 9 : 10.30.0.9 . 9 }"], check=True)
    diff = gateway.reconcile()
    assert [e.key for e in diff.missing] == [("ipv6", "tcp", 443)]
    assert diff.unexpected == [("ipv4", "udp", 9)]
    assert kernel_state() == store_state(gateway.store) and not gateway.diff()


# -- a stateful property: random sequences against a model -----------------------------------

class OnTheKernel(GatewayMachine):
    """tests/gateway_machine.py, as the unit tier runs it against the fake."""

    Kernel = RealKernel


TestGatewayMachine = OnTheKernel.TestCase
TestGatewayMachine.settings = MACHINE_SETTINGS


def test_a_failed_revert_is_settled_before_the_next_change(gateway, monkeypatch):
    """Kernel refuses, then the disk refuses the revert: the store holds a change that was
    answered 503. The gateway says so (not ready), a repair loads the kernel without it, and
    the next change first writes the undo (refused with the store while the disk still
    fails), so the refused change reaches neither the kernel nor, in the end, the store."""
    gateway.add([ex(80, "10.30.0.1")])
    subprocess.run(["nft", "delete", "table", "inet", "oakestra_gw"], check=True)
    real_commit, calls = gateway.store.commit, []

    def commit(*args, **kw):
        calls.append(kw)
        if len(calls) >= 2:  # the revert, and the disk stays broken
            raise StoreUnavailable("no space left on device (ENOSPC)")
        return real_commit(*args, **kw)

    monkeypatch.setattr(gateway.store, "commit", commit)
    with pytest.raises(KernelRefused):
        gateway.add([ex(81, "10.30.0.2")])
    assert "store" in gateway.health
    # The list (what the API answers) shows what was acknowledged, not the refused change
    # the store still holds.
    assert [e.exposed_port for e in gateway.exposures()] == [80]
    assert len(store_state(gateway.store)) == 2
    gateway.reconcile()  # the repair restores the table, without the refused exposure
    assert len(kernel_state()) == 1
    with pytest.raises(StoreUnavailable):
        gateway.add([ex(82, "10.30.0.3")])
    assert len(kernel_state()) == 1
    monkeypatch.setattr(gateway.store, "commit", real_commit)
    gateway.add([ex(82, "10.30.0.3")])
    assert kernel_state() == store_state(gateway.store) and len(kernel_state()) == 2
    assert "store" not in gateway.health and "firewall" not in gateway.health


def test_reconfigure_own_addresses_keeps_exposures_to_them_out_of_the_kernel(gateway):
    """New own internal addresses (the cluster re-addressed the gateway): a stored exposure
    to one of them leaves the kernel at once and stays in the store; back when it changes."""
    gateway.add([ex(80, "10.30.0.7"), ex(81, "10.30.0.8")])
    done = gateway.reconfigure(own_addresses=["10.30.0.7"])
    assert done.changed and not done.diff
    assert kernel_state() == {("ipv4", "tcp", 81): ("10.30.0.8", 80)}
    assert len(store_state(gateway.store)) == 2
    assert [e.exposed_port for e in gateway.pointing_at_itself()] == [80]
    assert gateway.own_addresses == {"10.30.0.7"}
    done = gateway.reconfigure(own_addresses=["10.30.0.7"])  # the same: only a reconcile
    assert not done.changed and not done.diff
    gateway.reconfigure(own_addresses=())
    assert kernel_state() == store_state(gateway.store)


def test_reconfigure_variables_loads_the_table_with_them(gateway):
    gateway.add([ex(80, "10.30.0.1")])
    moved = parse_config({"network": {"internal_ipv4": "10.30.255.9",
                                      "internal_ipv6": "fdff::ffff:9"}})
    done = gateway.reconfigure(variables=ruleset.skeleton_vars(moved))
    assert done.changed and not done.diff
    table = subprocess.run(["nft", "list", "table", "inet", "oakestra_gw"], check=True,
                           capture_output=True, text=True).stdout
    assert "10.30.255.9" in table and "10.30.255.1" not in table
    assert kernel_state() == store_state(gateway.store)
    # Nothing new, but the kernel drifted: the reconfigure repairs it like a reconcile.
    subprocess.run(["nft", "flush", "map", "inet", "oakestra_gw", "expose_v4"], check=True)
    done = gateway.reconfigure(variables=ruleset.skeleton_vars(moved))
    assert not done.changed and [e.key for e in done.diff.missing] == [("ipv4", "tcp", 80)]
    assert kernel_state() == store_state(gateway.store)
