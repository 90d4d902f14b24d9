"""Events to SSE bytes and to one chat.completion body, without HTTP; checked against OpenAI's schemas."""

from __future__ import annotations

import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Literal

import jsonschema
import pytest

from mom_service.api.encoders.openai import CompletionCollector, StreamSerializer
from mom_service.config import MoMModelConfig
from mom_service.engine.events import (
    Breakdown,
    CallReport,
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberDelta,
    MemberFinished,
    MemberStarted,
    PanelDone,
    Usage,
)
from mom_service.errors import MoMError, UpstreamFailed
from tests.openai_schema import validate

ALPHA = CallReport(
    name="alpha",
    model="openai/alpha",
    text="Alpha's answer.",
    latency_ms=12.5,
    ttft_ms=3.0,
    usage=Usage(prompt_tokens=10, completion_tokens=5, reasoning_tokens=2, cached_tokens=4),
    cost=Decimal("0.001"),
)
BETA = CallReport(
    name="beta", model="openai/beta", status="error", error="HTTP 500", error_type="http_error", latency_ms=8.0
)
JUDGE = CallReport(
    name="judge", model="openai/judge", text="Final.", usage=Usage(prompt_tokens=30, completion_tokens=7)
)
BLOCK_ALPHA = "Model: alpha\nContent: Alpha's answer.\n---\n"
BLOCK_BETA = "Model: beta\nStatus: error\nError: HTTP 500\n---\n"


def mom(thinking: bool = False, fmt: Literal["think_tags", "reasoning_content"] = "think_tags") -> MoMModelConfig:
    return MoMModelConfig(
        name="mom-test",
        llms_to_query=["alpha", "beta"],
        concluding_llm="judge",
        include_thinking_context=thinking,
        thinking_format=fmt,
    )


def breakdown() -> Breakdown:
    return Breakdown(members=[ALPHA, BETA], concluding=JUDGE)


def events() -> list[Event]:
    done = breakdown()
    return [
        MemberFinished(ALPHA),
        MemberFinished(BETA),
        PanelDone([ALPHA, BETA]),
        ContentDelta("Fi"),
        ContentDelta("nal."),
        Completed(finish_reason="stop", breakdown=done, usage=done.usage()),
    ]


def frames(data: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing."""
    assert data.endswith(b"\n\n")
    payloads = []
    for frame in data.decode().split("\n\n")[:-1]:
        assert frame.startswith("data: "), frame
        assert "\n" not in frame
        payloads.append(frame[len("data: ") :])
    return payloads


def stream(config: MoMModelConfig, items: Iterable[Event], *, include_usage: bool = True) -> list[bytes]:
    serializer = StreamSerializer(config, include_usage=include_usage)
    return [serializer.feed(event) for event in items]


def chunks(data: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body, each validated; the body must end with [DONE]."""
    payloads = frames(data)
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    parsed = [json.loads(p) for p in payloads[:-1]]
    for chunk in parsed:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return parsed


def delta_text(parsed: list[dict[str, Any]], field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field, "") for c in parsed if c["choices"])


# ------------------------------------------------------------------------------------------------- the stream


def test_stream_chunks_in_order_with_usage_and_done() -> None:
    parsed = chunks(b"".join(stream(mom(), events())))
    first, *middle, final, usage = parsed
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    assert [c["choices"][0]["delta"] for c in middle] == [{"content": "Fi"}, {"content": "nal."}]
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == 40
    assert usage["usage"]["completion_tokens"] == 12
    assert usage["usage"]["total_tokens"] == 52
    assert usage["mom"]["answered"] == 1
    assert usage["mom"]["asked"] == 2
    assert usage["mom"]["degraded"] is True
    assert [m["name"] for m in usage["mom"]["members"]] == ["alpha", "beta"]


def test_stream_chunks_share_id_created_model() -> None:
    serializer = StreamSerializer(mom(), include_usage=True)
    parsed = chunks(b"".join(serializer.feed(e) for e in events()))
    assert {c["id"] for c in parsed} == {serializer.completion_id}
    assert serializer.completion_id.startswith("chatcmpl-")
    assert {c["created"] for c in parsed} == {serializer.created}
    assert {c["model"] for c in parsed} == {"mom-test"}
    assert {c["object"] for c in parsed} == {"chat.completion.chunk"}


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    parsed = chunks(b"".join(stream(mom(), events(), include_usage=False)))
    assert all(c["choices"] for c in parsed)
    assert all("usage" not in c and "mom" not in c for c in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_completed_without_content_still_starts_with_role() -> None:
    done = breakdown()
    parsed = chunks(b"".join(stream(mom(), [Completed("length", done, done.usage())], include_usage=False)))
    assert [c["choices"][0]["delta"] for c in parsed] == [{"role": "assistant", "content": ""}, {}]
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"


def test_schema_check_is_not_vacuous() -> None:
    parsed = chunks(b"".join(stream(mom(), events())))
    broken = dict(parsed[0])
    del broken["object"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, "CreateChatCompletionStreamResponse")


# ------------------------------------------------------------------------------------------- thinking context


def test_think_tags_blocks_sent_as_members_finish() -> None:
    out = stream(mom(thinking=True), events())
    # the first member's block is in the bytes of its own MemberFinished event, after the role chunk
    first = chunks(out[0] + b"data: [DONE]\n\n")
    assert [c["choices"][0]["delta"] for c in first] == [
        {"role": "assistant", "content": ""},
        {"content": "<think>\n" + BLOCK_ALPHA},
    ]
    second = chunks(out[1] + b"data: [DONE]\n\n")
    assert [c["choices"][0]["delta"] for c in second] == [{"content": BLOCK_BETA}]
    closing = chunks(out[2] + b"data: [DONE]\n\n")
    assert [c["choices"][0]["delta"] for c in closing] == [{"content": "</think>\n\n"}]
    content = delta_text(chunks(b"".join(out)), "content")
    assert content == "<think>\n" + BLOCK_ALPHA + BLOCK_BETA + "</think>\n\n" + "Final."


def test_reasoning_content_blocks_go_to_their_own_field() -> None:
    out = stream(mom(thinking=True, fmt="reasoning_content"), events())
    first = chunks(out[0] + b"data: [DONE]\n\n")
    assert [c["choices"][0]["delta"] for c in first] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": BLOCK_ALPHA},
    ]
    assert out[2] == b""  # PanelDone: nothing to close
    parsed = chunks(b"".join(out))
    assert delta_text(parsed, "reasoning_content") == BLOCK_ALPHA + BLOCK_BETA
    assert delta_text(parsed, "content") == "Final."


def live_events() -> list[Event]:
    """alpha streams its answer (with MemberStarted first), beta fails having streamed nothing."""
    done = breakdown()
    return [
        MemberStarted(ALPHA),
        MemberStarted(BETA),
        MemberDelta(ALPHA, "Alpha's "),
        MemberDelta(ALPHA, "answer."),
        MemberFinished(ALPHA),
        MemberFinished(BETA),
        PanelDone([ALPHA, BETA]),
        ContentDelta("Final."),
        Completed(finish_reason="stop", breakdown=done, usage=done.usage()),
    ]


def test_reasoning_content_streams_the_members_text_as_it_comes() -> None:
    out = stream(mom(thinking=True, fmt="reasoning_content"), live_events())
    assert out[:4] == [b"", b"", b"", b""]  # nothing yet: alpha's sentence has not ended
    finished = chunks(out[4] + b"data: [DONE]\n\n")
    assert [c["choices"][0]["delta"] for c in finished] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Model: alpha\nContent: Alpha's answer.\n---\n"},
    ]
    parsed = chunks(b"".join(out))
    assert delta_text(parsed, "reasoning_content") == BLOCK_ALPHA + BLOCK_BETA
    assert delta_text(parsed, "content") == "Final."


@pytest.mark.parametrize("fmt", ["think_tags", "reasoning_content"])
def test_without_a_stream_or_with_think_tags_members_pieces_add_nothing(
    fmt: Literal["think_tags", "reasoning_content"],
) -> None:
    body = collect(mom(thinking=True, fmt=fmt), live_events())
    message = body["choices"][0]["message"]
    if fmt == "think_tags":
        assert message["content"] == "<think>\n" + BLOCK_ALPHA + BLOCK_BETA + "</think>\n\nFinal."
        tagged = delta_text(chunks(b"".join(stream(mom(thinking=True), live_events()))), "content")
        assert tagged == message["content"]
    else:
        assert message["reasoning_content"] == BLOCK_ALPHA + BLOCK_BETA


def test_without_thinking_context_members_produce_no_bytes() -> None:
    serializer = StreamSerializer(mom(), include_usage=True)
    assert serializer.feed(MemberStarted(ALPHA)) == b""
    assert serializer.feed(MemberDelta(ALPHA, "Alpha's answer. ")) == b""
    assert serializer.feed(MemberFinished(ALPHA)) == b""
    assert serializer.feed(MemberFinished(BETA)) == b""
    assert serializer.feed(PanelDone([ALPHA, BETA])) == b""
    assert serializer.started is False
    assert b'"role":"assistant"' in serializer.feed(ContentDelta("x"))
    assert serializer.started is True


# ---------------------------------------------------------------------------------------------------- errors


def test_failed_after_output_is_one_error_event_then_done() -> None:
    serializer = StreamSerializer(mom(), include_usage=True)
    assert serializer.feed(ContentDelta("partial"))
    assert serializer.started
    error = UpstreamFailed("The concluding model failed.", code="concluding_failed")
    payloads = frames(serializer.feed(Failed(error=error, breakdown=breakdown())))
    assert payloads[1:] == ["[DONE]"]
    body = json.loads(payloads[0])
    validate(body, "ErrorResponse")
    assert body == {
        "error": {
            "message": "The concluding model failed.",
            "type": "upstream_error",
            "param": None,
            "code": "concluding_failed",
        }
    }


def test_failed_before_output_is_the_error_alone() -> None:
    serializer = StreamSerializer(mom(), include_usage=True)
    data = serializer.feed(Failed(error=UpstreamFailed("All failed.", code="members_failed"), breakdown=breakdown()))
    payloads = frames(data)
    assert len(payloads) == 2
    assert json.loads(payloads[0])["error"]["code"] == "members_failed"
    assert payloads[1] == "[DONE]"


# -------------------------------------------------------------------------------------------- one completion


def collect(config: MoMModelConfig, items: Iterable[Event]) -> dict[str, Any]:
    collector = CompletionCollector(config)
    body: dict[str, Any] | None = None
    for event in items:
        assert body is None, "the body comes only at Completed"
        body = collector.feed(event)  # type: ignore[assignment]
    assert body is not None
    validate(body, "CreateChatCompletionResponse")
    return body


def test_completion_body() -> None:
    body = collect(mom(), events())
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "mom-test"
    choice = body["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Final.", "refusal": None},
        "finish_reason": "stop",
        "logprobs": None,
    }
    usage = body["usage"]
    assert usage["prompt_tokens"] == 40
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == 52
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 2}
    assert usage["prompt_tokens_details"] == {"cached_tokens": 4}
    breakdown_ = body["mom"]
    assert breakdown_["answered"] == 1
    assert breakdown_["asked"] == 2
    assert breakdown_["degraded"] is True
    alpha, beta = breakdown_["members"]
    assert alpha["name"] == "alpha"
    assert alpha["status"] == "ok"
    assert alpha["usage"]["prompt_tokens"] == 10
    assert alpha["cost"] == 0.001
    assert beta == {
        "name": "beta",
        "model": "openai/beta",
        "status": "error",
        "partial": False,
        "finish_reason": None,
        "reason": "http_error",
        "error": "HTTP 500",
        "latency_ms": 8.0,
        "ttft_ms": None,
        "usage": None,
        "usage_estimated": False,
        "tool_calls": None,
        "cost": None,
        "cached": False,
        "images": None,
        "stage": "answer",
    }
    assert breakdown_["usage_estimated"] is False
    assert (breakdown_["turn"], breakdown_["structured_output"]) == ("ensemble", None)
    assert breakdown_["concluding"]["name"] == "judge"
    assert breakdown_["concluding"]["usage"]["completion_tokens"] == 7
    # only alpha has a known cost: the totals add it, and the others are listed as unpriced
    assert breakdown_["cost"] == 0.001
    assert body["usage"]["cost"] == 0.001
    assert breakdown_["unpriced"] == ["beta", "judge"]


def test_completion_with_think_tags() -> None:
    body = collect(mom(thinking=True), events())
    message = body["choices"][0]["message"]
    assert message["content"] == "<think>\n" + BLOCK_ALPHA + BLOCK_BETA + "</think>\n\nFinal."
    assert "reasoning_content" not in message


def test_completion_with_reasoning_content() -> None:
    body = collect(mom(thinking=True, fmt="reasoning_content"), events())
    message = body["choices"][0]["message"]
    assert message["content"] == "Final."
    assert message["reasoning_content"] == BLOCK_ALPHA + BLOCK_BETA


def test_completion_failed_raises_the_error() -> None:
    collector = CompletionCollector(mom())
    assert collector.feed(ContentDelta("partial")) is None
    error = UpstreamFailed("No member answered.", code="members_failed")
    with pytest.raises(MoMError) as info:
        collector.feed(Failed(error=error, breakdown=breakdown()))
    assert info.value is error
    assert info.value.status_code == 502
    assert info.value.code == "members_failed"


# ----------------------------------------------------------------------------------------------- breakdown


def test_breakdown_usage_sums_members_and_concluding() -> None:
    total = breakdown().usage()
    assert total == Usage(prompt_tokens=40, completion_tokens=12, reasoning_tokens=2, cached_tokens=4)
    assert total.total_tokens == 52


def test_breakdown_usage_all_none_is_zero() -> None:
    empty = Breakdown(members=[BETA], concluding=CallReport(name="judge", model="m", status="skipped"))
    assert empty.usage() == Usage()


def test_breakdown_usage_does_not_mutate_reports() -> None:
    done = breakdown()
    done.usage()
    done.usage()
    assert ALPHA.usage == Usage(prompt_tokens=10, completion_tokens=5, reasoning_tokens=2, cached_tokens=4)


def test_breakdown_degraded_when_a_member_is_not_ok() -> None:
    assert breakdown().degraded is True
    healthy = Breakdown(members=[ALPHA], concluding=JUDGE)
    assert healthy.degraded is False
    assert healthy.answered == 1
    for status in ("error", "cancelled"):
        other = CallReport(name="x", model="m", status=status)  # type: ignore[arg-type]
        assert Breakdown(members=[ALPHA, other], concluding=JUDGE).degraded is True
    # a member skipped by design (it cannot see the request's images) was not asked: not a degradation
    skipped = Breakdown(members=[ALPHA, CallReport(name="x", model="m", status="skipped")], concluding=JUDGE)
    assert skipped.degraded is False
    assert skipped.asked == 1
