"""The response cache (docs/caching.md), against live services over the fake upstream.

Each test asks questions of its own, so no test depends on what another left in the cache; the LLMs are this
module's own (`ca-*`), so the fake's log shows exactly which upstream calls the cache did not save.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import redis

from tests.api.test_metrics import grew, scrape
from tests.conftest import REDIS_HOST, REDIS_PORT, TOKEN, Service, StartService, empty_redis_db, llm, wait_until
from tests.fake_upstream import FakeUpstream, split_tokens
from tests.openai_schema import validate

MEMBERS = ("ca-one", "ca-two", "ca-three")
JUDGE = "ca-judge"
OTHER_JUDGE = "ca-judge2"
FLAKY = "ca-flaky"  # a member that is made to fail (no retries)
FRAIL_JUDGE = "ca-frail-judge"  # a concluding LLM that is made to fail (no retries, no fallback)
SLOW = "ca-slow"  # a member the quorum cuts off
OURS = frozenset({*MEMBERS, JUDGE, OTHER_JUDGE, FLAKY, FRAIL_JUDGE, SLOW})
MEMBER_PRICE = {"input_per_million": "2", "output_per_million": "8"}
JUDGE_PRICE = {"input_per_million": "5", "output_per_million": "20"}
FIRST_PROMPT = "CACHE-PROMPT-1: combine the answers."
SECOND_PROMPT = "CACHE-PROMPT-2: combine the answers differently."
PICO = Decimal(10**12)

REDIS_DB = 13  # this module's own key space, flushed before and after use


def cache_config(fake: FakeUpstream, member_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every MoM model of this module; `member_params` are the first member's `params` (a config edit)."""
    first, *others = MEMBERS
    panel = list(MEMBERS)
    first_extra = {"params": member_params} if member_params else {}

    def model(name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "llms_to_query": panel, "concluding_llm": JUDGE, "concluding_prompt": "first"} | extra

    return {
        "llm_definitions": [
            llm(first, fake, pricing=MEMBER_PRICE, **first_extra),
            *(llm(name, fake, pricing=MEMBER_PRICE) for name in others),
            llm(JUDGE, fake, pricing=JUDGE_PRICE),
            llm(OTHER_JUDGE, fake, pricing=JUDGE_PRICE),
            llm(FLAKY, fake, pricing=MEMBER_PRICE, retries=0),
            llm(FRAIL_JUDGE, fake, pricing=JUDGE_PRICE, retries=0),
            llm(SLOW, fake, pricing=MEMBER_PRICE),
        ],
        "prompt_definitions": [
            {"name": "first", "content": FIRST_PROMPT},
            {"name": "second", "content": SECOND_PROMPT},
        ],
        "models": [
            model("cmom"),
            model("cmom-prompt", concluding_prompt="second"),
            model("cmom-judge2", concluding_llm=OTHER_JUDGE),
            model("cmom-off", cache={"enabled": False}),
            model("cmom-short", cache={"ttl_seconds": 1}),
            model("cmom-flaky", llms_to_query=[first, FLAKY]),
            model("cmom-frail", concluding_llm=FRAIL_JUDGE),
            model("cmom-acct"),
            model("cmom-quorum", llms_to_query=[first, SLOW], quorum=1),
        ],
    }


@pytest.fixture(scope="module")
def cached(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """A service of its own with the in-process cache on (REDIS_URL empty: whatever the environment says)."""
    return start_service(cache_config(fake_server), {"MOM_CACHE_ENABLED": "true", "REDIS_URL": ""})


# ------------------------------------------------------------------------------------------------- helpers


@dataclass
class Answer:
    status: int
    body: dict[str, Any]  # the chat.completion, or a stream's last chunk (usage and `mom`); an error's body
    content: str = ""
    chunks: list[dict[str, Any]] = field(default_factory=list)  # a stream's chunks, [DONE] excluded

    @property
    def mom(self) -> dict[str, Any]:
        breakdown: dict[str, Any] = self.body["mom"]
        return breakdown

    @property
    def cache(self) -> str:
        return str(self.mom["cache"])

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [*self.mom["members"], self.mom["concluding"]]

    @property
    def pieces(self) -> list[str]:
        """A stream's content deltas, in order."""
        return [c["choices"][0]["delta"]["content"] for c in self.chunks if c["choices"] and content_of(c)]


def usd(value: float) -> Decimal:
    """A cost of the JSON exactly as written (costs are short decimals: repr round-trips them)."""
    return Decimal(repr(value))


def content_of(chunk: dict[str, Any]) -> str:
    return str(chunk["choices"][0]["delta"].get("content") or "")


def question(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def parse(response: httpx.Response, stream: bool) -> Answer:
    if response.status_code != 200:
        body: dict[str, Any] = response.json()
        validate(body, "ErrorResponse")
        return Answer(response.status_code, body)
    if not stream:
        body = response.json()
        validate(body, "CreateChatCompletionResponse")
        return Answer(200, body, body["choices"][0]["message"]["content"])
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]", frames[-3:]
    chunks = [orjson.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        assert "error" not in chunk, chunk
        validate(chunk, "CreateChatCompletionStreamResponse")
    content = "".join(content_of(c) for c in chunks if c["choices"])
    return Answer(200, chunks[-1], content, chunks)


def ask(
    service: Service,
    text: str,
    model: str = "cmom",
    *,
    stream: bool = False,
    cache_control: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> Answer:
    """One chat request; a stream asks for the usage chunk (which carries `mom`) unless `extra` says otherwise."""
    body: dict[str, Any] = {"model": model, "messages": messages or question(text), **extra}
    if stream:
        body = {"stream": True, "stream_options": {"include_usage": True}} | body
    headers = service.headers()
    if cache_control is not None:
        headers["Cache-Control"] = cache_control
    response = httpx.post(f"{service.base_url}/chat/completions", headers=headers, json=body, timeout=30)
    return parse(response, stream)


def upstream(fake: FakeUpstream) -> list[str]:
    """The models of this module's upstream calls so far, sorted."""
    return sorted(e["model"] for e in fake.log() if e["model"] in OURS)


def assert_miss(answer: Answer) -> None:
    assert answer.status == 200, answer.body
    assert answer.cache == "miss"
    assert answer.mom["concluding"]["cached"] is False


def assert_hit(answer: Answer, original: Answer) -> None:
    """A replay of `original`: its content, nothing used, nothing paid, its cost saved."""
    assert answer.status == 200, answer.body
    assert answer.cache == "hit"
    assert answer.content == original.content
    usage = answer.body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (0, 0, 0)
    assert usage["cost"] == 0
    assert answer.mom["cost"] == 0
    assert all(c["cached"] is True and c["cost"] == 0 for c in answer.calls)
    assert [c["name"] for c in answer.calls] == [c["name"] for c in original.calls]
    assert [c["status"] for c in answer.calls] == [c["status"] for c in original.calls]
    # what producing it cost: its calls, and the members' answers it took from the cache in turn
    assert usd(answer.mom["cost_saved"]) == usd(original.mom["cost"]) + usd(original.mom["cost_saved"])


def assert_stream_shape(answer: Answer) -> None:
    """Role chunk, content chunks, one finish chunk, the usage chunk (then [DONE], checked by `parse`)."""
    chunks = answer.chunks
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["choices"][0]["finish_reason"] is None
    middle = chunks[1:-2]
    assert middle and all(content_of(c) and c["choices"][0]["finish_reason"] is None for c in middle)
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1] and "mom" in chunks[-1]


def rows(service: Service, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        return db.execute(query, params).fetchall()


def configure(fake: FakeUpstream, judge_text: str, **judge: Any) -> None:
    fake.configure(
        {
            **{name: {"text": f"{name} thinks: {{last_user}}", "prompt_tokens": 40} for name in MEMBERS},
            JUDGE: {"text": judge_text, "prompt_tokens": 300, **judge},
        }
    )


# ------------------------------------------------------------------------------------------- hits and misses


def test_an_identical_request_is_answered_from_the_cache(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Seven continents, by the usual count.")
    first = ask(cached, "How many continents are there?")
    assert_miss(first)
    assert first.mom["cost"] > 0 and first.mom["cost_saved"] == 0
    assert all(c["cached"] is False for c in first.calls)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])

    second = ask(cached, "How many continents are there?")
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])  # no upstream call
    assert_hit(second, first)
    assert second.content == "Seven continents, by the usual count."
    assert second.body["choices"][0]["finish_reason"] == first.body["choices"][0]["finish_reason"] == "stop"
    assert second.body["id"] != first.body["id"]


def test_a_whole_answer_is_replayed_as_a_stream_and_the_reverse(cached: Service, fake: FakeUpstream) -> None:
    judge_text = "Water boils at one hundred degrees at sea level."
    configure(fake, judge_text)
    whole = ask(cached, "At what temperature does water boil?")
    assert_miss(whole)
    replayed = ask(cached, "At what temperature does water boil?", stream=True)
    assert_stream_shape(replayed)
    assert_hit(replayed, whole)
    # the synthesis' pieces as the concluding LLM streamed them, though the first client got them whole
    assert replayed.pieces == split_tokens(judge_text)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])

    fake.clear_log()
    streamed = ask(cached, "At what temperature does water freeze?", stream=True)
    assert_stream_shape(streamed)
    assert_miss(streamed)
    again = ask(cached, "At what temperature does water freeze?")
    assert_hit(again, streamed)
    assert again.content == judge_text
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])


def test_a_streamed_hit_replays_the_chunks_as_they_were_streamed(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "One two three four five six seven eight nine ten.", token_delay_ms=20)
    first = ask(cached, "Count to ten, please.", stream=True)
    assert_miss(first)
    assert len(first.pieces) >= 8
    replay = ask(cached, "Count to ten, please.", stream=True)
    assert_stream_shape(replay)
    assert_hit(replay, first)
    assert replay.pieces == first.pieces  # the same number of content chunks, each the same text
    assert replay.chunks[-1]["usage"]["total_tokens"] == 0
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])


def test_user_and_stream_settings_are_not_in_the_key_sampling_and_messages_are(
    cached: Service, fake: FakeUpstream
) -> None:
    configure(fake, "Blue, because of Rayleigh scattering.")
    text = "Why is the sky blue?"
    first = ask(cached, text, user="alice", temperature=0.5)
    assert_miss(first)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])

    assert_hit(ask(cached, text, user="bob", temperature=0.5, stream=True), first)
    assert_hit(ask(cached, text, temperature=0.5), first)
    plain_stream = ask(cached, text, temperature=0.5, stream=True, stream_options=None)  # no usage chunk
    assert plain_stream.content == first.content and all(c["choices"] for c in plain_stream.chunks)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])  # none of those reached the upstream

    other_temperature = ask(cached, text, user="alice", temperature=0.7)
    assert_miss(other_temperature)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 2)  # members' keys hold the parameters too
    assert all(c["cached"] is False for c in other_temperature.calls)

    fake.clear_log()
    conversation = [*question(text), {"role": "assistant", "content": "Hm."}, *question("Really?")]
    assert_miss(ask(cached, text, messages=conversation, user="alice", temperature=0.5))
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])


# --------------------------------------------------------------------------------------------- Cache-Control


def test_no_cache_asks_the_panel_again_and_stores_the_fresh_answer(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "The OLD answer.")
    old = ask(cached, "What is the news today?")
    assert_miss(old)
    assert_hit(ask(cached, "What is the news today?"), old)
    fake.clear_log()

    configure(fake, "The NEW answer.")
    fresh = ask(cached, "What is the news today?", cache_control="no-cache")
    assert_miss(fresh)
    assert fresh.content == "The NEW answer."
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])  # members asked again too, not taken from the cache
    assert all(c["cached"] is False for c in fresh.calls)

    later = ask(cached, "What is the news today?")
    assert_hit(later, fresh)
    assert later.content == "The NEW answer."
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])


def test_no_store_answers_without_storing(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Not to be kept.")
    first = ask(cached, "Tell me a secret.", cache_control="no-store")
    assert_miss(first)
    second = ask(cached, "Tell me a secret.")
    assert_miss(second)  # nothing was stored: neither the answer nor the members' answers
    assert all(c["cached"] is False for c in second.calls)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 2)
    assert_hit(ask(cached, "Tell me a secret."), second)  # the plain request was stored


def test_no_cache_and_no_store_together_bypass_the_cache(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Version one.")
    stored = ask(cached, "Which version is it?")
    assert_miss(stored)
    configure(fake, "Version two.")
    bypass = ask(cached, "Which version is it?", cache_control="No-Store,  NO-CACHE")
    assert_miss(bypass)
    assert bypass.content == "Version two."
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 2)
    kept = ask(cached, "Which version is it?")
    assert_hit(kept, stored)  # the bypassing answer did not replace the stored one
    assert kept.content == "Version one."
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 2)


# ------------------------------------------------------------------------------------ per-model settings


def test_a_model_with_the_cache_off_never_hits(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Uncached.")
    for stream in (False, True, False):
        answer = ask(cached, "Is this cached?", "cmom-off", stream=stream)
        assert_miss(answer)
        assert all(c["cached"] is False for c in answer.calls)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 3)


def test_an_entry_expires_after_its_ttl(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Short-lived.")
    first = ask(cached, "How long does this last?", "cmom-short")
    stored_at = time.monotonic()
    assert_miss(first)
    assert_hit(ask(cached, "How long does this last?", "cmom-short"), first)  # well within its second
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])

    deadline = stored_at + 15
    while True:
        answer = ask(cached, "How long does this last?", "cmom-short")
        if answer.cache == "miss":
            break
        assert time.monotonic() < deadline, "the entry did not expire"
        time.sleep(0.2)
    assert time.monotonic() - stored_at >= 0.9
    # the members' answers expired with it: every call was made again
    assert all(c["cached"] is False for c in answer.calls)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 2)


# ------------------------------------------------------------------------------------------ config change


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """A client of this module's Redis db index, empty; skipped where no Redis answers (failed on CI)."""
    yield from empty_redis_db(REDIS_DB)


def test_editing_the_config_changes_the_keys(
    fake: FakeUpstream, start_service: StartService, redis_db: redis.Redis
) -> None:
    configure(fake, "Configured answer.")
    env = {"MOM_CACHE_ENABLED": "true", "REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"}
    text = "Does a config edit invalidate the cache?"
    before = start_service(cache_config(fake), env)
    first = ask(before, text)
    assert_miss(first)
    # in Redis (the answer is stored after its last event, the members' answers in the background)
    wait_until(lambda: len(redis_db.keys("mom:cache:a:*")) == 1 and len(redis_db.keys("mom:cache:m:*")) == 3)
    before.stop()

    # a new process, the same config: the answer is in Redis
    same = start_service(cache_config(fake), env)
    assert_hit(ask(same, text), first)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])
    same.stop()

    # one member's params edited: the answer's key and that member's key change, the others' do not
    edited = start_service(cache_config(fake, member_params={"temperature": 0.25}), env)
    answer = ask(edited, text)
    assert_miss(answer)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE, MEMBERS[0], JUDGE])
    calls = [e for e in fake.log() if e["model"] == MEMBERS[0]]
    assert calls[-1]["body"]["temperature"] == 0.25
    cached_members = {m["name"]: m["cached"] for m in answer.mom["members"]}
    assert cached_members == {MEMBERS[0]: False, MEMBERS[1]: True, MEMBERS[2]: True}
    assert_hit(ask(edited, text), answer)
    edited.stop()


# ------------------------------------------------------------------------------------------ never cached


def test_an_answer_with_a_failed_member_is_not_cached(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Half an answer.")
    fake.configure({FLAKY: {"status": 500}})
    text = "Will the flaky member answer?"
    first = ask(cached, text, "cmom-flaky")
    assert first.status == 200 and first.mom["degraded"] is True
    assert {m["name"]: m["status"] for m in first.mom["members"]} == {MEMBERS[0]: "ok", FLAKY: "error"}
    second = ask(cached, text, "cmom-flaky")
    assert_miss(second)
    assert second.mom["degraded"] is True
    # asked again: the failed member and the synthesis; the member that answered comes from the cache
    assert upstream(fake) == sorted([MEMBERS[0], FLAKY, JUDGE, FLAKY, JUDGE])
    assert {m["name"]: m["cached"] for m in second.mom["members"]} == {MEMBERS[0]: True, FLAKY: False}

    fake.configure({FLAKY: {"text": "Now I answer."}})
    whole = ask(cached, text, "cmom-flaky")
    assert_miss(whole)
    assert whole.mom["degraded"] is False
    assert_hit(ask(cached, text, "cmom-flaky"), whole)  # a whole answer is cached


def test_a_failed_answer_is_not_cached(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "unused")
    fake.configure({FRAIL_JUDGE: {"status": 500}})
    text = "Will the concluding LLM answer?"
    for stream in (False, True, False):
        failed = ask(cached, text, "cmom-frail", stream=stream)
        assert failed.status == 502
        assert failed.body["error"]["code"] == "concluding_failed"
    assert [e["model"] for e in fake.log() if e["model"] == FRAIL_JUDGE] == [FRAIL_JUDGE] * 3

    fake.configure({FRAIL_JUDGE: {"text": "Finally concluded."}})
    answer = ask(cached, text, "cmom-frail")
    assert_miss(answer)
    assert answer.content == "Finally concluded."
    assert [e["model"] for e in fake.log() if e["model"] == FRAIL_JUDGE] == [FRAIL_JUDGE] * 4


def test_an_answer_with_a_member_skipped_by_its_circuit_is_not_cached(
    fake: FakeUpstream, start_service: StartService
) -> None:
    breaking = start_service(
        cache_config(fake),
        {
            "MOM_CACHE_ENABLED": "true",
            "REDIS_URL": "",
            "MOM_CIRCUIT_FAILURES": "1",
            "MOM_CIRCUIT_COOLDOWN_SECONDS": "600",
        },
    )
    configure(fake, "Without the flaky one.")
    fake.configure({FLAKY: {"status": 500}})
    text = "Is the flaky member's circuit open?"
    failed = ask(breaking, text, "cmom-flaky")  # its one failure opens its circuit
    assert failed.status == 200 and failed.mom["degraded"] is True
    for _ in range(2):
        skipped = ask(breaking, text, "cmom-flaky")
        assert_miss(skipped)
        flaky = {m["name"]: m for m in skipped.mom["members"]}[FLAKY]
        assert (flaky["status"], flaky["reason"]) == ("skipped", "circuit_open")
    assert upstream(fake) == sorted([MEMBERS[0], FLAKY, JUDGE, JUDGE, JUDGE])  # each synthesis made again
    breaking.stop()


def test_members_cut_off_by_the_quorum_do_not_prevent_caching(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "The quick one's answer.")
    fake.configure({SLOW: {"text": "Too late.", "ttft_ms": 5000}})
    text = "Who answers first?"
    first = ask(cached, text, "cmom-quorum")
    assert_miss(first)
    slow = {m["name"]: m for m in first.mom["members"]}[SLOW]
    assert slow["status"] == "cancelled" and "quorum" in slow["error"]
    assert first.mom["degraded"] is True
    again = ask(cached, text, "cmom-quorum")
    assert_hit(again, first)
    assert {m["name"]: m["status"] for m in again.mom["members"]} == {MEMBERS[0]: "ok", SLOW: "cancelled"}
    assert upstream(fake) == sorted([MEMBERS[0], SLOW, JUDGE])


# ------------------------------------------------------------------------------------------- single flight


def test_identical_requests_in_flight_make_one_fan_out(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Everyone gets the same answer, word by word.", ttft_ms=1000, token_delay_ms=30)
    text = "What do twenty people asking at once get?"
    start = threading.Barrier(20)

    def one(index: int) -> Answer:
        start.wait()
        return ask(cached, text, stream=index % 2 == 1)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert all(a.status == 200 for a in answers)
    assert sorted(a.cache for a in answers) == ["hit"] * 19 + ["miss"]
    assert {a.content for a in answers} == {"Everyone gets the same answer, word by word."}
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])  # one fan-out, one synthesis
    (miss,) = [a for a in answers if a.cache == "miss"]
    for answer in answers:
        if answer is not miss:
            assert_hit(answer, miss)
    for streamed in answers[1::2]:
        assert_stream_shape(streamed)
        assert streamed.pieces == split_tokens("Everyone gets the same answer, word by word.")


def raw_request(service: Service, body: dict[str, Any]) -> socket.socket:
    """A chat request sent on a socket of its own, whose answer is never read: closing it is a client leaving."""
    payload = orjson.dumps(body)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{service.port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    sock.sendall(head.encode() + payload)
    return sock


def test_a_client_leaving_does_not_cut_the_others_off(cached: Service, fake: FakeUpstream) -> None:
    """The first request's run is the one the others follow: its client leaving must not cancel it."""
    judge_text = "Still here for the nineteen who stayed."
    configure(fake, judge_text, ttft_ms=1500, token_delay_ms=30)
    text = "Does the first client leaving stop the others?"
    left_before = cached.log().count("status=499")
    leader = raw_request(cached, {"model": "cmom", "messages": question(text)})
    try:
        fake.wait_for(lambda log: any(e["model"] == JUDGE for e in log), timeout=10)  # the synthesis started
        with ThreadPoolExecutor(19) as pool:
            futures = [pool.submit(ask, cached, text, stream=i % 2 == 0) for i in range(19)]
            # every one has joined the leader's run (past admission and validation, into the engine)
            wait_until(lambda: scrape(cached).value("mom_answers_in_progress") == 20, timeout=10)
            leader.close()  # the first client leaves before any answer
            answers = [f.result() for f in futures]
    finally:
        leader.close()
    assert all(a.status == 200 and a.content == judge_text for a in answers)
    assert [a.cache for a in answers] == ["hit"] * 19
    log = [e for e in fake.log() if e["model"] in OURS]
    assert sorted(e["model"] for e in log) == sorted([*MEMBERS, JUDGE])
    (judge,) = [e for e in log if e["model"] == JUDGE]
    assert judge["outcome"] == "ok" and judge["disconnected_at"] is None  # the synthesis was not cut off
    wait_until(lambda: cached.log().count("status=499") == left_before + 1)  # the first client did leave
    # and the answer was stored for whoever comes next
    assert ask(cached, text).cache == "hit"
    assert len([e for e in fake.log() if e["model"] in OURS]) == 4


def test_a_follower_leaving_early_is_recorded_without_call_rows(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Only the leader stays.", ttft_ms=1500)
    text = "What is recorded of a follower that left?"
    with ThreadPoolExecutor(1) as pool:
        leader = pool.submit(ask, cached, text)
        fake.wait_for(lambda log: any(e["model"] == JUDGE for e in log), timeout=10)
        follower = raw_request(cached, {"model": "cmom", "messages": question(text)})
        try:
            wait_until(lambda: scrape(cached).value("mom_answers_in_progress") == 2, timeout=10)  # it follows
        finally:
            follower.close()  # it leaves before any answer
        assert_miss(leader.result())

    def recorded() -> list[tuple[Any, ...]]:
        return rows(
            cached,
            "SELECT r.id, r.status, r.cache_hit, count(c.id) FROM mom_requests r LEFT JOIN mom_calls c "
            "ON c.request_id = r.id WHERE r.created_ms >= ? AND r.mom_model = 'cmom' GROUP BY r.id",
            int((time.time() - 30) * 1000),
        )

    wait_until(lambda: {row[1] for row in recorded()} >= {"ok", "cancelled"})
    statuses = sorted((status, hit, calls) for _, status, hit, calls in recorded() if status in ("ok", "cancelled"))
    assert ("ok", 0, len(MEMBERS) + 1) in statuses
    (left,) = [request for request, status, _, _ in recorded() if status == "cancelled"]
    phantom = rows(cached, "SELECT llm, role, status, cost_pico FROM mom_calls WHERE request_id = ?", left)
    assert phantom == []  # a request that called nothing has no call rows


def test_a_follower_saves_what_a_replay_of_the_same_answer_saves(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Synthesised again.")
    text = "What does following a flight save?"
    assert_miss(ask(cached, text))  # the members' answers are now in the cache
    configure(fake, "Synthesised again.", ttft_ms=1000)
    fake.clear_log()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, cached, text, "cmom-prompt")
        fake.wait_for(lambda log: any(e["model"] == JUDGE for e in log), timeout=10)
        second = pool.submit(ask, cached, text, "cmom-prompt")
        leader, follower = first.result(), second.result()
    assert upstream(fake) == [JUDGE]  # one synthesis, the members from the cache
    assert_miss(leader)
    assert leader.mom["cost_saved"] > 0  # the members' answers it did not pay for
    replay = ask(cached, text, "cmom-prompt")
    assert_hit(replay, leader)  # saves the synthesis and the members' answers
    assert follower.cache == "hit"
    assert follower.mom["cost_saved"] == replay.mom["cost_saved"]  # fails: only the synthesis' cost


# ------------------------------------------------------------------------------------------ member cache


def test_members_answers_are_reused_by_another_model_with_the_same_panel(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "First synthesis.")
    fake.configure({OTHER_JUDGE: {"text": "Another judge's synthesis.", "prompt_tokens": 200}})
    text = "What do the members think of the cache?"
    first = ask(cached, text)
    assert_miss(first)
    fake.clear_log()

    prompt = ask(cached, text, "cmom-prompt")
    assert_miss(prompt)
    assert upstream(fake) == [JUDGE]  # only the synthesis runs again
    (judge,) = [e for e in fake.log() if e["model"] == JUDGE]
    assert judge["body"]["messages"][0]["content"] == SECOND_PROMPT
    assert all(m["cached"] is True and m["cost"] == 0 and m["status"] == "ok" for m in prompt.mom["members"])
    assert prompt.mom["concluding"]["cached"] is False and prompt.mom["concluding"]["cost"] > 0
    saved = sum(usd(m["cost"]) for m in first.mom["members"])
    assert saved > 0
    assert usd(prompt.mom["cost_saved"]) == saved
    assert prompt.mom["cost"] == prompt.mom["concluding"]["cost"]

    fake.clear_log()
    other = ask(cached, text, "cmom-judge2")
    assert_miss(other)
    assert other.content == "Another judge's synthesis."
    assert upstream(fake) == [OTHER_JUDGE]
    assert all(m["cached"] is True for m in other.mom["members"])
    assert usd(other.mom["cost_saved"]) == saved


# ------------------------------------------------------------------------------------- records and metrics


def test_hits_are_recorded_and_counted_as_savings(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "An answer worth keeping.")
    text = "What does the cache save?"
    since = time.time() - 1
    health_before = httpx.get(f"{cached.url}/health/detailed", headers=cached.headers(), timeout=10).json()
    metrics_before = scrape(cached)

    first = ask(cached, text, "cmom-acct")
    assert_miss(first)
    hits = [ask(cached, text, "cmom-acct", stream=True), ask(cached, text, "cmom-acct")]
    for hit in hits:
        assert_hit(hit, first)

    def recorded() -> list[tuple[Any, ...]]:
        return rows(
            cached,
            "SELECT id, cache_hit, status, cost_pico, cost_saved_pico, prompt_tokens, completion_tokens, "
            "reasoning_tokens, cached_tokens FROM mom_requests WHERE mom_model = 'cmom-acct' ORDER BY created_ms",
        )

    wait_until(lambda: len(recorded()) == 3)
    (miss_row, *hit_rows) = recorded()
    assert miss_row[1:3] == (0, "ok") and miss_row[4] is None
    cost_pico = miss_row[3]
    assert Decimal(cost_pico) / PICO == usd(first.mom["cost"])
    for row in hit_rows:
        assert row[1:] == (1, "ok", 0, cost_pico, 0, 0, 0, 0)
    calls = rows(cached, "SELECT request_id, llm FROM mom_calls WHERE mom_model = 'cmom-acct'")
    assert sorted(llm for _, llm in calls) == sorted([*MEMBERS, JUDGE])
    assert {request for request, _ in calls} == {miss_row[0]}  # hits made no calls, and have no call rows

    usage = httpx.get(
        f"{cached.base_url}/metrics/usage",
        headers=cached.headers(),
        params={"start": since, "model": "cmom-acct"},
        timeout=10,
    ).json()["totals"]
    assert usage["requests"] == 3
    assert usage["prompt_tokens"] == first.body["usage"]["prompt_tokens"]
    assert usage["cost"] == first.mom["cost"]
    assert usd(usage["cost_saved"]) == sum(usd(h.mom["cost_saved"]) for h in hits)
    assert usd(usage["cost_saved"]) == Decimal(2 * cost_pico) / PICO

    delta = grew(metrics_before, scrape(cached))
    assert delta("mom_cache_total", result="hit") == 2
    assert delta("mom_cache_total", result="miss") == 1
    assert delta("mom_requests_total", model="cmom-acct", surface="chat", outcome="ok") == 3
    assert delta("mom_cost_saved_usd_total", model="cmom-acct") == pytest.approx(2 * first.mom["cost"], rel=1e-12)
    for name in MEMBERS:  # a hit is no upstream call
        assert delta("mom_upstream_calls_total", llm=name, role="member", stage="answer", status="ok") == 1

    health = httpx.get(f"{cached.url}/health/detailed", headers=cached.headers(), timeout=10).json()
    component, earlier = health["components"]["cache"], health_before["components"]["cache"]
    assert component["status"] == "ok" and component["backend"] == "memory"
    assert component["entries"] - earlier["entries"] == 1 + len(MEMBERS)  # the answer and each member's answer
    assert component["bytes"] > earlier["bytes"]
    assert component["max_bytes"] == 256 * 1024 * 1024


def test_with_the_cache_turned_off_nothing_is_ever_a_hit(service: Service, fake: FakeUpstream) -> None:
    """The shared service runs with MOM_CACHE_ENABLED=false."""
    messages = question("Is anything cached when the cache is off?")
    for stream in (False, True, False):
        answer = ask(service, "", "mom", stream=stream, messages=messages)
        assert_miss(answer)
        assert answer.mom["cost_saved"] == 0
    assert sorted(e["model"] for e in fake.log()) == sorted(["alpha", "beta", "gamma", "judge"] * 3)
    health = httpx.get(f"{service.url}/health/detailed", headers=service.headers(), timeout=10).json()
    assert health["components"]["cache"] == {"status": "ok", "latency_ms": 0.0, "backend": "none"}


# ------------------------------------------------------------------------------------- whose answers are whose

TOKEN_A, TOKEN_B = "cache-token-a-123456", "cache-token-b-654321"


@pytest.fixture(scope="module")
def tenants(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """The cache on, two API tokens (two callers); `cmom-shared` shares its answers between callers."""
    config = cache_config(fake_server)
    shared = {**config["models"][0], "name": "cmom-shared", "cache": {"scope": "global"}}
    config["models"].append(shared)
    return start_service(
        config, {"MOM_CACHE_ENABLED": "true", "REDIS_URL": "", "API_TOKEN": f"{TOKEN_A},{TOKEN_B}"}, token=None
    )


def ask_as(service: Service, token: str, text: str, model: str = "cmom") -> Answer:
    body = {"model": model, "messages": question(text)}
    response = httpx.post(f"{service.base_url}/chat/completions", headers=service.headers(token), json=body)
    return parse(response, stream=False)


def test_a_caller_never_sees_anothers_cached_answers(tenants: Service, fake: FakeUpstream) -> None:
    """By default the cache keeps each caller's answers (and members' answers) apart: `mom.cache` cannot tell one
    caller what another asked."""
    configure(fake, "Private.")
    text = "Did anyone else ask this?"
    first = ask_as(tenants, TOKEN_A, text)
    assert_miss(first)
    other = ask_as(tenants, TOKEN_B, text)
    assert_miss(other)
    assert all(c["cached"] is False for c in other.calls)  # not even a member's answer came from the cache
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 2)
    assert_hit(ask_as(tenants, TOKEN_A, text), first)  # each caller still has its own cache
    assert_hit(ask_as(tenants, TOKEN_B, text), other)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE] * 2)


def test_a_model_may_share_its_cache_between_callers(tenants: Service, fake: FakeUpstream) -> None:
    configure(fake, "Shared.")
    text = "Shall we share?"
    first = ask_as(tenants, TOKEN_A, text, "cmom-shared")
    assert_miss(first)
    assert_hit(ask_as(tenants, TOKEN_B, text, "cmom-shared"), first)
    assert upstream(fake) == sorted([*MEMBERS, JUDGE])


# ------------------------------------------------------------------------------------------- empty answers


def test_an_empty_member_answer_is_not_cached_nor_the_answer_it_is_part_of(cached: Service, fake: FakeUpstream) -> None:
    configure(fake, "Two of three.")
    fake.configure({MEMBERS[1]: {"text": ""}})
    text = "Who answered nothing?"
    first = ask(cached, text)
    assert_miss(first)
    silent = {m["name"]: m for m in first.mom["members"]}[MEMBERS[1]]
    assert (silent["status"], silent["reason"]) == ("error", "empty_answer")
    fake.clear_log()
    again = ask(cached, text)
    assert_miss(again)  # an answer with a failed member is not stored
    members = {m["name"]: m for m in again.mom["members"]}
    assert members[MEMBERS[1]]["cached"] is False  # asked again: its empty answer was not stored
    assert members[MEMBERS[0]]["cached"] is True  # the others' answers were
    assert upstream(fake) == sorted([MEMBERS[1], JUDGE])
