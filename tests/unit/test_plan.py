"""The plan: each provider family's shapes of the conversation made once, and serialized once, per request."""

from __future__ import annotations

from typing import Any

import orjson

from mom_service.config import parse_config
from mom_service.engine.planning import make_plan

CONFIG = parse_config(
    {
        "llm_definitions": [
            {"name": "a", "model": "openai/a", "api_base": "http://x/v1"},
            {"name": "b", "model": "openai/b", "api_base": "http://y/v1"},
            {"name": "c", "model": "anthropic/claude-sonnet-4-5"},
            {"name": "d", "model": "anthropic/claude-haiku-4-5"},
            {"name": "j", "model": "openai/j", "api_base": "http://z/v1"},
        ],
        "models": [{"name": "mom", "llms_to_query": ["a", "b", "c", "d"], "concluding_llm": "j"}],
    },
    "<test>",
)
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
]


def plan() -> Any:
    return make_plan(
        CONFIG,
        CONFIG.models[0],
        CONVERSATION,
        {},
        vision={d.name: False for d in CONFIG.llm_definitions},
        has_images=False,
        request_id="r",
        stream=False,
    )


def test_members_of_one_family_share_one_conversation_serialized_once() -> None:
    a, b, c, d = plan().members
    assert a.messages is b.messages and a.encoded is b.encoded  # both `compatible` servers: one copy, one encoding
    assert c.messages is d.messages and c.encoded is d.encoded  # both anthropic
    assert a.encoded is not c.encoded
    for member in (a, c):
        assert member.encoded == orjson.dumps(member.messages, option=orjson.OPT_SORT_KEYS)


def test_the_concluding_llm_reuses_its_familys_shapes() -> None:
    made = plan()
    (concluder,) = made.concluders
    assert list(concluder.conversation) == made.members[0].messages
