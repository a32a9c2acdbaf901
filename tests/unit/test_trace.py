"""The per-request trace: phases between marks, and only slow requests logged."""

import logging

from gw.service import trace


def test_phases_are_the_time_since_the_mark_before():
    marks = [("start", 1.0), ("parse", 1.25), ("store", 1.5), ("response", 2.5)]
    assert trace.phases(marks) == [("parse", 0.25), ("store", 0.25), ("response", 1.0)]
    assert trace.render("POST /x 201", marks) == (
        "POST /x 201 1500.00 ms: parse 250.00, store 250.00, response 1000.00")


def test_only_a_request_over_the_threshold_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="gw.trace")
    trace.begin()
    trace.mark("parse")
    assert trace.end("fast", threshold=60) < 60
    trace.begin()
    trace.mark("store")
    assert trace.end("slow", threshold=0) >= 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("slow request: slow ")
    assert "store" in lines[0] and "response" in lines[0]


def test_marks_outside_a_trace_do_nothing():
    assert trace.end("none") is None
    trace.mark("store")  # no trace: no error, nothing kept
    assert trace.end("none") is None
