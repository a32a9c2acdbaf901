"""docs/configuration.md against the code: the table and the complete example name every key
the daemon knows, the example holds the defaults, and "live on reload" is what a reload does."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from gw.core.config import SECTIONS, parse_config
from gw.daemon.reload import LIVE

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
ALL_KEYS = {f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys}


def example_text() -> str:
    block = re.search(r"```toml\n(.*?)```", PAGE.read_text(), re.S)
    assert block, "no toml example"
    return block[1]


def example() -> dict:
    return tomllib.loads(example_text())


def commented_keys() -> set[str]:
    """Keys shown as `# key = value` (a default with no TOML spelling, e.g. "by mode")."""
    keys, section = set(), None
    for line in example_text().splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = m[1]
        elif m := re.match(r"# (\w+) = ", line):
            keys.add(f"{section}.{m[1]}")
    return keys


def table() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| [^|]+ \| (yes|no) \|", PAGE.read_text(),
                      re.M)
    return dict(rows)


def test_the_example_names_every_key():
    doc = example()
    assert {f"{s}.{k}" for s, keys in doc.items() for k in keys} | commented_keys() == ALL_KEYS


def test_the_example_is_the_defaults_plus_the_internal_addresses():
    doc = example()
    internal = {k: doc["network"][k] for k in ("internal_ipv4", "internal_ipv6")}
    assert parse_config(doc) == parse_config({"network": internal})


def test_the_table_names_every_key_and_what_a_reload_applies():
    rows = table()
    assert set(rows) == ALL_KEYS
    assert {key for key, live in rows.items() if live == "yes"} == LIVE


def test_restart_needed_names_the_keys_of_the_file():
    """What `restart_needed` reports is a key an operator finds in gateway.toml and in the table
    above, also where the setting is held under another name (cluster_url as a list)."""
    from gw.daemon.reload import restart_needed

    base = {"network": {"internal_ipv4": "10.30.255.1", "internal_ipv6": "fdff::1"}}
    started = parse_config({**base, "oakestra": {"cluster_url": "http://10.30.0.1:10100"}})
    now = parse_config({**base, "oakestra": {"cluster_url": "http://10.30.0.2:10100"}})
    assert restart_needed(started, now) == ["oakestra.cluster_url"]
    # Every setting a reload compares is reported under a key of the file.
    from gw.daemon.reload import FIELD_KEYS, SETTINGS_SECTIONS

    fields = {f"{section}.{name}" for section in SETTINGS_SECTIONS
              for name in getattr(started, section).__dataclass_fields__}
    assert {FIELD_KEYS.get(f, f) for f in fields} == ALL_KEYS
