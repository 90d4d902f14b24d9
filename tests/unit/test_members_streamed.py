"""When members are called streaming (`stream_members`): as the MoM model or the request says; auto: when their
text is used as they write it."""

from __future__ import annotations

from typing import Any

import pytest

from mom_service.config import parse_config
from mom_service.engine.planning import make_plan
from mom_service.engine.steering import steer


def _streamed(mom: dict[str, Any], stream: bool, controls: dict[str, Any] | None = None) -> bool:
    config = parse_config(
        {
            "llm_definitions": [{"name": n, "model": f"openai/{n}", "api_base": "http://x"} for n in ("a", "b", "j")],
            "models": [{"name": "mom", "llms_to_query": ["a", "b"], "concluding_llm": "j", **mom}],
        },
        "<test>",
    )
    model = config.models[0]
    messages = [{"role": "user", "content": "hi"}]
    steered, messages, steering = steer(config, model, controls, messages)
    plan = make_plan(
        config,
        steered,
        messages,
        {},
        vision=dict.fromkeys(("a", "b", "j"), False),
        has_images=False,
        request_id="r",
        stream=stream,
        steering=steering,
    )
    return plan.members_streamed


@pytest.mark.parametrize(
    ("mom", "stream", "expected"),
    [
        ({}, True, False),  # nobody reads their text as it comes
        ({"include_thinking_context": True}, True, False),  # think_tags: one block per member, when it ends
        ({"include_thinking_context": True, "thinking_format": "reasoning_content"}, True, True),
        ({"include_thinking_context": True, "thinking_format": "reasoning_content"}, False, False),
        ({"partial_answers": True}, False, False),  # nothing can cut a member off
        ({"partial_answers": True, "quorum": 1}, False, True),
        ({"partial_answers": True, "member_deadline_ms": 500}, False, True),
        ({"stream_members": "on"}, False, True),
        ({"stream_members": "off", "partial_answers": True, "quorum": 1}, True, False),
    ],
)
def test_auto_streams_members_whose_text_is_used_live(mom: dict[str, Any], stream: bool, expected: bool) -> None:
    assert _streamed(mom, stream) is expected


def test_the_request_turns_it_on_or_off() -> None:
    assert _streamed({}, True, {"stream_members": "on"}) is True
    assert _streamed({"stream_members": "on"}, True, {"stream_members": "off"}) is False
    assert _streamed({}, True, {"stream_members": "sometimes"}) is False  # unknown: ignored (a notice says so)
