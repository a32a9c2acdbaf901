"""The checked-in OpenAPI document (docs/openapi.json) and its rendering as a page of the site
(docs/api-reference.md), both made from gw.openapi.document(). Regenerate them after changing
the API with

    .venv/bin/python -m tests.docs.render_openapi --write

tests/docs/test_openapi_page.py fails while either differs from what this makes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gw.daemon.openapi import document

DOCS = Path(__file__).resolve().parents[2] / "docs"
JSON_PATH, PAGE_PATH = DOCS / "openapi.json", DOCS / "api-reference.md"


def as_json() -> str:
    return json.dumps(document(auth=True), indent=2) + "\n"


def _type(schema: dict) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    if "oneOf" in schema:
        return " or ".join(_type(s) for s in schema["oneOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return f"{kind}: " + ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    bounds = [f"{k} {schema[k]}" for k in ("minimum", "maximum") if k in schema]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def as_markdown() -> str:
    doc = document(auth=True)
    out = ["# API reference", "",
           "Rendered from the OpenAPI document the daemon serves at `/api/openapi.json`; the "
           "same document is checked in as [openapi.json](openapi.json). "
           "[Management API](api.md) explains the API in prose.", "",
           _cell(doc["info"]["description"]), ""]
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            out += [f"## {method.upper()} {path}", "", f"**{op['summary']}.** "
                    + _cell(op["description"]), ""]
            if op.get("security") == []:
                out += ["No token needed.", ""]
            if op.get("parameters"):
                out += ["| query parameter | type | meaning |", "|---|---|---|"]
                out += [f"| `{p['name']}` | {_type(p['schema'])} | {_cell(p['description'])} |"
                        for p in op["parameters"]]
                out.append("")
            if "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                out += [f"Body: {_type(schema)}", ""]
            out += ["| status | answer |", "|---|---|"]
            for status, resp in op["responses"].items():
                content = resp.get("content", {})
                schema = next(iter(content.values()), {}).get("schema")
                shape = f" ({_type(schema)})" if schema else ""
                out.append(f"| {status} | {_cell(resp['description'])}{shape} |")
            out.append("")
    out += ["## Schemas", ""]
    for name, schema in doc["components"]["schemas"].items():
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [_cell(schema["description"]), ""]
        props = schema.get("properties", {})
        if props:
            required = set(schema.get("required", []))
            out += ["| field | type | required | meaning |", "|---|---|---|---|"]
            out += [f"| `{field}` | {_type(p)} | {'yes' if field in required else 'no'} | "
                    f"{_cell(p.get('description', ''))} |" for field, p in props.items()]
            out.append("")
        if "example" in schema:
            out += ["Example:", "", "```json", json.dumps(schema["example"], indent=2), "```",
                    ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(f"usage: {sys.argv[0]} --write")
    JSON_PATH.write_text(as_json())
    PAGE_PATH.write_text(as_markdown())
    print(f"wrote {JSON_PATH} and {PAGE_PATH}")
