"""A requested JSON answer (`response_format` json_object or json_schema), checked: valid JSON, and valid against
the schema (JSON Schema Draft 2020-12). Pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson
import referencing
import referencing.exceptions
from referencing.jsonschema import DRAFT202012


@dataclass(frozen=True, slots=True)
class Problem:
    """Why an answer is not the JSON asked for."""

    detail: str  # with the offending value: for the concluding LLM's correction and the client's error
    summary: str  # where, and which rule, without the answer's content: for the log and the usage records


def problem(form: dict[str, Any], answer: str) -> Problem | None:
    """Why `answer` is not what `form` asks for, or None when it is."""
    try:
        value = orjson.loads(answer)
    except orjson.JSONDecodeError as exc:
        return Problem(f"the answer is not valid JSON ({exc})", "not valid JSON")
    if form.get("type") == "json_object":
        return None if isinstance(value, dict) else Problem("the answer is not a JSON object", "not a JSON object")
    schema = (form.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        return None
    validator = jsonschema.Draft202012Validator(schema)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except (jsonschema.exceptions.SchemaError, jsonschema.exceptions.UnknownType, referencing.exceptions.Unresolvable):
        # schema_problem refused such schemas up front; should one slip through, the answer cannot be checked
        return Problem("the response schema cannot be applied", "schema cannot be applied")
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    return Problem(f"at {where}: {error.message}", f"at {where}: fails '{error.validator}'")


def correction(form: dict[str, Any], answer: str, why: str) -> list[dict[str, Any]]:
    """What the concluding LLM is told after an answer that is not the JSON asked for: its answer, then why."""
    shape = "a JSON object" if form.get("type") == "json_object" else "JSON valid against the response schema"
    return [
        {"role": "assistant", "content": answer},
        {
            "role": "user",
            "content": f"That answer is not {shape}: {why}. Answer again with only the corrected JSON, nothing else.",
        },
    ]


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why a client's response schema cannot be used, or None: it must be a valid Draft 2020-12 schema whose
    every `$ref` points inside itself (`#...`, as OpenAI's structured outputs take them); nothing is fetched."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        return f"at {where}: {exc.message}"
    resource = DRAFT202012.create_resource(schema)
    base = resource.id() or ""
    root = referencing.Registry().with_resource(base, resource).resolver(base)
    for ref in _refs(schema):
        if not ref.startswith("#"):
            return f"'$ref' {ref!r} points outside the schema: only local references ('#/$defs/...') are supported"
        try:
            root.lookup(ref)
        except referencing.exceptions.Unresolvable:
            return f"'$ref' {ref!r} does not resolve within the schema"
    return None


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            found += _refs(value)
        return found
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []
