"""Faults at the edges (issue 8), each with the real daemon:

- the state directory full (a 256 KiB tmpfs) or read-only (a read-only bind mount; root ignores
  file modes): a change answers 503 naming the cause, the kernel is unchanged, the daemon stays
  up, and it recovers when space (or write access) returns;
- the kernel refusing a transaction: 503, the store unchanged;
- the cluster orchestrator down at boot with exposures stored: traffic flows from the store at
  once, even after a "reboot" took our table and bridge;
- a corrupt or truncated store at start: the daemon refuses to start with a message naming the
  file and the problem, changes no file (and leaves the kernel as it was), `oakestra-gw store
  check` says the same, and the documented recovery (docs/cli.md) brings everything back.

Every mount lives in a private mount namespace (tests/fs.MountNamespace)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gw import lab as L
from tests.api.harness import gw_command
from tests.fs import Ext4, fill, mount_namespace, require_tools
from tests.helpers import doc, ex, wait_for
from tests.reliability.common import metric, report
from tests.reliability.daemon import docs_set, gateway, kill, reap_orphans, stored_docs

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


# -- a full or read-only state directory ----------------------------------------------------

def test_a_full_state_directory_answers_503_and_recovers(tmp_path):
    with mount_namespace() as mns:
        small = tmp_path / "small"
        small.mkdir()
        mns.run("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small))
        state = mns.path(small) / "state"
        with gateway(tmp_path / "gw", config={"store": {"path": str(state / "exposures.json")}}
                     ) as gw:
            gw.start()
            api = gw.http()
            for port in (8001, 8002):
                assert api.add(ex(port)).status == 201
            filler = fill(mns.path(small))
            # The journal's last page may still take a record or two: those are durable and
            # answered 201; then the disk is full.
            acked = {doc(8001), doc(8002)}
            refused = None
            for port in range(8100, 8300):
                before = gw.kernel_docs()
                r = api.add(ex(port, service_id="x" * 100))
                if r.status == 201:
                    acked.add(doc(port))
                    continue
                refused = port
                assert r.status == 503, r
                assert r.json["error"] == "store_unavailable", r.json
                assert "No space left on device" in r.json["message"], r.json
                assert gw.kernel_docs() == before, "the kernel changed for a refused add"
                break
            assert refused is not None, "the disk never filled"
            assert docs_set(api.list()) == gw.kernel_docs() == acked
            # Still up and answering.
            assert api.get("/api/health").status == 200
            assert "Traceback" not in gw.log()
            # Space returns: the same requests succeed, without a restart.
            filler.unlink()
            assert api.add(ex(refused, service_id="x" * 100)).status == 201
            assert api.delete({"exposed_port": 8001}).status == 200
            acked = (acked | {doc(refused)}) - {doc(8001)}
            assert docs_set(api.list()) == gw.kernel_docs() == acked
            assert gw.stop() == 0
            assert stored_docs(state / "exposures.json") == acked
            mns.run("umount", str(small))


def test_a_read_only_state_directory_answers_503_and_recovers(tmp_path):
    rw, view = tmp_path / "rw", tmp_path / "view"
    rw.mkdir()
    view.mkdir()
    with mount_namespace() as mns:
        mns.run("mount", "--bind", str(rw), str(view))
        path = mns.path(view) / "exposures.json"
        with gateway(tmp_path / "gw", config={"store": {"path": str(path)}}) as gw:
            gw.start()
            api = gw.http()
            assert api.add(ex(8001)).status == 201
            assert gw.stop() == 0
            # The filesystem goes read-only (root ignores file modes: a read-only bind mount).
            mns.run("mount", "-o", "remount,bind,ro", str(view))
            gw.start()
            before = gw.kernel_docs()
            assert before == {doc(8001)}
            r = api.add(ex(8002))
            assert r.status == 503, r
            assert r.json["error"] == "store_unavailable"
            assert "Read-only file system" in r.json["message"], r.json
            r = api.delete({"exposed_port": 8001})
            assert r.status == 503 and "Read-only file system" in r.json["message"], r
            assert gw.kernel_docs() == before and docs_set(api.list()) == before
            assert api.get("/api/health").status == 200
            # Write access returns: no restart needed.
            mns.run("mount", "-o", "remount,bind,rw", str(view))
            assert api.add(ex(8002)).status == 201
            assert docs_set(api.list()) == gw.kernel_docs() == {doc(8001), doc(8002)}
            assert gw.stop() == 0
            assert stored_docs(path) == {doc(8001), doc(8002)}
            mns.run("umount", str(view))


# -- the kernel refuses --------------------------------------------------------------------

def test_a_kernel_refusal_answers_503_and_leaves_the_store(tmp_path):
    # Without the drift watcher: it would restore the table we take away here.
    with gateway(tmp_path / "gw", drift_watch=False) as gw:
        gw.start()
        api = gw.http()
        assert api.add(ex(8001)).status == 201
        assert api.add(ex(8003)).status == 201
        gw.nft("delete", "table", "inet", "oakestra_gw")
        failures = metric(api.get("/metrics").body.decode(),
                          "oakestra_gw_firewall_transaction_failures_total", 'kind="change"')
        for body in (ex(8002), {"exposures": [ex(8004), ex(8005, "fdff::5")]}):
            r = api.add(body)
            assert r.status == 503, r
            assert r.json["error"] == "kernel_refused", r.json
            assert "nftables refused" in r.json["message"], r.json
            assert docs_set(api.list()) == {doc(8001), doc(8003)}, "a refused add was stored"
        assert gw.kernel() is None
        # Said by /api/ready and /metrics; the daemon stays up.
        ready = api.get("/api/ready")
        assert ready.status == 503 and "firewall" in ready.json["reasons"], ready
        assert metric(api.get("/metrics").body.decode(),
                      "oakestra_gw_firewall_transaction_failures_total", 'kind="change"') >= failures + 2
        assert api.get("/api/health").status == 200
        # (A delete is not refused here: its element is not in the kernel either way, which is
        # all a delete asks of the kernel; the store follows.)
        assert api.delete({"exposed_port": 8003}).status == 200
        # The next reconcile (SIGHUP here) restores the table from the store; then it works.
        gw.send(signal.SIGHUP)
        wait_for(lambda: gw.kernel_docs() == {doc(8001)}, what="the reconcile", log=gw.log)
        assert api.add(ex(8002)).status == 201
        assert docs_set(api.list()) == gw.kernel_docs() == {doc(8001), doc(8002)}
        wait_for(lambda: api.get("/api/ready").status == 200, what="ready again", log=gw.log)
        assert gw.stop() == 0
        assert stored_docs(Path(gw.config["store"]["path"])) == {doc(8001), doc(8002)}


def test_a_full_map_is_a_kernel_refusal_too(tmp_path):
    """The table is there, the kernel still says no (a map that a foreign hand limited to two
    elements): 503 with nft's words, the store unchanged, and nothing half-applied."""
    with gateway(tmp_path / "gw", drift_watch=False) as gw:
        gw.start()
        api = gw.http()
        assert api.add(ex(8001)).status == 201
        listing = gw.nft("list", "table", "inet", "oakestra_gw").stdout
        limited = listing.replace("type inet_proto . inet_service : ipv4_addr . inet_service",
                                  "type inet_proto . inet_service : ipv4_addr . inet_service\n"
                                  "\t\tsize 2")
        assert limited != listing
        script = gw.dir / "limited.nft"
        script.write_text("table inet oakestra_gw\ndelete table inet oakestra_gw\n" + limited)
        gw.nft("-f", str(script))
        assert api.add(ex(8002)).status == 201
        before = gw.kernel_docs()
        r = api.add({"exposures": [ex(8003), ex(8004)]})
        assert r.status == 503 and r.json["error"] == "kernel_refused", r
        assert docs_set(api.list()) == gw.kernel_docs() == before == {doc(8001), doc(8002)}
        assert gw.stop() == 0


# -- the orchestrator is down at boot --------------------------------------------------------

def test_the_orchestrator_down_at_boot_does_not_delay_traffic(tmp_path):
    from tests.oakestra.orchestrator import ClusterState, Orchestrator

    port = 18080
    with L.Lab() as lab:
        lab.start_services()
        state = ClusterState(internal_ipv4=lab.internal_v4, internal_ipv6=lab.internal_v6)

        def cluster():
            return Orchestrator(state, port=port, enter=lambda: lab.inside("gateway"))

        daemon = L.lab_daemon(lab, standalone=False, token=False, overrides={"oakestra": {
            "cluster_url": f"http://127.0.0.1:{port}", "give_up_after": 20,
            "backoff_max": 0.5}})
        with cluster().running():
            daemon.start()
            assert state.ready_event.wait(10), daemon.log_tail()
            token = (daemon.dir / "api-token").read_text().strip()
            for body in (ex(8080, L.SERVICE_V4), ex(8080, L.SERVICE_V6)):
                status, answer = daemon.request("POST", "/api/service/exposure/add", body,
                                                token=token)
                assert status == 201, answer
            assert daemon.stop() == 0
        # A reboot while the cluster is down: the kernel lost our table and our bridge.
        lab.run("gateway", "nft", "delete", "table", "inet", "oakestra_gw")
        lab.run("gateway", "ip", "link", "del", "oakgw0")
        with pytest.raises(OSError):
            L.http_get(lab, "client", L.GATEWAY_V4, 8080, "/whoami", timeout=1)
        started = time.monotonic()
        daemon.start(wait=False)

        def served():
            try:
                return L.http_get(lab, "client", L.GATEWAY_V4, 8080, "/whoami", timeout=0.5)
            except OSError:
                return None

        status, body = wait_for(served, timeout=10, interval=0.05, what="traffic after boot",
                                log=daemon.log_tail)
        elapsed = time.monotonic() - started
        assert status == 200 and json.loads(body)["peer"] == L.INTERNAL_V4
        assert L.http_get(lab, "client", L.GATEWAY_V6, 8080, "/whoami")[0] == 200
        daemon.wait_serving(10)
        assert daemon.request("GET", "/api/service/exposure", token=token)[0] == 200
        wait_for(lambda: "re-register" in daemon.log_tail(100), timeout=5,
                 what="a re-registration attempt", log=daemon.log_tail)
        assert len(state.ready) == 1, "the cluster was reached while it was down?"
        report("orchestrator down at boot", first_packet_after=f"{elapsed:.2f}s")
        # The cluster comes back: the gateway re-registers under its id, traffic never stopped.
        with cluster().running():
            assert wait_for(lambda: len(state.ready) == 2, timeout=15, what="ready again",
                            log=daemon.log_tail)
            assert state.ready[-1][0] == state.ready[0][0]
        assert daemon.stop() == 0


# -- a damaged store at start -----------------------------------------------------------------

def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.endswith(".lock")}


def store_check(gw) -> subprocess.CompletedProcess:
    return subprocess.run([*gw_command(), "store", "check", "--config", str(gw.config_path)],
                          capture_output=True, text=True, timeout=60)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


SNAP, BAK, SEGMENT, JOURNAL = ("exposures.json", "exposures.json.bak",
                                "exposures.json.journal.000000000002", "exposures.json.journal")
A, B, C, D = (doc(p) for p in (8001, 8002, 8003, 8004))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# name: (damage(state dir), words of the message, the file it must name, what the documented
# recovery brings back)
DAMAGE = {
    "snapshot-garbage": (lambda s: (s / SNAP).write_text("{not json"),
                         "not a valid JSON document", SNAP, {A, B, C, D}),
    "snapshot-truncated": (lambda s: truncate(s / SNAP, 100), "not a valid JSON document", SNAP,
                           {A, B, C, D}),
    "snapshot-emptied": (lambda s: truncate(s / SNAP, 0), "is empty, but the store was "
                         "compacted before", SNAP, {A, B, C, D}),
    "snapshot-deleted": (lambda s: (s / SNAP).unlink(), "is missing, but the store was "
                         "compacted before", SNAP, {A, B, C, D}),
    "snapshot-not-tinydb": (lambda s: (s / SNAP).write_text("[1, 2]"), "not a TinyDB database",
                            SNAP, {A, B, C, D}),
    "journal-bit-flip": (lambda s: flip(s / JOURNAL, 12), "checksum mismatch", JOURNAL, {A, B}),
    "journal-record-lost": (lambda s: (s / JOURNAL).write_bytes(
        (s / JOURNAL).read_bytes().split(b"\n", 1)[1]), "records are missing", JOURNAL, {A, B}),
    "segment-truncated": (lambda s: truncate(s / SEGMENT, 20), "incomplete record", SEGMENT,
                          {A, B}),
}


@pytest.fixture(scope="module")
def damaged_store_template(tmp_path_factory):
    """The files of a store as the daemon leaves them: the .bak (A), the snapshot (A, B), the
    journal segment kept since the .bak (B), and the current journal (C, D) of a daemon that
    was killed -9."""
    work = tmp_path_factory.mktemp("template")
    with gateway(work / "gw") as gw:
        for ports in ((8001,), (8002,)):
            gw.start()
            for port in ports:
                assert gw.http().add(ex(port)).status == 201
            assert gw.stop() == 0
        gw.start()
        assert gw.http().add(ex(8003)).status == 201
        assert gw.http().add(ex(8004)).status == 201
        kill(gw)
        reap_orphans(gw)
        names = sorted(files(gw.store_dir))
        assert names == [SNAP, BAK, JOURNAL, SEGMENT], names
        return files(gw.store_dir)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_stops_the_start_and_changes_nothing(tmp_path, damaged_store_template,
                                                              damage):
    hurt, words, named, want = DAMAGE[damage]
    with gateway(tmp_path / "gw") as gw:
        gw.store_dir.mkdir(parents=True)
        for name, data in damaged_store_template.items():
            (gw.store_dir / name).write_bytes(data)
        # The table of the previous run is still in the kernel: traffic flows meanwhile.
        gw.start()
        assert gw.kernel_docs() == {A, B, C, D}
        kill(gw)
        reap_orphans(gw)
        hurt(gw.store_dir)
        before, kernel = files(gw.store_dir), gw.kernel_docs()
        gw.start(wait=False)
        assert gw.proc.wait(timeout=30) == 1
        reap_orphans(gw)
        log = gw.log(since_start=True)
        line = [ln for ln in log.splitlines() if ln.startswith("oakestra-gw: cannot start:")]
        assert line, log
        assert f"{gw.store_dir / named}: " in line[0] and words in line[0], line[0]
        assert "no file was changed" in line[0]
        assert files(gw.store_dir) == before, "a damaged store file was changed"
        assert gw.kernel_docs() == kernel, "the kernel changed although the start failed"
        # store check: the same diagnosis, exit 1, nothing changed.
        check = store_check(gw)
        assert check.returncode == 1, check
        assert f"{gw.store_dir / named}: " in check.stderr and words in check.stderr, check
        assert files(gw.store_dir) == before
        # The documented recovery (docs/cli.md, "store check"), step by step.
        aside = tmp_path / "aside"
        aside.mkdir()
        if named == SNAP:
            # "move it aside and copy exposures.json.bak in its place"
            if (gw.store_dir / SNAP).exists():
                shutil.move(gw.store_dir / SNAP, aside / SNAP)
            shutil.copy2(gw.store_dir / BAK, gw.store_dir / SNAP)
        else:
            # "move that journal and every later one aside"
            later = {SEGMENT: [SEGMENT, JOURNAL], JOURNAL: [JOURNAL]}[named]
            for name in later:
                shutil.move(gw.store_dir / name, aside / name)
            if named == SEGMENT:
                # The segment was what the .bak needs: `store check` now says the fallback no
                # longer gives the snapshot's state. The snapshot is whole; the stale .bak goes
                # aside too (docs/reliability.md; docs/cli.md does not say it yet).
                check = store_check(gw)
                assert check.returncode == 1 and f"the fallback {gw.store_dir / BAK}" in \
                    check.stderr, check
                shutil.move(gw.store_dir / BAK, aside / BAK)
        check = store_check(gw)
        assert check.returncode == 0, check
        gw.start()
        assert docs_set(gw.http().list()) == gw.kernel_docs() == want
        assert gw.stop() == 0


def test_a_torn_last_record_of_the_current_journal_is_dropped(tmp_path):
    """Not damage: what a crash in the middle of an append leaves. The daemon starts without
    the torn record (which was never acknowledged: the answer follows the fsync)."""
    with gateway(tmp_path / "gw") as gw:
        gw.start()
        assert gw.http().add(ex(8001)).status == 201
        assert gw.http().add(ex(8002)).status == 201
        kill(gw)
        reap_orphans(gw)
        journal = gw.store_dir / "exposures.json.journal"
        data = journal.read_bytes()
        journal.write_bytes(data[:-10])  # the last record, torn
        gw.start()
        assert docs_set(gw.http().list()) == gw.kernel_docs() == {doc(8001)}
        assert gw.http().add(ex(8003)).status == 201
        assert gw.stop() == 0
        assert stored_docs(gw.store_dir / "exposures.json") == {doc(8001), doc(8003)}


def test_a_refused_change_whose_revert_fails_never_reaches_the_kernel(tmp_path):
    """Issue 12, 8(b): the kernel refuses an add and the store cannot take the revert either
    (a fault hook at the adapter edge: the 2nd kernel commit is refused, the store's next
    journal write fails with EROFS). The add answers 503; the next change must not push the
    refused exposure into the kernel, and it is gone from the store too."""
    with gateway(tmp_path / "gw", drift_watch=False) as gw:
        gw.start(env={"OAKESTRA_GW_TEST_CRASH": "refuse-then-store-fails:2"})
        api = gw.http()
        assert api.add(ex(8001)).status == 201
        r = api.add(ex(8002))
        assert r.status == 503, r
        assert gw.kernel_docs() == {doc(8001)}
        # The store works again; the next change does not carry the refused one along.
        assert api.add(ex(8003)).status == 201
        assert gw.kernel_docs() == {doc(8001), doc(8003)}, "the refused add reached the kernel"
        assert docs_set(api.list()) == {doc(8001), doc(8003)}
        assert gw.stop() == 0
        assert stored_docs(Path(gw.config["store"]["path"])) == {doc(8001), doc(8003)}


@contextlib.contextmanager
def daemon_on_ext4(tmp_path: Path, crash: str):
    """The daemon started with the fault point `crash`, its store on an ext4 file system
    (tests/fs.Ext4, loop-mounted in a private mount namespace); yields (fs, daemon, store
    path). The daemon is stopped, then the file system unmounted, at the end."""
    require_tools("mkfs.ext4", "losetup")
    with mount_namespace() as mns:
        fs = Ext4(mns, tmp_path)
        fs.mount()
        try:
            path = fs.path / "state" / "exposures.json"
            with gateway(tmp_path / "gw", drift_watch=False,
                         config={"store": {"path": str(path)}}) as gw:
                gw.start(env={"OAKESTRA_GW_TEST_CRASH": crash})
                yield fs, gw, path
        finally:
            fs.unmount()


def test_a_dead_ext4_under_a_refused_change_keeps_it_out_of_the_running_kernel(tmp_path):
    """Issue 12, 8(b) with a real file system: the state directory is on ext4, and when the
    2nd kernel commit comes the file system is shut down (power loss as ext4 sees it), then
    that commit is refused; the revert's journal write fails with ext4's own EIO. The add's
    record was made durable before the refusal, so the documented window applies: the
    running daemon never loads the refused exposure and takes no change while the undo is
    pending; a start finds it in the store and loads it (docs/api.md)."""
    with daemon_on_ext4(tmp_path, "refuse-then-shutdown:2") as (fs, gw, path):
        api = gw.http()
        assert api.add(ex(8001)).status == 201
        r = api.add(ex(8002))
        assert r.status == 503 and r.json["error"] == "kernel_refused", r
        assert gw.kernel_docs() == {doc(8001)}
        r = api.add(ex(8003))
        assert r.status == 503 and r.json["error"] == "store_unavailable", r
        assert "Input/output error" in r.json["message"], r
        assert "test only" not in r.json["message"], "the error must be ext4's, not a hook's"
        ready = api.get("/api/ready")
        assert ready.status == 503 and "could not revert a refused change" in \
            ready.json["reasons"]["store"], ready
        assert gw.kernel_docs() == {doc(8001)}, "the refused add reached the kernel"
        assert docs_set(api.list()) == {doc(8001)}, "the list shows the refused add"
        # A reconcile while the undo is pending (our table gone, SIGHUP) loads the store
        # less the refused change.
        gw.nft("delete", "table", "inet", "oakestra_gw")
        gw.send(signal.SIGHUP)
        wait_for(lambda: gw.kernel() is not None, what="the reconcile", log=gw.log)
        assert gw.kernel_docs() == {doc(8001)}, "the reconcile loaded the refused add"
        assert gw.proc.poll() is None  # not poisoned: it stays up, answering 503
        gw.stop()
        fs.remount()  # ext4 replays its own journal: what was durable before the shutdown
        gw.start()
        kernel = gw.kernel_docs()
        assert kernel == docs_set(api.list()) and doc(8001) in kernel, kernel
        # 8002's record was fdatasync'd before the refusal and its undo never reached the
        # disk: the restart in the window docs/api.md names finds it and loads it.
        assert kernel == {doc(8001), doc(8002)}, kernel
        assert gw.stop() == 0
        assert stored_docs(path) == kernel


def test_a_change_whose_sync_and_cut_fail_on_a_dead_ext4_stops_the_daemon(tmp_path):
    """Issue 12, 8(a) with a real file system: the state directory is on ext4, and right
    before the 2nd journal fdatasync (the record is written) the file system is shut down;
    the real fdatasync fails (EIO) and so does the truncate that would take the record back.
    The store is poisoned: the add and every further change answer 503, the daemon exits 1
    for systemd to restart it; after a remount (ext4's journal recovered) the start holds
    the acknowledged add in the store and the kernel, and not the unacknowledged one (it was
    never made durable: lost with the power)."""
    with daemon_on_ext4(tmp_path, "shutdown-before-sync:2") as (fs, gw, path):
        api = gw.http()
        assert api.add(ex(8000)).status == 201
        r = api.add(ex(8001))
        assert r.status == 503 and r.json["error"] == "store_unavailable", r
        assert "Input/output error" in r.json["message"], r
        assert "test only" not in r.json["message"], "the error must be ext4's, not a hook's"
        r = api.add(ex(8002))
        assert r.status == 503, f"the daemon took a change with a store that disagrees: {r}"
        assert "could not take back a record" in r.json["message"], r
        assert "(EIO)" in r.json["message"], r
        ready = api.get("/api/ready")
        assert ready.status == 503 and "could not take back a record" in \
            ready.json["reasons"]["store"], ready
        assert gw.kernel_docs() == {doc(8000)}
        assert gw.proc.wait(timeout=20) == 1, "the daemon must exit for systemd to restart it"
        fs.remount()
        gw.start()
        kernel = gw.kernel_docs()
        assert kernel == docs_set(api.list()) == {doc(8000)}, kernel
        assert gw.stop() == 0
        assert stored_docs(path) == kernel


def test_a_stored_exposure_to_the_new_own_address_is_not_loaded(tmp_path):
    """Issue 12, item 6: the gateway's internal address changed between two starts (the
    cluster handed out another one) and a stored exposure now points at the gateway itself.
    The start does not load it (that would DNAT public traffic to the gateway's own services):
    a log line and `oakestra_gw_exposures_refused_own` say so; the others are loaded."""
    with gateway(tmp_path / "gw", drift_watch=False) as gw:
        gw.start()
        api = gw.http()
        assert api.add(ex(8001, "10.30.0.7")).status == 201
        assert api.add(ex(8002, "10.30.0.8")).status == 201
        assert gw.stop() == 0
        gw.config["network"]["internal_ipv4"] = "10.30.0.7"
        gw.write_config()
        gw.start()
        assert gw.kernel_docs() == {doc(8002, "10.30.0.8")}
        assert "points at the gateway's own internal address 10.30.0.7" in gw.log(), gw.log()
        assert metric(api.get("/metrics").body.decode(), "oakestra_gw_exposures_refused_own") == 1
        # The store keeps it (the operator deletes it); the list says what is stored.
        assert docs_set(api.list()) == {doc(8001, "10.30.0.7"), doc(8002, "10.30.0.8")}
        assert gw.stop() == 0


def test_a_record_the_store_could_neither_sync_nor_cut_stops_the_daemon(tmp_path):
    """Issue 12, 8(a): the journal write of an add succeeds, its fdatasync fails (EIO) and the
    truncate that should take it back fails too (EROFS), as when the file system goes
    read-only between the two (a fault hook at exactly those two calls: a real file system
    refuses the write first). The record stays in the journal and is replayed at the next
    open, so the store no longer matches the running daemon. The daemon must refuse every
    further change (503 naming the cause) and exit non-zero for systemd to restart it; after
    the restart the kernel holds what the store holds."""
    with gateway(tmp_path / "gw", drift_watch=False) as gw:
        gw.start(env={"OAKESTRA_GW_TEST_CRASH": "sync-then-cut-fails:1"})
        api = gw.http()
        r = api.add(ex(8001))
        assert r.status == 503 and r.json["error"] == "store_unavailable", r
        r = api.add(ex(8002))
        assert r.status == 503, f"the daemon took a change with a store that disagrees: {r}"
        assert "could not take back a record" in r.json["message"], r
        ready = api.get("/api/ready")
        assert ready.status == 503 and "could not take back a record" in \
            ready.json["reasons"]["store"], ready
        assert gw.proc.wait(timeout=20) == 1, "the daemon must exit for systemd to restart it"
        gw.start()
        kernel = gw.kernel_docs()
        # The 503'd add may come back (its record was replayed): "not acknowledged".
        assert kernel == docs_set(api.list()) and kernel <= {doc(8001)}, kernel
        assert gw.stop() == 0
        assert stored_docs(Path(gw.config["store"]["path"])) == kernel
