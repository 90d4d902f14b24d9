"""Validate bodies against OpenAI's own published schemas (subsets vendored in openai_schemas.json: Chat Completions,
models, errors; and openai_responses_schemas.json: the Responses API's response, stream events and item list)."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

_SCHEMAS = (Path(__file__).with_name("openai_schemas.json"), Path(__file__).with_name("openai_responses_schemas.json"))


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
    schemas: dict[str, Any] = {}
    for path in _SCHEMAS:
        schemas |= json.loads(path.read_text())["components"]["schemas"]
    return {"components": _nullable_to_any_of({"schemas": schemas})}


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError when `instance` is not a valid OpenAI `schema_name`."""
    document = copy.copy(_document())
    document["$ref"] = f"#/components/schemas/{schema_name}"
    jsonschema.Draft202012Validator(document).validate(instance)
