"""The gateway's not-ready causes: set, cleared, read as a copy from any thread."""

import threading

from gw.service.health import Health


def test_set_clear_and_snapshot():
    h = Health()
    assert h.snapshot() == {}
    h.set("store", "could not revert")
    h.set("firewall", "the last change failed")
    h.set("store", "poisoned")  # a later reason replaces the earlier one
    snap = h.snapshot()
    assert snap == {"store": "poisoned", "firewall": "the last change failed"}
    h.clear("store", "drift")  # drift is absent: ignored
    assert "store" not in h and "firewall" in h
    assert snap == {"store": "poisoned", "firewall": "the last change failed"}  # a copy


def test_writers_and_readers_in_threads_never_see_a_torn_dict():
    h, errors = Health(), []

    def writer(cause):
        for i in range(2000):
            h.set(cause, str(i))
            h.clear(cause)

    def reader():
        for _ in range(2000):
            try:
                for cause, reason in h.snapshot().items():
                    assert cause.startswith("c") and reason.isdigit()
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"c{n}",)) for n in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and h.snapshot() == {}
