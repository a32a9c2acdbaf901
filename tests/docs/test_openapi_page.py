"""docs/openapi.json and docs/api-reference.md are the document the daemon serves."""

from __future__ import annotations

from tests.docs.render_openapi import JSON_PATH, PAGE_PATH, as_json, as_markdown

HOW = "regenerate with: .venv/bin/python -m tests.docs.render_openapi --write"


def test_checked_in_document_is_the_served_one():
    assert JSON_PATH.read_text() == as_json(), HOW


def test_rendered_page_is_up_to_date():
    page = PAGE_PATH.read_text()
    assert page == as_markdown(), HOW
    for route in ("GET /api/service/exposure", "GET /api/status", "POST /api/service/exposure/add"):
        assert f"## {route}\n" in page
