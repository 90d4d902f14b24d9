"""The caller steers one request: the `mom` body field (the SDKs' `extra_body`) and the in-message `<<SYSTEM>>`
directive, within the operator's limits. Who was asked, and what each call received, is read from the fake
upstream's request log."""

from __future__ import annotations

import sqlite3
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.api.test_request_log import json_request_lines
from tests.conftest import TOKEN, Service, StartService, llm, wait_until
from tests.fake_upstream import FakeUpstream

PRICE = {"input_per_million": "1", "output_per_million": "2"}
MEMBERS = ["qa", "qb", "qc"]
QUESTION = "What is two plus two?"


@pytest.fixture(scope="module")
def steered(fake_server: FakeUpstream, start_service: StartService) -> Service:
    base = {"llms_to_query": MEMBERS, "concluding_llm": "qj"}
    config: dict[str, Any] = {
        "llm_definitions": [
            llm(name, fake_server, retries=0, timeout=10, pricing=PRICE) for name in [*MEMBERS, "qj", "qk", "qx"]
        ],
        "models": [
            {"name": "steer", **base, "overrides": {"allowed_llms": ["qk"]}},
            {"name": "steer-think", **base, "include_thinking_context": True},
            {"name": "locked", **base, "overrides": {"enabled": False}},
            {"name": "min-2", **base, "min_successful": 2},
            {
                "name": "sampled",
                "llms_to_query": [{"llm": "qa", "samples": 2}],
                "concluding_llm": "qj",
                "strategy": "best_of",
            },
        ],
    }
    return start_service(config, {"LOG_FORMAT": "json"})


@pytest.fixture(scope="module")
def cached(fake_server: FakeUpstream, start_service: StartService) -> Service:
    config: dict[str, Any] = {
        "llm_definitions": [llm(name, fake_server, pricing=PRICE) for name in [*MEMBERS, "qj"]],
        "models": [{"name": "steer", "llms_to_query": MEMBERS, "concluding_llm": "qj"}],
    }
    return start_service(config, {"MOM_CACHE_ENABLED": "true", "REDIS_URL": ""})


def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0)


def ask(service: Service, controls: dict[str, Any] | None = None, *, text: str = QUESTION, model: str = "steer") -> Any:
    extra = {"mom": controls} if controls is not None else None
    return client(service).chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], extra_body=extra
    )


def asked(fake: FakeUpstream) -> list[str]:
    """The LLMs the fake upstream was asked, sorted."""
    return sorted(entry["model"] for entry in fake.log())


def body_of(fake: FakeUpstream, name: str) -> dict[str, Any]:
    (entry,) = [e for e in fake.log() if e["model"] == name]
    body: dict[str, Any] = entry["body"]
    return body


def mom_of(completion: Any) -> dict[str, Any]:
    extra: dict[str, Any] = completion.model_extra["mom"]
    return extra


def refused(service: Service, controls: Any, *, text: str = QUESTION, model: str = "steer") -> dict[str, Any]:
    response = httpx.post(
        f"{service.base_url}/chat/completions",
        headers=service.headers(),
        json={"model": model, "messages": [{"role": "user", "content": text}], "mom": controls},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


# ----------------------------------------------------------------------------------------- each key of `mom`


def test_only_asks_just_those_members(steered: Service, fake: FakeUpstream) -> None:
    completion = ask(steered, {"only": ["qa"]})
    assert asked(fake) == ["qa", "qj"]
    mom = mom_of(completion)
    assert [m["name"] for m in mom["members"]] == ["qa"]
    assert mom["overrides"] == {"only": ["qa"]}
    assert mom["notices"] == []


def test_exclude_drops_members(steered: Service, fake: FakeUpstream) -> None:
    ask(steered, {"exclude": ["qb"]})
    assert asked(fake) == ["qa", "qc", "qj"]


def test_include_adds_an_allowed_llm(steered: Service, fake: FakeUpstream) -> None:
    completion = ask(steered, {"include": ["qk"]})
    assert asked(fake) == ["qa", "qb", "qc", "qj", "qk"]
    assert [m["name"] for m in mom_of(completion)["members"]] == [*MEMBERS, "qk"]


def test_only_then_exclude_then_include(steered: Service, fake: FakeUpstream) -> None:
    completion = ask(steered, {"include": ["qk"], "exclude": ["qa"], "only": ["qa", "qb"]})
    assert asked(fake) == ["qb", "qj", "qk"]
    assert mom_of(completion)["overrides"] == {"only": ["qa", "qb"], "exclude": ["qa"], "include": ["qk"]}


def test_concluding_chooses_who_concludes(steered: Service, fake: FakeUpstream) -> None:
    fake.configure({"qk": {"text": "Concluded by qk."}})
    completion = ask(steered, {"concluding": "qk"})
    assert completion.choices[0].message.content == "Concluded by qk."
    assert asked(fake) == ["qa", "qb", "qc", "qk"]
    assert "panel_answer" in body_of(fake, "qk")["messages"][-1]["content"]
    assert mom_of(completion)["concluding"]["name"] == "qk"


def test_thinking_turns_the_thinking_context_on_and_off(steered: Service, fake: FakeUpstream) -> None:
    fake.configure({"qj": {"text": "Four."}})
    tags = ask(steered, {"thinking": "think_tags"}).choices[0].message
    assert tags.content.startswith("<think>\nModel: q") and tags.content.endswith("</think>\n\nFour.")
    assert all(f"Model: {member}" in tags.content for member in MEMBERS)  # in the order they answered
    reasoning = ask(steered, {"thinking": "reasoning_content"}).choices[0].message
    assert reasoning.content == "Four."
    assert "Model: qb" in reasoning.model_extra["reasoning_content"]
    off = ask(steered, {"thinking": "off"}, model="steer-think").choices[0].message
    assert off.content == "Four."


def test_min_successful_is_the_callers(steered: Service, fake: FakeUpstream) -> None:
    fake.configure({"qa": {"status": 500}, "qb": {"status": 500}})
    assert ask(steered).choices[0].message.content  # one member is enough for the MoM model
    with pytest.raises(openai.APIStatusError) as failed:
        ask(steered, {"min_successful": 2})
    assert failed.value.status_code == 502
    assert "2 needed" in failed.value.message


def test_quorum_is_the_callers(steered: Service, fake: FakeUpstream) -> None:
    fake.configure({"qb": {"hang": True}, "qc": {"hang": True}})
    completion = ask(steered, {"quorum": 1})
    members = {m["name"]: m for m in mom_of(completion)["members"]}
    assert members["qa"]["status"] == "ok"
    assert members["qb"]["status"] == members["qc"]["status"] == "cancelled"
    assert "the quorum of 1 had answered" in members["qb"]["error"]


def test_member_deadline_is_the_callers(steered: Service, fake: FakeUpstream) -> None:
    fake.configure({"qc": {"hang": True}})
    completion = ask(steered, {"member_deadline_ms": 300})
    members = {m["name"]: m for m in mom_of(completion)["members"]}
    assert [members[n]["status"] for n in MEMBERS] == ["ok", "ok", "cancelled"]
    assert "member_deadline_ms (300) passed" in members["qc"]["error"]


def test_cache_off_asks_again(cached: Service, fake: FakeUpstream) -> None:
    text = "A question asked twice, the cache off."
    ask(cached, {"cache": "off"}, text=text)
    ask(cached, {"cache": "off"}, text=text)
    assert asked(fake).count("qj") == 2
    hit = "A question asked twice, the cache on."
    ask(cached, text=hit)  # the same, without the control: stored, then a hit
    wait_until(lambda: mom_of(ask(cached, text=hit))["cache"] == "hit")


def test_a_control_is_part_of_the_cache_key(cached: Service, fake: FakeUpstream) -> None:
    text = "Cached per panel."
    ask(cached, text=text)
    wait_until(lambda: mom_of(ask(cached, text=text))["cache"] == "hit")
    fake.clear_log()
    completion = ask(cached, {"only": ["qa"]}, text=text)
    assert mom_of(completion)["cache"] == "miss"
    assert asked(fake) == ["qj"]  # qa's own answer to this question is in the member cache


def test_max_cost_usd_that_cannot_be_read_is_refused(steered: Service, fake: FakeUpstream) -> None:
    error = refused(steered, {"max_cost_usd": "cheap"})
    assert (error["code"], error["param"]) == ("invalid_value", "mom.max_cost_usd")
    assert fake.log() == []


# --------------------------------------------------------------------------------------------- directives


def test_a_directive_steers_and_members_never_see_it(steered: Service, fake: FakeUpstream) -> None:
    text = f"<<SYSTEM>>\nonly: qa, qb\nAnswer in French, in one line.\n<</SYSTEM>>\n{QUESTION}"
    completion = ask(steered, text=text)
    assert asked(fake) == ["qa", "qb", "qj"]
    for member in ("qa", "qb"):
        messages = body_of(fake, member)["messages"]
        assert messages == [{"role": "user", "content": QUESTION}]
    concluding = body_of(fake, "qj")["messages"]
    assert concluding[0]["role"] == "system" and concluding[0]["content"].endswith("Answer in French, in one line.")
    assert concluding[1] == {"role": "user", "content": QUESTION}
    assert "SYSTEM" not in orjson.dumps(concluding).decode()
    assert mom_of(completion)["overrides"] == {"only": ["qa", "qb"], "instruction": True}


def test_each_key_works_as_a_directive(steered: Service, fake: FakeUpstream) -> None:
    fake.configure({"qk": {"text": "By qk."}, "qc": {"hang": True}})
    lines = "exclude: qa\ninclude: qk\nconcluding: qk\nthinking: think_tags\nmember_deadline_ms: 300\nquorum: 2"
    completion = ask(steered, text=f"<<SYSTEM>>\n{lines}\n<</SYSTEM>> {QUESTION}")
    assert asked(fake) == ["qb", "qc", "qk", "qk"]  # qk as a member and as the concluding LLM
    content = completion.choices[0].message.content
    assert content.startswith("<think>") and content.endswith("By qk.")
    mom = mom_of(completion)
    assert mom["overrides"] == {
        "exclude": ["qa"],
        "include": ["qk"],
        "concluding": "qk",
        "thinking": "think_tags",
        "quorum": 2,
        "member_deadline_ms": 300,
    }
    assert mom["notices"] == []


def test_the_body_wins_over_a_directive(steered: Service, fake: FakeUpstream) -> None:
    ask(steered, {"only": ["qb"]}, text=f"<<SYSTEM>>only: qa\n<</SYSTEM>>{QUESTION}")
    assert asked(fake) == ["qb", "qj"]


def test_an_earlier_directive_is_removed_but_not_applied(steered: Service, fake: FakeUpstream) -> None:
    messages = [
        {"role": "user", "content": "<<SYSTEM>>only: qa<</SYSTEM>> First question."},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": QUESTION},
    ]
    client(steered).chat.completions.create(model="steer", messages=messages)  # type: ignore[arg-type]
    assert asked(fake) == ["qa", "qb", "qc", "qj"]
    assert body_of(fake, "qb")["messages"][0] == {"role": "user", "content": "First question."}


def test_a_directive_inside_content_parts(steered: Service, fake: FakeUpstream) -> None:
    content = [{"type": "text", "text": "<<SYSTEM>>only: qc<</SYSTEM>>"}, {"type": "text", "text": QUESTION}]
    client(steered).chat.completions.create(
        model="steer",
        messages=[{"role": "user", "content": content}],  # type: ignore[misc,list-item]
    )
    assert asked(fake) == ["qc", "qj"]
    assert body_of(fake, "qc")["messages"][0]["content"] == QUESTION  # text parts alone are sent as one text


def test_a_message_that_is_only_a_directive_is_refused(steered: Service, fake: FakeUpstream) -> None:
    error = refused(steered, None, text="<<SYSTEM>>only: qa<</SYSTEM>>")
    assert error["code"] == "empty_message"
    assert fake.log() == []


# ----------------------------------------------------------------------------------------------- notices


def test_unknown_names_and_values_are_notices_with_suggestions(steered: Service, fake: FakeUpstream) -> None:
    completion = ask(steered, {"exclude": ["qcc"], "exlude": ["qa"], "thinking": "tags", "include": ["qkk"]})
    assert asked(fake) == ["qa", "qb", "qc", "qj"]
    assert mom_of(completion)["notices"] == [
        "mom.exlude: unknown key; ignored. Did you mean 'exclude'?",
        "mom.exclude: 'qcc' is not asked; ignored. Did you mean 'qc'?",
        "mom.include: unknown LLM 'qkk'; ignored. Did you mean 'qk'?",
        "mom.thinking: unknown value 'tags' (one of off, think_tags, reasoning_content); ignored. "
        "Did you mean 'think_tags'?",
    ]


def test_notices_head_the_thinking_context(steered: Service, fake: FakeUpstream) -> None:
    text = f"<<SYSTEM>>\nqourum: 2\n<</SYSTEM>>\n{QUESTION}"
    content = ask(steered, model="steer-think", text=text).choices[0].message.content
    assert content.startswith(
        "<think>\nNotices:\n- <<SYSTEM>> qourum: unknown key; ignored. Did you mean 'quorum'?\n---\nModel: q"
    )  # then the members' blocks, in the order they answered
    assert content.count("Notices:") == 1


def test_a_line_that_is_no_key_starts_the_instruction(steered: Service, fake: FakeUpstream) -> None:
    completion = ask(steered, text=f"<<SYSTEM>>Note: be brief.<</SYSTEM>>{QUESTION}")
    assert mom_of(completion)["notices"] == []
    assert body_of(fake, "qj")["messages"][0]["content"].endswith("Note: be brief.")


# --------------------------------------------------------------------------- what cannot run: 400, no call


@pytest.mark.parametrize(
    ("controls", "model", "code", "param"),
    [
        ({"exclude": MEMBERS}, "steer", "empty_panel", "mom"),
        ({"only": ["qz"]}, "steer", "empty_panel", "mom"),
        ({"min_successful": 4}, "steer", "empty_panel", "mom"),
        ({"only": ["qa"]}, "min-2", "empty_panel", "mom"),
        ({"include": ["qx"]}, "steer", "llm_not_allowed", "mom.include"),
        ({"concluding": "qx"}, "steer", "llm_not_allowed", "mom.concluding"),
        ({"include": ["qk"]}, "steer-think", "llm_not_allowed", "mom.include"),
        ({"only": ["qa"]}, "locked", "overrides_disabled", "mom"),
        ("qa", "steer", "invalid_type", "mom"),
    ],
)
def test_what_cannot_run_is_a_400_before_any_call(
    steered: Service, fake: FakeUpstream, controls: Any, model: str, code: str, param: str
) -> None:
    error = refused(steered, controls, model=model)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert fake.log() == []


def test_a_directive_on_a_locked_model_is_refused(steered: Service, fake: FakeUpstream) -> None:
    error = refused(steered, None, model="locked", text=f"<<SYSTEM>>only: qa<</SYSTEM>>{QUESTION}")
    assert error["code"] == "overrides_disabled"
    assert fake.log() == []


# ------------------------------------------------------------------------------------ records, other surfaces


def test_overrides_are_recorded_and_logged(steered: Service, fake: FakeUpstream) -> None:
    response = httpx.post(
        f"{steered.base_url}/chat/completions",
        headers=steered.headers(),
        json={"model": "steer", "messages": [{"role": "user", "content": QUESTION}], "mom": {"exclude": ["qc"]}},
        timeout=30,
    )
    request_id = response.headers["x-request-id"]
    with sqlite3.connect(steered.workdir / "data" / "mom.db") as db:
        select = "SELECT overrides FROM mom_requests WHERE id = ?"
        wait_until(lambda: db.execute(select, (request_id,)).fetchone() is not None)
        (overrides,) = db.execute(select, (request_id,)).fetchone()
    assert orjson.loads(overrides) == {"exclude": ["qc"]}
    wait_until(lambda: any(line["request_id"] == request_id for line in json_request_lines(steered)))
    (line,) = [line for line in json_request_lines(steered) if line["request_id"] == request_id]
    assert line["overrides"] == {"exclude": ["qc"]}


def test_anthropic_messages_take_the_controls(steered: Service, fake: FakeUpstream) -> None:
    claude = anthropic.Anthropic(base_url=steered.url, api_key=TOKEN, max_retries=0)
    message = claude.messages.create(
        model="steer",
        max_tokens=256,
        messages=[{"role": "user", "content": f"<<SYSTEM>>exclude: qa<</SYSTEM>>{QUESTION}"}],
        extra_body={"mom": {"include": ["qk"]}},
    )
    assert asked(fake) == ["qb", "qc", "qj", "qk"]
    assert body_of(fake, "qb")["messages"] == [{"role": "user", "content": QUESTION}]
    assert message.model_extra is not None
    assert message.model_extra["mom"]["overrides"] == {"exclude": ["qa"], "include": ["qk"]}
    with pytest.raises(anthropic.BadRequestError) as failed:
        claude.messages.create(
            model="steer",
            max_tokens=256,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"mom": {"include": ["qx"]}},
        )
    assert failed.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": failed.value.body["error"]["message"]},  # type: ignore[index]
    }
    assert "qx" in failed.value.message


def test_responses_take_the_controls(steered: Service, fake: FakeUpstream) -> None:
    response = client(steered).responses.create(
        model="steer", input=f"<<SYSTEM>>concluding: qk<</SYSTEM>>{QUESTION}", extra_body={"mom": {"only": ["qc"]}}
    )
    assert asked(fake) == ["qc", "qk"]
    assert response.model_extra is not None
    assert response.model_extra["mom"]["overrides"] == {"only": ["qc"], "concluding": "qk"}
    with pytest.raises(openai.BadRequestError) as failed:
        client(steered).responses.create(model="steer", input=QUESTION, extra_body={"mom": {"exclude": MEMBERS}})
    assert failed.value.code == "empty_panel"


def test_the_model_list_shows_each_models_panel_and_whether_it_may_be_steered(steered: Service) -> None:
    models = {m.id: m.model_extra or {} for m in client(steered).models.list()}
    assert models["steer"]["panel"] == {
        "members": MEMBERS,
        "concluding_llm": "qj",
        "strategy": "synthesize",
        "steerable": True,
    }
    assert models["locked"]["panel"]["steerable"] is False
    assert models["sampled"]["panel"] == {
        "members": ["qa#1", "qa#2"],
        "concluding_llm": "qj",
        "strategy": "best_of",
        "steerable": True,
    }
    one = httpx.get(f"{steered.base_url}/models/min-2", headers=steered.headers()).json()
    assert one["panel"]["members"] == MEMBERS and one["panel"]["steerable"] is True
