"""A requested JSON answer checked (engine/structured.py): JSON for json_object, Draft 2020-12 for json_schema; a
client's schema that cannot be used is refused up front."""

from __future__ import annotations

from typing import Any

import pytest

from mom_service.engine.structured import Problem, correction, problem, schema_problem

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}},
}


def schema_form(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def detail(form: dict[str, Any], answer: str) -> str | None:
    found = problem(form, answer)
    return found.detail if found is not None else None


def test_json_object_wants_an_object() -> None:
    form = {"type": "json_object"}
    assert problem(form, '{"a": 1}') is None
    assert problem(form, "[1, 2]") == Problem("the answer is not a JSON object", "not a JSON object")
    invalid = problem(form, "Sure! {")
    assert invalid is not None and invalid.detail.startswith("the answer is not valid JSON")
    assert invalid.summary == "not valid JSON"


def test_json_schema_names_where_the_answer_is_wrong() -> None:
    form = schema_form(PERSON)
    assert problem(form, '{"name": "Ada", "age": 36, "pets": [{"kind": "cat"}]}') is None
    assert detail(form, '{"name": "Ada", "age": -1}') == "at age: -1 is less than the minimum of 0"
    assert detail(form, '{"name": "Ada", "age": 3, "pets": [{"kind": "fish"}]}') == (
        "at pets/0/kind: 'fish' is not one of ['cat', 'dog']"
    )
    assert detail(form, '{"name": "Ada"}') == "at the top level: 'age' is a required property"
    assert "Additional properties" in (detail(form, '{"name": "A", "age": 1, "x": 0}') or "")


def test_the_summary_says_where_and_which_rule_but_not_the_answer() -> None:
    """The summary goes to the log and the usage records: no part of the answer's content."""
    found = problem(schema_form(PERSON), '{"name": "Ada", "age": 3, "pets": [{"kind": "secret-fish"}]}')
    assert found is not None and "secret-fish" in found.detail
    assert found.summary == "at pets/0/kind: fails 'enum'"


def test_draft_2020_12_keywords_apply() -> None:
    tuple_form = schema_form({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]})
    assert problem(tuple_form, '["a", 1]') is None
    assert detail(tuple_form, '["a", "b"]') == "at 1: 'b' is not of type 'integer'"


def test_the_correction_shows_the_answer_then_why() -> None:
    follow = correction(schema_form(PERSON), '{"name": 1}', "at name: 1 is not of type 'string'")
    assert follow[0] == {"role": "assistant", "content": '{"name": 1}'}
    assert follow[1]["role"] == "user" and "at name: 1 is not of type 'string'" in follow[1]["content"]


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "foo"}, "at type: 'foo' is not valid under any of the given schemas"),
        ({"type": "object", "required": "name"}, "at required: 'name' is not of type 'array'"),
        (
            {"$ref": "https://example.com/person.json"},
            "'$ref' 'https://example.com/person.json' points outside the schema: only local references "
            "('#/$defs/...') are supported",
        ),
        (
            {"properties": {"a": {"$ref": "#/$defs/missing"}}},
            "'$ref' '#/$defs/missing' does not resolve within the schema",
        ),
    ],
)
def test_a_schema_that_cannot_be_used_is_named(schema: dict[str, Any], why: str) -> None:
    assert schema_problem(schema) == why


def test_usable_schemas_pass_recursion_and_defs_included() -> None:
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    assert schema_problem(tree) is None
    assert schema_problem(PERSON) is None
    assert schema_problem({"$id": "https://example.com/p", **PERSON}) is None
