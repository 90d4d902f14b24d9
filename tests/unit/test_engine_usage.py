"""A server that reports no usage: the engine counts the tokens itself, on either call path, and says so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from mom_service.config import LLMDefinition
from mom_service.engine.events import Completed, Usage
from mom_service.observability.redaction import Redactor
from mom_service.providers.caller import LLMCaller, StreamEnd
from tests.conftest import cl100k
from tests.unit.test_engine_permits import CONFIG, _ask, engine_of


class NoUsageCaller(LLMCaller):
    """Answers, but reports no usage (members and the concluding call are streamed)."""

    async def stream(
        self,
        llm: LLMDefinition,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        *,
        encoded: bytes | None = None,
    ) -> AsyncGenerator[str | StreamEnd]:
        if llm.name == "j":
            yield "the synthesis "
            yield "of it all"
        else:
            yield f"{llm.name} says "
            yield "hi there"
        yield StreamEnd("stop", None)


def test_unreported_usage_is_counted_and_marked_estimated() -> None:
    caller = NoUsageCaller(CONFIG, {}, Redactor())
    engine = engine_of(caller)

    completed = asyncio.run(_ask(engine))[-1]

    assert isinstance(completed, Completed)
    for report in [*completed.breakdown.members, completed.breakdown.concluding]:
        assert report.status == "ok" and report.estimated, report
        assert report.usage is not None and report.usage.prompt_tokens > 0 and report.usage.completion_tokens > 0
    member = completed.breakdown.members[0]
    encoding = cl100k()  # what the tokenizer says, computed here, not by the function the engine calls
    prompt = 3 + len(encoding.encode("user")) + len(encoding.encode("hi")) + 3  # per message, role, text, reply
    assert member.usage == Usage(
        prompt_tokens=prompt, completion_tokens=len(encoding.encode(f"{member.name} says hi there"))
    )
    concluding = completed.breakdown.concluding
    assert concluding.usage is not None
    assert concluding.usage.completion_tokens == len(encoding.encode("the synthesis of it all"))
    assert completed.usage.completion_tokens == sum(
        r.usage.completion_tokens for r in [*completed.breakdown.members, completed.breakdown.concluding] if r.usage
    )
