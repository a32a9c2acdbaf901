"""Drift: foreign changes to our table are noticed from nftables events and repaired; our own
commits and other tables' changes are not drift."""

import ipaddress
import subprocess
import threading

import pytest

from gw.core import ruleset
from gw.core.config import parse_config
from gw.kernel.drift import DriftWatcher, touches_our_table, transactions
from gw.core.exposure import Exposure
from gw.kernel.firewall import Firewall
from gw.service.gateway import Gateway
from gw.kernel.nft import NftSession
from gw.store.local import LocalStore

SETTINGS = parse_config({"network": {"internal_ipv4": "10.30.255.1",
                                     "internal_ipv6": "fdff::ffff:1"}})


def test_monitor_lines_group_into_transactions():
    lines = ["add table inet other\n", "# new generation 5 by process 42 (nft)\n",
             "delete element inet oakestra_gw expose_v4 { tcp . 80 }\n",
             "# new generation 6 by process 43 (nft)\n",
             "# ERROR: We lost some netlink events!\n", "netlink: Error: No buffer space\n"]
    items = list(transactions(lines))
    assert [(t.generation, t.pid) for t in items[:2]] == [(5, 42), (6, 43)]
    assert items[0].changes == []  # other tables' changes are not even kept
    assert touches_our_table(items[1].changes)
    assert touches_our_table(["flush ruleset"])
    assert not touches_our_table(["add table inet oakestra_gw_probe"])
    # nft's words when the kernel dropped events (mnl.c), and libnftables' error prefix
    assert items[2:] == ["# ERROR: We lost some netlink events!",
                         "netlink: Error: No buffer space"]


@pytest.fixture
def watched(tmp_path):
    subprocess.run(["nft", "table inet oakestra_gw\ndelete table inet oakestra_gw"], check=True)
    gw = Gateway(LocalStore(tmp_path / "s.json"), Firewall(NftSession(), ruleset.skeleton_vars(SETTINGS)))
    gw.load()
    repairs = []
    done = threading.Event()

    def repair(reason):
        repairs.append((reason, gw.reconcile()))
        done.set()

    watcher = DriftWatcher(repair, gw.firewall.session.probe).start()
    yield gw, repairs, done
    watcher.stop()
    gw.store.close()
    subprocess.run(["nft", "flush", "ruleset"], check=True)


def elements():
    out = subprocess.run(["nft", "list", "map", "inet", "oakestra_gw", "expose_v4"],
                         capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


E = Exposure(8080, "tcp", ipaddress.ip_address("10.30.0.1"), 80)


@pytest.mark.kernel
@pytest.mark.parametrize("tamper", [
    ["flush", "ruleset"],
    ["delete", "table", "inet", "oakestra_gw"],
    ["flush", "chain", "inet", "oakestra_gw", "prerouting"],
    ["delete", "element", "inet", "oakestra_gw", "expose_v4", "{ tcp . 8080 }"],
    ["add", "element", "inet", "oakestra_gw", "expose_v4", "{ udp . 9 : 10.30.0.9 . 9 }"],
])
def test_foreign_changes_are_repaired(watched, tamper):
    gw, repairs, done = watched
    # Our own commits are not drift, from whichever thread they are asked for.
    worker = threading.Thread(target=gw.add, args=([E],))
    worker.start()
    worker.join()
    gw.reconcile()
    assert repairs == []
    expected = elements()
    subprocess.run(["nft", *tamper], check=True)
    # Only a hang fails here; how fast is measured in tests/bench (the drift figures).
    assert done.wait(30), "drift not repaired"
    # The monitor reports in order: our commits above came before the tampering, and the
    # one report is the tampering's.
    assert len(repairs) == 1, repairs
    reason, diff = repairs[0]
    assert "changed our table" in reason and diff
    assert elements() == expected and not gw.diff()
    assert "jump expose" in subprocess.run(["nft", "list", "chain", "inet", "oakestra_gw",
                                            "prerouting"], capture_output=True,
                                           text=True).stdout


@pytest.mark.kernel
def test_other_tables_are_not_drift(watched):
    gw, repairs, done = watched
    subprocess.run(["nft", "add table inet neighbour; add chain inet neighbour c"], check=True)
    # Then a change to our table: events come in order, so once it is reported the
    # neighbour's were judged, and it must be the only report.
    subprocess.run(["nft", "add element inet oakestra_gw expose_v4 { udp . 9 : 10.30.0.9 . 9 }"],
                   check=True)
    assert done.wait(30), "our table's change was not reported"
    assert len(repairs) == 1 and "changed our table" in repairs[0][0], repairs
    subprocess.run(["nft", "delete table inet neighbour"], check=True)
