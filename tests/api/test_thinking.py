"""The thinking context: member blocks in <think> tags or as reasoning_content, streamed as members finish."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson

from tests.conftest import TOKEN, Service
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


def _panel(fake: FakeUpstream) -> None:
    fake.configure(
        {
            "alpha": {"text": "Rayleigh scattering.", "ttft_ms": 100},
            "beta": {"status": 400, "error_message": "beta exploded"},  # not transient: no retry, it fails at once
            "gamma": {"text": "Short wavelengths scatter more.", "ttft_ms": 1200},
            "judge": {"text": "Because of Rayleigh scattering."},
        }
    )


def _stream(service: Service, model: str) -> list[tuple[float, dict[str, Any]]]:
    chunks: list[tuple[float, dict[str, Any]]] = []
    for at, payload in service.sse({"model": model, "messages": QUESTION, "stream": True}):
        if payload != "[DONE]":
            chunk = orjson.loads(payload)
            validate(chunk, "CreateChatCompletionStreamResponse")
            chunks.append((at, chunk))
    return chunks


def _field(chunks: list[tuple[float, dict[str, Any]]], name: str) -> str:
    return "".join(c["choices"][0]["delta"].get(name) or "" for _, c in chunks if c["choices"])


def test_think_tags_non_streaming(service: Service, fake: FakeUpstream) -> None:
    _panel(fake)
    client = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0)
    completion = client.chat.completions.create(model="mom-think", messages=QUESTION)  # type: ignore[arg-type]
    content = completion.choices[0].message.content or ""
    assert content.startswith("<think>\n")
    thinking, answer = content.split("</think>\n\n")
    assert answer == "Because of Rayleigh scattering."
    assert "Model: alpha\nContent: Rayleigh scattering.\n---\n" in thinking
    assert "Model: gamma\nContent: Short wavelengths scatter more.\n---\n" in thinking
    assert "Model: beta\nStatus: error\nError: " in thinking and "beta exploded" in thinking


def test_think_tags_streaming_sends_each_block_when_its_member_finishes(service: Service, fake: FakeUpstream) -> None:
    _panel(fake)
    chunks = _stream(service, "mom-think")
    content = _field(chunks, "content")
    assert content.startswith("<think>\n") and content.endswith("</think>\n\nBecause of Rayleigh scattering.")

    def first_time(text: str) -> float:
        seen = ""
        for at, chunk in chunks:
            if chunk["choices"]:
                seen += chunk["choices"][0]["delta"].get("content") or ""
                if text in seen:
                    return at
        raise AssertionError(f"{text!r} never arrived")

    alpha_at = first_time("Rayleigh scattering.\n---")
    gamma_at = first_time("Short wavelengths")
    synthesis_at = first_time("Because of")
    # alpha (0.1 s) is shown about a second before gamma (1.2 s) finishes, and the synthesis comes last
    assert gamma_at - alpha_at > 0.7
    assert synthesis_at >= gamma_at
    # the failed member's block comes first: it failed at once
    assert content.index("Model: beta") < content.index("Model: alpha") < content.index("Model: gamma")


def test_reasoning_content_format(service: Service, fake: FakeUpstream) -> None:
    _panel(fake)
    response = httpx.post(
        f"{service.base_url}/chat/completions",
        headers=service.headers(),
        json={"model": "mom-reason", "messages": QUESTION},
        timeout=30,
    )
    body = response.json()
    validate(body, "CreateChatCompletionResponse")
    message = body["choices"][0]["message"]
    assert message["content"] == "Because of Rayleigh scattering."
    assert "<think>" not in message["reasoning_content"]
    assert "Model: alpha\nContent: Rayleigh scattering." in message["reasoning_content"]
    assert "beta exploded" in message["reasoning_content"]

    _panel(fake)
    chunks = _stream(service, "mom-reason")
    assert _field(chunks, "content") == "Because of Rayleigh scattering."
    reasoning = _field(chunks, "reasoning_content")
    assert "Model: gamma\nContent: Short wavelengths scatter more." in reasoning
    assert "<think>" not in reasoning


def test_no_thinking_context_by_default(service: Service, fake: FakeUpstream) -> None:
    _panel(fake)
    chunks = _stream(service, "mom")
    assert _field(chunks, "content") == "Because of Rayleigh scattering."
    assert _field(chunks, "reasoning_content") == ""
