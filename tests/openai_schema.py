"""Validate bodies against OpenAI's own published schemas (a subset vendored in openai_schemas.json)."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

_SCHEMAS = Path(__file__).with_name("openai_schemas.json")


def _nullable_to_any_of(node: Any) -> Any:
    """The document marks nullable fields with the OpenAPI 3.0 keyword, which Draft 2020-12 ignores."""
    if isinstance(node, dict):
        node = {k: _nullable_to_any_of(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable_to_any_of(v) for v in node]
    return node


@cache
def _document() -> dict[str, Any]:
    raw = json.loads(_SCHEMAS.read_text())
    return {"components": _nullable_to_any_of(raw["components"])}


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError when `instance` is not a valid OpenAI `schema_name`."""
    document = copy.copy(_document())
    document["$ref"] = f"#/components/schemas/{schema_name}"
    jsonschema.Draft202012Validator(document).validate(instance)
