"""Shared fixtures. Kernel tests never run in the host's network namespace: pytest (as root)
always moves itself into a fresh one before any test runs, so the host's ruleset, routes and
sysctls are out of reach whatever a test does, however pytest was started. (Whether we are in
the host's namespace cannot be told reliably: /proc/1/ns/net may be unreadable even to root.)"""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest

CLONE_NEWNET = 0x40000000


def pytest_configure(config):
    # Single-threaded here, so unshare() moves the whole process (and all later threads and
    # children) into the new namespace.
    if os.geteuid() == 0:
        before = os.stat("/proc/self/ns/net").st_ino
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise RuntimeError(f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}")
        if os.stat("/proc/self/ns/net").st_ino == before:
            raise RuntimeError("still in the starting network namespace after unshare()")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


# `make test` runs the suite on two workers (pytest-xdist, --dist loadfile with
# --no-loadscope-reorder, so in collection order: without it xdist sorts the units by their
# number of tests): the units run one after another on a worker, a unit being a module (its
# labs are made once) or,
# for the booted-node tests, both node modules together. Those are CPU-bound (nspawn boots,
# Ansible), and side by side they each took nearly twice as long; one after the other on one
# worker, the other worker meanwhile runs tests that mostly wait on daemons and timers.
NODE_UNIT = ("tests/node/test_node.py", "tests/node/test_pair_nodes.py")
# The units that take minutes, longest first: one that started last would end the run alone.
# Only the order depends on this list.
LONG_UNITS = (
    "node",
    "tests/reliability/test_hostile.py",
    "tests/ha/test_storm.py",
    "tests/reliability/test_drift_lost_events.py",
    "tests/ha/test_failover.py",
    "tests/kernel/test_gateway.py",
    "tests/docs/test_built_pages.py",
    "tests/durability/test_store_durability.py",
    "tests/reliability/test_api_flood.py",
)


def unit_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "node" if path in NODE_UNIT else path


def _run_order(item) -> int:
    unit = unit_of(item.nodeid)
    return LONG_UNITS.index(unit) if unit in LONG_UNITS else len(LONG_UNITS)


def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the node modules as one unit (`unit_of`). (xdist's own grouping,
    --dist loadgroup, renames the tests' node ids, which pytest 9.2 no longer lets it do.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 - only with -n

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_order)  # stable: within a unit, and for the rest, collection order
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (network namespaces, nftables)")
        for item in items:
            if "kernel" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def clean_table():
    """Our table is absent before and after the test, in the test process's own namespace."""
    from gw.core import ruleset

    def drop():
        subprocess.run(["nft", f"table {ruleset.TABLE}\ndelete table {ruleset.TABLE}"],
                       check=True)

    drop()
    yield
    drop()


def pytest_terminal_summary(terminalreporter):
    """The figures the tests measure: `record_property` values (failover times, replication
    lag, storm rounds), which otherwise reach only a JUnit file, and the `[figures]` lines of
    tests/reliability's `report()`, which only -s or -rA would show. Printed for the passed
    tests, so that CI's log carries the measurements of the run it passed."""
    lines = []
    for report in terminalreporter.stats.get("passed", []):
        if report.when != "call":
            continue
        lines += [f"{report.nodeid}: {name} = {value}" for name, value in report.user_properties]
        lines += [f"{report.nodeid}: {line[len('[figures] '):]}"
                  for line in report.capstdout.splitlines() if line.startswith("[figures] ")]
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)
