"""Members are called streaming when their text is used as they write it (`stream_members`: on, or auto with
reasoning_content thinking or partial answers; else asked whole): their usage from the stream's last chunk, their
text in the thinking context as they write it (reasoning_content), and what a member cut off had written given to
the concluding LLM when the MoM model says `partial_answers`."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.api.test_costs import call_rows, tokens
from tests.conftest import TOKEN, CallPath, Service, StartService, llm, wait_until
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


def members(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in body["mom"]["members"]}


def test_members_are_asked_streaming_and_their_usage_is_the_streams_own(service: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {
            "alpha": {"text": "Rayleigh scattering, mostly.", "prompt_tokens": 4321},
            "beta": {"text": "Short waves scatter.", "prompt_tokens": 4322},
            "gamma": {"text": "Blue light bends more.", "prompt_tokens": 4323},
            "judge": {"text": "Because of Rayleigh scattering."},
        }
    )
    response = service.chat("mom", messages=QUESTION, mom={"stream_members": "on"})  # the request's control
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Because of Rayleigh scattering."
    assert body["mom"]["overrides"]["stream_members"] == "on"
    asked = {e["model"]: e for e in fake.log() if e["model"] in ("alpha", "beta", "gamma")}
    assert sorted(asked) == ["alpha", "beta", "gamma"]
    for entry in asked.values():  # on either call path
        assert entry["stream"] is True
        assert entry["body"]["stream_options"] == {"include_usage": True}
        assert entry["outcome"] == "ok"
    # the usage is the fake's (its usage chunk comes only when include_usage is asked), not our count
    found = members(body)
    for name, prompt, text in (
        ("alpha", 4321, "Rayleigh scattering, mostly."),
        ("beta", 4322, "Short waves scatter."),
        ("gamma", 4323, "Blue light bends more."),
    ):
        assert found[name]["status"] == "ok"
        assert found[name]["usage_estimated"] is False
        assert found[name]["usage"]["prompt_tokens"] == prompt
        assert found[name]["usage"]["completion_tokens"] == len(text.split())  # the fake's count: its words
        assert found[name]["ttft_ms"] is not None
    assert body["mom"]["usage_estimated"] is False
    request_id = response.headers["x-request-id"]
    wait_until(lambda: len(call_rows(service, request_id)) == 4)
    rows = call_rows(service, request_id)
    assert (rows["alpha"]["prompt_tokens"], rows["alpha"]["completion_tokens"]) == (4321, 3)
    assert rows["alpha"]["usage_estimated"] == 0


def test_by_default_members_nobody_watches_are_asked_whole(service: Service, fake: FakeUpstream) -> None:
    """auto: a plain request (no live thinking, no partial answers) asks its members whole: one read each; a
    reasoning_content stream asks them streaming."""
    fake.configure(
        {
            "alpha": {"text": "Rayleigh scattering, mostly.", "prompt_tokens": 4321},
            "beta": {"text": "Short waves scatter."},
            "gamma": {"text": "Blue light bends more."},
            "judge": {"text": "Because of Rayleigh scattering."},
        }
    )
    body = service.chat("mom", messages=QUESTION).json()
    assert body["choices"][0]["message"]["content"] == "Because of Rayleigh scattering."
    asked = [e for e in fake.log() if e["model"] in ("alpha", "beta", "gamma")]
    assert len(asked) == 3 and all(e["stream"] is False for e in asked)
    alpha = members(body)["alpha"]
    assert (alpha["status"], alpha["usage"]["prompt_tokens"], alpha["usage_estimated"]) == ("ok", 4321, False)
    fake.clear_log()
    _, content = _reasoning_stream(service, "mom-reason")
    assert content == "Because of Rayleigh scattering."
    asked = [e for e in fake.log() if e["model"] in ("alpha", "beta", "gamma")]
    assert len(asked) == 3 and all(e["stream"] is True for e in asked)


# alpha writes its first sentence over a second, and its last after three; gamma writes between. beta fails at once.
STAGGERED = {
    "alpha": {
        "pieces": [
            {"text": "Alpha begins"},
            {"text": " here. ", "delay_ms": 1000},
            {"text": "Alpha ends.", "delay_ms": 2000},
        ]
    },
    "beta": {"status": 400, "error_message": "beta exploded"},  # not transient: it fails at once, no retry
    "gamma": {
        "ttft_ms": 500,
        "pieces": [
            {"text": "Gamma speaks. "},
            {"text": "Gamma ", "delay_ms": 1000},
            {"text": "ends.", "delay_ms": 500},
        ],
    },
    "judge": {"text": "Because of Rayleigh scattering."},
}


def _reasoning_stream(service: Service, model: str) -> tuple[list[str], str]:
    """The reasoning_content deltas, in the order they came through the openai client, and the content."""
    client = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0, timeout=30)
    reasoning: list[str] = []
    content = ""
    for chunk in client.chat.completions.create(model=model, messages=QUESTION, stream=True):  # type: ignore[arg-type]
        if chunk.choices:
            delta = chunk.choices[0].delta
            if getattr(delta, "reasoning_content", None):
                reasoning.append(delta.reasoning_content)  # type: ignore[attr-defined]
            content += delta.content or ""
    return reasoning, content


def test_reasoning_content_streams_the_members_as_they_write(service: Service, fake: FakeUpstream) -> None:
    fake.configure(STAGGERED)
    reasoning, content = _reasoning_stream(service, "mom-reason")
    assert content == "Because of Rayleigh scattering."
    beta, rest = "".join(reasoning).split("---\n", 1)
    assert beta.startswith("Model: beta\nStatus: error\nError: ") and "beta exploded" in beta
    # each part labelled; alpha's first sentence comes whole, between gamma's, before either has finished
    assert rest == (
        "Model: gamma\nContent: Gamma speaks.\n"
        "Model: alpha\nContent: Alpha begins here.\n"
        "Model: gamma (continued)\nGamma ends.\n---\n"
        "Model: alpha (continued)\nAlpha ends.\n---\n"
    )

    def first(text: str) -> int:
        return next(i for i, piece in enumerate(reasoning) if text in piece)

    # a delta of alpha's arrived before gamma finished, and gamma's before alpha did
    assert first("Gamma speaks.") < first("Alpha begins here.") < first("Gamma ends.") < first("Alpha ends.")
    assert all("Alpha begins here." in piece for piece in reasoning if "Alpha begins" in piece)


def test_think_tags_keep_one_block_per_member_sent_when_it_ends(service: Service, fake: FakeUpstream) -> None:
    fake.configure(STAGGERED)
    client = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="mom-think", messages=QUESTION, stream=True)  # type: ignore[arg-type]
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    thinking, answer = content.removeprefix("<think>\n").split("</think>\n\n")
    assert answer == "Because of Rayleigh scattering."
    assert thinking.count("Model: ") == 3
    # in the order they finished: beta at once, gamma after two seconds, alpha after three
    assert (
        thinking.index("Model: beta\nStatus: error") < thinking.index("Model: gamma") < thinking.index("Model: alpha")
    )
    assert "Model: gamma\nContent: Gamma speaks. Gamma ends.\n---\n" in thinking
    assert "Model: alpha\nContent: Alpha begins here. Alpha ends.\n---\n" in thinking


PRICE = {"input_per_million": "2", "output_per_million": "8"}
CUT = ["pa", "pb", "pc"]


@pytest.fixture(scope="module")
def partial(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    config: dict[str, Any] = {
        "llm_definitions": [llm(name, fake_server, retries=0, timeout=30, pricing=PRICE) for name in [*CUT, "pj"]],
        "models": [
            {
                "name": "quorum-partial",
                "llms_to_query": CUT,
                "concluding_llm": "pj",
                "quorum": 2,
                "partial_answers": True,
            },
            {
                "name": "deadline-partial",
                "llms_to_query": CUT,
                "concluding_llm": "pj",
                "member_deadline_ms": 1500,
                "partial_answers": True,
            },
            {"name": "quorum-whole", "llms_to_query": CUT, "concluding_llm": "pj", "quorum": 2, "stream_members": "on"},
        ],
    }
    return start_service(config, call_path.env)


# pa and pb answer after 0.8 s; pc has written a sentence and a half by then, and would take a minute for the rest
SLOW_WRITER = {
    "pa": {"text": "Alpha answer.", "ttft_ms": 800},
    "pb": {"text": "Beta answer.", "ttft_ms": 800},
    "pc": {
        "pieces": [
            {"text": "Partial start. "},
            {"text": "Then a half", "delay_ms": 300},
            {"text": " sentence never sent.", "delay_ms": 60000},
        ]
    },
    "pj": {"text": "Concluded."},
}
WRITTEN = "Partial start. Then a half"


@pytest.mark.parametrize(
    ("model", "reason"),
    [("quorum-partial", "cut off: the quorum of 2 had answered"), ("deadline-partial", "member_deadline_ms (1500)")],
)
def test_a_member_cut_off_gives_what_it_wrote_marked_partial(
    partial: Service, fake: FakeUpstream, model: str, reason: str
) -> None:
    fake.configure(SLOW_WRITER)
    response = partial.chat(model, messages=QUESTION)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Concluded."
    cut = members(body)["pc"]
    assert (cut["status"], cut["reason"], cut["partial"]) == ("cancelled", "cancelled", True)
    assert reason in cut["error"]
    assert members(body)["pa"]["partial"] is False
    fake.wait_for(lambda log: any(e["model"] == "pc" and e["outcome"] == "disconnected" for e in log))
    sent = next(e for e in fake.log() if e["model"] == "pc")
    assert sent["tokens_sent"] == 2  # the two pieces of WRITTEN, no more
    judge = next(e for e in fake.log() if e["model"] == "pj")
    panel = judge["body"]["messages"][-1]["content"]
    assert f'name="pc" status="cancelled" partial="true">\n(a partial answer: {cut["error"]};' in panel
    assert f"it stops where the member was cut off)\n{WRITTEN}\n</panel_answer>" in panel
    # what it streamed, counted exactly (our tokenizer); its input by our count: marked as an estimate
    assert cut["usage"]["completion_tokens"] == tokens(WRITTEN)
    assert cut["usage"]["prompt_tokens"] > 0 and cut["usage_estimated"] is True
    request_id = response.headers["x-request-id"]
    wait_until(lambda: "pc" in call_rows(partial, request_id))
    row = call_rows(partial, request_id)["pc"]
    assert (row["status"], row["completion_tokens"], row["usage_estimated"]) == ("cancelled", tokens(WRITTEN), 1)


def test_without_partial_answers_a_cut_member_gives_none_but_its_tokens_are_counted(
    partial: Service, fake: FakeUpstream
) -> None:
    fake.configure(SLOW_WRITER)
    body = partial.chat("quorum-whole", messages=QUESTION).json()
    cut = members(body)["pc"]
    assert (cut["status"], cut["partial"]) == ("cancelled", False)
    assert cut["usage"]["completion_tokens"] == tokens(WRITTEN)
    judge = next(e for e in fake.log() if e["model"] == "pj")
    panel = judge["body"]["messages"][-1]["content"]
    assert 'name="pc" status="cancelled">\n(no answer: cut off: the quorum of 2 had answered)' in panel
    assert "Partial start." not in panel
