"""Local LLM servers (llama.cpp, Ollama, vLLM) as first-class LLMs, on both call paths: priced at zero unless
configured (their tokens still counted), streams without usage estimated, answers cut short by their token limit,
conversations longer than a server's context window, and an LLM's own system prompt. The fake upstream answers as
llama-cpp-python's server does (`no_usage`, `finish_reason`, `context_window`: its real 400 body)."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import TOKEN, CallPath, Service, StartService, answer_of, free_port, wait_until
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "What is a context window?"}]
LONG = [{"role": "user", "content": "word " * 60}]
PRICE = {"input_per_million": "1", "output_per_million": "2"}
# What vLLM answers (HTTP 400) for a conversation longer than its context window; no error code.
VLLM_MESSAGE = (
    "This model's maximum context length is 32 tokens. However, you requested 64 tokens in the messages, "
    "Please reduce the length of the messages."
)


def local(name: str, fake: FakeUpstream, model: str | None = None, **extra: Any) -> dict[str, Any]:
    """A local LLM on the fake: no key, `local: true` (an `openai/` model behind api_base is not auto-local)."""
    return {"name": name, "model": f"openai/{model or name}", "api_base": fake.base_url, "local": True} | extra


def local_config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "llm_definitions": [
            local("loc-analyst", fake, "loc-small", system_prompt="You are the analyst."),
            local("loc-skeptic", fake, "loc-small", system_prompt="You are the skeptic."),
            local("loc-plain", fake),
            local("loc-priced", fake, pricing=PRICE),
            local("loc-judge", fake),
            local("loc-judge2", fake),
        ],
        "models": [
            {"name": "loc-roles", "llms_to_query": ["loc-analyst", "loc-skeptic"], "concluding_llm": "loc-judge"},
            {"name": "loc-panel", "llms_to_query": ["loc-plain", "loc-priced"], "concluding_llm": "loc-judge"},
            {
                "name": "loc-fallback",
                "llms_to_query": ["loc-plain"],
                "concluding_llm": "loc-judge",
                "concluding_fallbacks": ["loc-judge2"],
            },
        ],
    }


@pytest.fixture(scope="module")
def served(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    return start_service(local_config(fake_server), call_path.env)


def members_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in body["mom"]["members"]}


def ask(service: Service, model: str, messages: list[dict[str, Any]], stream: bool, **more: Any) -> dict[str, Any]:
    """The body with the breakdown (a stream's last chunk), its `content` the answer's text."""
    extra: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    response = service.chat(model, messages=messages, **extra, **more)
    assert response.status_code == 200, response.text
    body, content = answer_of(response, stream)
    return body | {"content": content}


def test_local_llms_cost_zero_unless_priced_and_their_tokens_are_counted(served: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {
            "loc-plain": {"text": "one two three", "prompt_tokens": 100},
            "loc-priced": {"text": "one two", "prompt_tokens": 1000},
            "loc-judge": {"text": "the answer", "prompt_tokens": 500},
        }
    )
    start = time.time() - 1
    body = ask(served, "loc-panel", QUESTION, stream=False)
    members = members_of(body)
    assert members["loc-plain"]["cost"] == 0.0  # zero, not null: a local server costs nothing
    assert members["loc-plain"]["usage"]["prompt_tokens"] == 100
    assert Decimal(repr(members["loc-priced"]["cost"])) == (1000 * 1 + 2 * 2) / Decimal(1_000_000)
    assert body["mom"]["concluding"]["cost"] == 0.0
    assert body["mom"]["unpriced"] == []
    assert Decimal(repr(body["usage"]["cost"])) == Decimal(repr(members["loc-priced"]["cost"]))

    def plain_usage() -> dict[str, Any]:
        params = {"start": start, "llm": "loc-plain"}
        response = httpx.get(
            f"{served.base_url}/metrics/usage", headers=served.headers(TOKEN), params=params, timeout=10
        )
        totals: dict[str, Any] = response.json()["totals"]
        return totals

    deadline = time.monotonic() + 10
    while plain_usage()["requests"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    totals = plain_usage()
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (1, 100, 3)
    assert totals["cost"] == 0.0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_streams_without_usage_are_charged_our_estimate_marked_estimated(
    served: Service, fake: FakeUpstream, stream: bool
) -> None:
    fake.configure(
        {
            "loc-plain": {"text": "one two three", "no_usage": True},
            "loc-priced": {"text": "one two", "prompt_tokens": 1000},
            "loc-judge": {"text": "the final answer", "no_usage": True},
        }
    )
    # members streamed (llama.cpp's streams carry no usage; its whole answers do)
    body = ask(served, "loc-panel", QUESTION, stream, mom={"stream_members": "on"})
    members = members_of(body)
    plain, priced, concluding = members["loc-plain"], members["loc-priced"], body["mom"]["concluding"]
    assert plain["usage_estimated"] is True and concluding["usage_estimated"] is True
    assert plain["usage"]["prompt_tokens"] > 0 and plain["usage"]["completion_tokens"] > 0
    assert concluding["usage"]["prompt_tokens"] > 0 and concluding["usage"]["completion_tokens"] > 0
    assert priced["usage_estimated"] is False and priced["usage"]["prompt_tokens"] == 1000
    assert body["mom"]["usage_estimated"] is True
    assert (plain["cost"], concluding["cost"]) == (0.0, 0.0)


def test_a_member_cut_short_by_its_token_limit_is_an_answer_said_to_be_cut_short(
    served: Service, fake: FakeUpstream
) -> None:
    fake.configure(
        {
            "loc-plain": {"text": "The context window is the", "finish_reason": "length"},
            "loc-priced": {"text": "A whole answer."},
            "loc-judge": {"text": "Combined."},
        }
    )
    body = ask(served, "loc-panel", QUESTION, stream=False)
    members = members_of(body)
    assert (members["loc-plain"]["status"], members["loc-plain"]["finish_reason"]) == ("ok", "length")
    assert (members["loc-priced"]["status"], members["loc-priced"]["finish_reason"]) == ("ok", "stop")
    assert body["mom"]["answered"] == 2 and body["mom"]["degraded"] is False
    told = next(e for e in fake.log() if e["model"] == "loc-judge")["body"]["messages"][-1]["content"]
    plain_block = told.split('name="loc-plain"')[1].split("</panel_answer>")[0]
    assert 'cut_short="true"' in plain_block and "reached its output token limit" in plain_block
    priced_block = told.split('name="loc-priced"')[1].split("</panel_answer>")[0]
    assert "cut_short" not in priced_block


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_concluding_llms_length_reaches_the_client(served: Service, fake: FakeUpstream, stream: bool) -> None:
    fake.configure({"loc-judge": {"text": "A half", "finish_reason": "length"}})
    with OpenAI(base_url=served.base_url, api_key=TOKEN, max_retries=0, timeout=30) as client:
        if stream:
            chunks = list(client.chat.completions.create(model="loc-panel", messages=QUESTION, stream=True))  # type: ignore[arg-type]
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert reasons == ["length"]
        else:
            answer = client.chat.completions.create(model="loc-panel", messages=QUESTION)  # type: ignore[arg-type]
            assert answer.choices[0].finish_reason == "length"
            assert answer.choices[0].message.content == "A half"


# How each server says a conversation is longer than its context window: llama.cpp's (the fake copies its 400 body,
# and its empty 200 stream), vLLM's message, OpenAI's error code alone.
REFUSALS = {
    "llama.cpp": {"context_window": 32},
    "vllm": {"status": 400, "error_message": VLLM_MESSAGE, "error_type": "BadRequestError"},
    "openai-code": {"status": 400, "error_message": "Input too long.", "error_code": "context_length_exceeded"},
}


@pytest.mark.parametrize("server", list(REFUSALS))
@pytest.mark.parametrize("streamed", ["on", "off"], ids=["members-streamed", "members-whole"])
def test_a_member_past_its_context_window_fails_clearly_and_the_panel_answers(
    served: Service, fake: FakeUpstream, server: str, streamed: str
) -> None:
    fake.configure({"loc-plain": REFUSALS[server], "loc-priced": {"text": "Fits."}, "loc-judge": {"text": "Done."}})
    body = ask(served, "loc-panel", LONG, stream=True, mom={"stream_members": streamed})
    plain = members_of(body)["loc-plain"]
    assert (plain["status"], plain["reason"]) == ("error", "context_length_exceeded")
    assert plain["error"] == "the conversation is longer than the context window of the LLM 'loc-plain'"
    assert members_of(body)["loc-priced"]["status"] == "ok"
    assert body["content"] == "Done."
    asked = [e["stream"] for e in fake.log() if e["model"] == "loc-plain"]
    # not retried; llama.cpp's empty stream is asked again whole, once, to learn why it was empty
    if streamed == "off":
        assert asked == [False]
    else:
        assert asked == ([True, False] if server == "llama.cpp" else [True])


def test_a_concluding_llm_past_its_context_window_falls_back(served: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {"loc-plain": {"text": "Fits."}, "loc-judge": {"context_window": 16}, "loc-judge2": {"text": "Fallback."}}
    )
    body = ask(served, "loc-fallback", LONG, stream=False)
    assert body["content"] == "Fallback."
    failed = body["mom"]["concluding_fallbacks"]
    assert [(r["name"], r["reason"]) for r in failed] == [("loc-judge", "context_length_exceeded")]
    assert body["mom"]["concluding"]["name"] == "loc-judge2"


def test_an_llms_system_prompt_comes_first_in_its_member_calls(served: Service, fake: FakeUpstream) -> None:
    fake.configure({"loc-small": {"text": "A view."}, "loc-judge": {"text": "Both views."}})
    conversation = [{"role": "system", "content": "Be brief."}, *QUESTION]
    body = ask(served, "loc-roles", conversation, stream=False)
    assert body["mom"]["answered"] == 2
    sent = sorted(
        (e["body"]["messages"] for e in fake.log() if e["model"] == "loc-small"), key=lambda m: m[0]["content"]
    )
    assert [m[:3] for m in sent] == [
        [{"role": "system", "content": "You are the analyst."}, *conversation],
        [{"role": "system", "content": "You are the skeptic."}, *conversation],
    ]
    judge = next(e for e in fake.log() if e["model"] == "loc-judge")["body"]["messages"]
    own = ("You are the analyst.", "You are the skeptic.")
    assert all(str(m["content"]) not in own for m in judge)  # the concluding call has neither


def test_readiness_waits_until_every_local_llms_server_answers(start_service: StartService) -> None:
    """A local server that starts after the service: not ready (naming the LLM), then ready once it answers. A
    remote LLM's server is never asked (here it never answers, and the service is ready all the same)."""
    late = FakeUpstream(free_port())
    config = {
        "llm_definitions": [
            {"name": "loc-late", "model": "openai/loc-late", "api_base": late.base_url, "local": True},
            {
                "name": "far",
                "model": "openai/far",
                "api_base": f"http://127.0.0.1:{free_port()}/v1",
                "api_key_env": "FAKE_KEY",
            },
        ],
        "models": [{"name": "late", "llms_to_query": ["loc-late", "far"], "concluding_llm": "loc-late"}],
    }
    service = start_service(config)

    def ready() -> httpx.Response:
        return httpx.get(f"{service.url}/health/ready", timeout=10)

    waiting = ready()
    assert waiting.status_code == 503
    assert waiting.json() == {"status": "not_ready", "reason": "waiting for the server of the local LLM 'loc-late'"}
    assert late.base_url not in waiting.text and str(late.port) not in waiting.text
    late.start()
    try:
        wait_until(lambda: ready().status_code == 200, timeout=20)
        assert ready().json() == {"status": "ready"}
    finally:
        late.stop()
    wait_until(lambda: ready().status_code == 503, timeout=20)  # gone again: not ready again
