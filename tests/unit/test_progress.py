"""The progress stream's pure parts: the engine's events as progress frames (coalesced text, order), the hub in
process (bounds, expiry, subscribers), the link tokens, and the other encoders ignoring the events they do not use."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import orjson
import pytest

from mom_service.api.encoders import progress as progress_encoder
from mom_service.api.encoders.anthropic import MessageCollector, MessageStreamEncoder
from mom_service.api.encoders.openai import CompletionCollector, StreamSerializer
from mom_service.api.encoders.progress import CANCELLED, RunProgress, progress_headers
from mom_service.api.encoders.responses import ResponseCollector, ResponseShape
from mom_service.api.encoders.responses_stream import ResponseStreamEncoder
from mom_service.api.signing import LinkSigner, ThinkingSigner
from mom_service.config import parse_config
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
    StageDone,
    StageStarted,
    Usage,
)
from mom_service.engine.plan import Plan
from mom_service.engine.planning import make_plan
from mom_service.errors import UpstreamFailed
from mom_service.progress.hub import Frame, Limits, MemoryHub, TooManySubscribers, UnknownRun
from mom_service.settings import Settings

CONFIG = parse_config(
    {
        "llm_definitions": [{"name": n, "model": f"openai/{n}", "api_base": "http://x/v1"} for n in ("a", "b", "j")],
        "models": [
            {"name": "mom", "llms_to_query": ["a", "b"], "concluding_llm": "j", "include_thinking_context": True}
        ],
    },
    "<test>",
)
RUN = "run-1"


def plan() -> Plan:
    return make_plan(
        CONFIG,
        CONFIG.models[0],
        [{"role": "user", "content": "Hello?"}],
        {},
        vision={d.name: False for d in CONFIG.llm_definitions},
        has_images=False,
        request_id=RUN,
        stream=True,
    )


def reports() -> tuple[CallReport, CallReport, CallReport]:
    a = CallReport(name="a", model="openai/a", text="A says hello.", usage=Usage(3, 4), cost=Decimal("0.25"))
    b = CallReport(name="b", model="openai/b")
    b.failed("http_error", "HTTP 500")
    judge = CallReport(name="j", model="openai/j", role="concluding", text="", usage=Usage(9, 2))
    return a, b, judge


def parsed(frames: Iterable[Frame]) -> list[tuple[int, str, dict[str, Any]]]:
    out = []
    for frame in frames:
        head, data = frame.sse.split(b"\ndata: ")
        assert head == b"id: %d\nevent: %s" % (frame.seq, frame.kind.encode())
        out.append((frame.seq, frame.kind, orjson.loads(data)))
    return out


async def published(hub: MemoryHub, run_id: str = RUN, after: int = 0) -> list[tuple[int, str, dict[str, Any]]]:
    """Every frame of a run that has ended, as a subscriber reads it."""
    subscription = await hub.subscribe(run_id, None)
    try:
        return parsed([frame async for frame in subscription.frames(after) if frame is not None])
    finally:
        await subscription.close()


def hub(**limits: Any) -> MemoryHub:
    return MemoryHub(Limits(**limits))


async def test_events_become_frames_in_order_with_text_coalesced() -> None:
    memory = hub()
    progress = RunProgress(memory, plan(), owner="caller")
    a, b, judge = reports()
    breakdown = Breakdown(members=[a, b], concluding=judge)
    events: list[Event] = [
        MemberStarted(a),
        MemberStarted(b),
        MemberDelta(a, "A says "),
        MemberDelta(a, "hello."),
        MemberFinished(a),  # its deltas come first, as one
        MemberFinished(b),
        StageStarted("rank"),
        StageDone("rank", "Rankings: a first"),
        PanelDone([a, b]),
        ContentDelta("The "),
        ContentDelta("answer"),
        ContentDelta("."),
        Completed("stop", breakdown, Usage(12, 6)),
    ]
    for event in events:
        progress.see(event)
    progress.close()  # after the final event: nothing more
    frames = await published(memory)
    assert [seq for seq, _, _ in frames] == list(range(1, len(frames) + 1))
    kinds = [kind for _, kind, _ in frames]
    assert kinds == [
        *("run_started", "member_started", "member_started", "member_delta", "member_done", "member_done"),
        *("stage_started", "stage_done", "concluding_started", "concluding_delta", "run_done"),
    ]
    by_kind = {kind: data for _, kind, data in frames}
    started = frames[0][2]
    assert started["request_id"] == RUN and started["model"] == "mom" and started["strategy"] == "synthesize"
    assert [(m["name"], m["status"]) for m in started["members"]] == [("a", "pending"), ("b", "pending")]
    assert started["concluding"] == {"name": "j", "model": "openai/j"}
    assert frames[1][2] == {"name": "a", "model": "openai/a", "stage": "answer"}
    assert by_kind["member_delta"] == {"name": "a", "stage": "answer", "text": "A says hello."}
    done_a, done_b = (data for _, kind, data in frames if kind == "member_done")
    assert done_a["status"] == "ok" and done_a["text"] == "A says hello." and done_a["cost"] == 0.25
    assert done_a["usage"]["prompt_tokens"] == 3
    assert done_b["status"] == "error" and done_b["reason"] == "http_error" and done_b["error"] == "HTTP 500"
    assert by_kind["stage_started"] == {"stage": "rank"}
    assert by_kind["stage_done"] == {"stage": "rank", "summary": "Rankings: a first"}
    assert by_kind["concluding_started"] == {
        "strategy": "synthesize",
        "concluding": {"name": "j", "model": "openai/j"},
        "selected": None,
    }
    assert by_kind["concluding_delta"] == {"text": "The answer."}
    done = by_kind["run_done"]
    assert done["finish_reason"] == "stop" and done["content"] == "The answer."
    assert done["usage"]["prompt_tokens"] == 12 and done["mom"]["answered"] == 1 and done["mom"]["asked"] == 2


async def test_text_is_published_by_a_timer_while_the_run_goes_on() -> None:
    memory = hub()
    progress = RunProgress(memory, plan(), owner="caller")
    a, _, _ = reports()
    progress.see(MemberDelta(a, "partial"))
    progress.see(PanelDone([a]))
    progress.see(ContentDelta("first "))
    progress.see(ContentDelta("piece"))
    await asyncio.sleep(progress_encoder.FLUSH_S * 3)  # the timer fires: no event needed
    progress.see(ContentDelta(" then more"))
    progress.close()  # the client left: what waits is published, then the run is over
    frames = await published(memory)
    kinds = [kind for _, kind, _ in frames]
    assert kinds == [
        *("run_started", "member_delta", "concluding_started", "concluding_delta", "concluding_delta"),
        "run_failed",
    ]
    assert [data["text"] for _, kind, data in frames if kind == "concluding_delta"] == ["first piece", " then more"]
    assert frames[-1][2] == {"error": CANCELLED, "mom": None}


async def test_a_failure_and_a_verbatim_answer() -> None:
    memory = hub()
    progress = RunProgress(memory, plan(), owner="caller")
    a, b, judge = reports()
    breakdown = Breakdown(members=[a, b], concluding=judge, strategy="best_of")
    progress.see(PanelDone([a, b], selected="a"))  # best_of, vote: no concluding call streams
    progress.see(Failed(UpstreamFailed("none answered", code="members_failed"), breakdown))
    progress.close()
    frames = await published(memory)
    assert frames[1][2]["concluding"] is None and frames[1][2]["selected"] == "a"
    seq, kind, failed = frames[-1]
    assert (seq, kind) == (3, "run_failed")
    assert failed["error"] == {
        "message": "none answered",
        "type": "upstream_error",
        "param": None,
        "code": "members_failed",
    }
    assert failed["mom"]["strategy"] == "best_of"


async def test_a_late_subscriber_resumes_after_its_last_event() -> None:
    memory = hub()
    progress = RunProgress(memory, plan(), owner="caller")
    a, _, judge = reports()
    for event in (MemberStarted(a), MemberFinished(a), Completed("stop", Breakdown([a], judge), Usage())):
        progress.see(event)
    assert [seq for seq, _, _ in await published(memory, after=2)] == [3, 4]
    subscription = await memory.subscribe(RUN, None)
    assert [f async for f in subscription.frames(4)] == []  # over at its last event: nothing, at once
    await subscription.close()


async def test_the_buffer_keeps_lifecycle_frames_and_the_newest_deltas() -> None:
    memory = hub(max_deltas=3)
    memory.open(RUN, "caller")
    kinds = ["run_started", *["concluding_delta"] * 5, "member_done", *["concluding_delta"] * 2, "run_done"]
    for seq, kind in enumerate(kinds, start=1):
        memory.publish(RUN, Frame.of(seq, kind, b"{}"))
    kept = [(seq, kind) for seq, kind, _ in await published(memory)]
    assert kept == [
        *((1, "run_started"), (6, "concluding_delta"), (7, "member_done")),
        *((8, "concluding_delta"), (9, "concluding_delta"), (10, "run_done")),
    ]


async def test_runs_expire_after_the_ttl_and_the_oldest_go_first_beyond_the_cap() -> None:
    now = [1000.0]
    memory = MemoryHub(Limits(ttl_s=60, max_runs=2), clock=lambda: now[0])
    memory.open("old", "caller")
    now[0] += 30
    memory.open("mid", "caller")
    memory.publish("old", Frame.of(1, "run_started", b"{}"))  # active again: the least recent is now "mid"
    memory.open("new", "caller")
    assert len(memory) == 2
    with pytest.raises(UnknownRun):
        await memory.subscribe("mid", None)
    await (await memory.subscribe("old", None)).close()
    now[0] += 61  # 61 s after their last frame
    for run in ("old", "new"):
        with pytest.raises(UnknownRun):
            await memory.subscribe(run, None)
    assert len(memory) == 0


async def test_subscribers_are_capped_per_run_and_only_the_owner_reads_by_bearer() -> None:
    memory = hub(max_subscribers=2)
    memory.open(RUN, "caller")
    first = await memory.subscribe(RUN, "caller")
    second = await memory.subscribe(RUN, None)  # by link token: any owner
    with pytest.raises(TooManySubscribers):
        await memory.subscribe(RUN, "caller")
    await first.close()
    await first.close()  # once only
    third = await memory.subscribe(RUN, "caller")
    with pytest.raises(UnknownRun):
        await memory.subscribe(RUN, "someone-else")
    for subscription in (second, third):
        await subscription.close()


async def test_a_live_subscriber_gets_frames_as_they_come() -> None:
    memory = hub()
    memory.open(RUN, "caller")
    memory.publish(RUN, Frame.of(1, "run_started", b"{}"))
    subscription = await memory.subscribe(RUN, None)
    frames = subscription.frames(0)
    assert (await anext(frames)).seq == 1  # type: ignore[union-attr]
    waiting = asyncio.ensure_future(anext(frames))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # nothing new yet
    memory.publish(RUN, Frame.of(2, "member_started", b"{}"))
    assert (await waiting).seq == 2  # type: ignore[union-attr]
    memory.publish(RUN, Frame.of(3, "run_done", b"{}"))
    assert [f.seq async for f in frames if f is not None] == [3]
    await subscription.close()


def test_a_frame_round_trips_through_its_wire_form() -> None:
    frame = Frame.of(12, "member_delta", b'{"text":"a b\\n"}')
    assert frame.sse == b'id: 12\nevent: member_delta\ndata: {"text":"a b\\n"}\n\n'
    assert Frame.from_wire(frame.to_wire()) == frame
    assert frame.delta and not frame.final and Frame.of(1, "run_failed", b"{}").final


def test_link_tokens_open_one_run_and_are_not_thinking_signatures() -> None:
    settings = Settings(api_token="tok", _env_file=None)  # type: ignore[call-arg]
    links = LinkSigner.from_settings(settings)
    token = links.token("run-1")
    assert links.verify("run-1", token) and not links.verify("run-2", token)
    assert token != links.token("run-2") and "=" not in token and "+" not in token and "/" not in token
    assert token != ThinkingSigner.from_settings(settings).sign("run-1")
    assert not LinkSigner.from_settings(Settings(api_token="other", _env_file=None)).verify("run-1", token)  # type: ignore[call-arg]
    headers = progress_headers("run-1", links)
    assert headers == {"X-MoM-Request-Id": "run-1", "X-MoM-Progress-Url": f"/v1/progress/run-1?token={token}"}
    assert "tok" not in repr(links)


def test_the_other_encoders_ignore_the_events_they_do_not_use() -> None:
    """MemberStarted, MemberDelta and StageStarted are the progress stream's: no surface shows them."""
    a, _, judge = reports()
    mom = CONFIG.models[0]  # with the thinking context: members' answers would show, were they taken
    new: list[Event] = [MemberStarted(a), MemberDelta(a, "piece"), StageStarted("rank")]
    sign = ThinkingSigner(b"k").sign
    shape = ResponseShape(mom.name, {}, thinking=True)
    for stream in (
        StreamSerializer(mom, include_usage=True),
        MessageStreamEncoder("mom", thinking=True, sign=sign),
    ):
        assert [stream.feed(e) for e in new] == [b""] * 3 and not stream.started
    responses = ResponseStreamEncoder(shape)
    assert [responses.feed(e) for e in new] == [b""] * 3
    done = Completed("stop", Breakdown([a], judge), Usage())
    fed, unfed = CompletionCollector(mom), CompletionCollector(mom)
    assert [fed.feed(e) for e in new] == [None] * 3
    assert (fed.feed(done) or {})["choices"] == (unfed.feed(done) or {})["choices"]  # nothing of them shows
    for collector in (MessageCollector("mom", thinking=True, sign=sign), ResponseCollector(shape)):
        assert [collector.feed(e) for e in new] == [None] * 3
