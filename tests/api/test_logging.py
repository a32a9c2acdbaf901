"""`[log]`: the level and the JSON-lines format, on a real daemon; the audit record's fields
as JSON keys of their own."""

from __future__ import annotations

import json
import signal

import pytest

from tests.api.harness import running
from tests.helpers import ex, wait_for

pytestmark = [pytest.mark.kernel]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_lines_with_structured_audit(tmp_path):
    with running(tmp_path / "gw", drift_watch=False,
                 config={"log": {"format": "json"}}) as gw:
        api = gw.http()
        assert api.add(ex(8080)).status == 201
        assert api.add(ex(8080, "10.30.0.9")).status == 409

        def audits():
            return [r for r in json_lines(gw.log()) if r["logger"] == "gw.audit"]

        records = wait_for(lambda: len(audits()) >= 2 and audits(), 10, "two audit records")
        lines = gw.log().splitlines()
        assert all(line.startswith("{") for line in lines if line.strip()), lines[:5]
        first, second = records
        assert first["who"] == "127.0.0.1" and first["level"] == "info"
        assert first["what"] == "add 8080/tcp -> 10.30.0.1:80"
        assert first["result"] == "201 1 created"
        assert second["result"] == "409 conflict field=exposed_port"
        assert first["time"].endswith("Z")


def test_level_applies_at_start_and_on_reload(tmp_path):
    with running(tmp_path / "gw", drift_watch=False,
                 config={"log": {"level": "warning"}}) as gw:
        api = gw.http()
        assert api.add(ex(8080)).status == 201
        assert "gw.audit" not in gw.log() and "INFO" not in gw.log()
        gw.config["log"]["level"] = "info"
        gw.write_config()
        gw.send(signal.SIGHUP)
        wait_for(lambda: "reload: applied log.level" in gw.log(), 30, "the reload")
        assert api.delete({"exposed_port": 8080}).status == 200
        wait_for(lambda: "INFO gw.audit: who=127.0.0.1 what=\"delete 8080/tcp" in gw.log(),
                 10, "the audit line at level info")


def test_bad_level_is_a_config_error_naming_the_key(tmp_path):
    from gw.core.config import parse_config
    from gw.core.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_config({"log": {"level": "verbose"}})
    assert exc.value.field == "log.level"
    with pytest.raises(ConfigError) as exc:
        parse_config({"log": {"format": "xml"}})
    assert exc.value.field == "log.format"
