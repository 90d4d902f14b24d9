"""The synthesis strategies (docs/strategies): rank, best_of and vote, asserted from the fake upstream's log (who
was asked what, in which stage, under which anonymous labels) and from the breakdown, on every surface."""

from __future__ import annotations

import re
import sqlite3
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import TOKEN, Service, StartService, llm, wait_until
from tests.fake_upstream import FakeUpstream

PRICE = {"input_per_million": "2", "output_per_million": "8"}
MEMBERS = ["m-alpha", "m-beta", "m-gamma"]
TEXTS = {"m-alpha": "Paris, on the Seine.", "m-beta": "Lyon, I believe.", "m-gamma": "It is Paris."}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
RESPONSE = re.compile(r'<response label="Response ([A-Z])">\n(.*?)\n</response>', re.DOTALL)


@pytest.fixture(scope="module")
def strategic(fake_server: FakeUpstream, start_service: StartService) -> Service:
    names = [*MEMBERS, "s-judge", "s-ranker"]
    panel = {"llms_to_query": MEMBERS, "concluding_llm": "s-judge"}
    config: dict[str, Any] = {
        "llm_definitions": [llm(name, fake_server, retries=0, timeout=10, pricing=PRICE) for name in names],
        "models": [
            {"name": "plain", **panel},
            {"name": "ranked", **panel, "strategy": "rank", "include_thinking_context": True},
            {"name": "ranked-by", **panel, "strategy": "rank", "rankers": ["s-ranker", "m-alpha"]},
            {"name": "best", **panel, "strategy": "best_of"},
            {"name": "voted", **panel, "strategy": "vote"},
            {"name": "voted-pattern", **panel, "strategy": "vote", "vote_pattern": r"ANSWER:\s*(\S+)"},
            {
                "name": "sampled",
                "llms_to_query": [{"llm": "m-alpha", "samples": 3, "temperature": 0.7}, "m-beta"],
                "concluding_llm": "s-judge",
                "strategy": "vote",
            },
            {"name": "layered", **panel, "strategy": "layers", "include_thinking_context": True},
            {"name": "layered-3", **panel, "strategy": "layers", "layers": 3, "quorum": 2},
            {"name": "ranked-apart", **panel, "strategy": "rank", "rankers": ["s-ranker", "s-judge"]},
        ],
    }
    return start_service(config, {})


def client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0, timeout=30)


def last_user(entry: dict[str, Any]) -> str:
    content = [m for m in entry["body"]["messages"] if m["role"] == "user"][-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def labels_of(entry: dict[str, Any]) -> dict[str, str]:
    """The anonymous labels of a ranking or judging prompt, each with the member whose answer it shows."""
    by_text = {text: name for name, text in TEXTS.items()}
    return {letter: by_text[text] for letter, text in RESPONSE.findall(last_user(entry))}


def configure(fake: FakeUpstream, **extra: dict[str, Any]) -> None:
    fake.configure(
        {name: {"text": TEXTS[name], **extra.get(name, {})} for name in MEMBERS}
        | {k: v for k, v in extra.items() if k not in MEMBERS}
    )


def stage_of(entry: dict[str, Any]) -> str:
    asked = last_user(entry)
    return "rank" if "RANKING:" in asked else "judge" if "BEST:" in asked else "answer"


def expected_borda(rankings: dict[str, list[str]], labels: dict[str, str]) -> dict[str, int]:
    scores = dict.fromkeys(MEMBERS, 0)
    for ranker, ranking in rankings.items():
        candidates = [letter for letter, name in labels.items() if name != ranker]
        ranked = [letter for letter in ranking if letter in candidates]
        for place, letter in enumerate(ranked):
            scores[labels[letter]] += len(candidates) - 1 - place
    return scores


def test_rank_members_rank_anonymized_answers_and_the_synthesis_follows_the_borda_count(
    strategic: Service, fake: FakeUpstream
) -> None:
    rankings = {"m-alpha": ["A", "B", "C"], "m-beta": ["C", "B", "A"], "m-gamma": ["B", "A", "C"]}
    configure(
        fake, **{name: {"ranking": ranking} for name, ranking in rankings.items()}, **{"s-judge": {"text": "Paris."}}
    )
    reply = client(strategic).chat.completions.create(model="ranked", messages=QUESTION)  # type: ignore[arg-type]
    log = fake.log()
    assert sorted((e["model"], stage_of(e)) for e in log) == sorted(
        [*((m, "answer") for m in MEMBERS), *((m, "rank") for m in MEMBERS), ("s-judge", "answer")]
    )
    rank_calls = [e for e in log if stage_of(e) == "rank"]
    shown = [labels_of(e) for e in rank_calls]
    # one anonymous labelling of the three answers, the same for every ranker; no member's name in what they read
    assert all(labels == shown[0] for labels in shown) and sorted(shown[0]) == ["A", "B", "C"]
    assert sorted(shown[0].values()) == sorted(MEMBERS)
    assert not any(name in last_user(e) for e in rank_calls for name in MEMBERS)
    assert all("RANKING: Response A, Response B, Response C" in last_user(e) for e in rank_calls)
    scores = expected_borda(rankings, shown[0])
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert mom["strategy"] == "rank"
    assert {entry["name"]: entry["score"] for entry in mom["ranking"]} == scores
    assert [entry["score"] for entry in mom["ranking"]] == sorted(scores.values(), reverse=True)
    assert mom["ranking"][0]["rank"] == 1
    # the concluding LLM reads the answers best first, each with its rank and score
    concluding = next(e for e in log if e["model"] == "s-judge")
    block = last_user(concluding)
    order = list(re.findall(r'name="([^"]+)" status="ok" rank', block))
    assert order == [entry["name"] for entry in mom["ranking"]]
    for entry in mom["ranking"]:
        assert f'name="{entry["name"]}" status="ok" rank="{entry["rank"]}" score="{entry["score"]}"' in block
    # every stage's calls in the breakdown, with their stage and cost
    assert [m["stage"] for m in mom["members"]] == ["answer"] * 3
    assert sorted((c["name"], c["stage"], c["status"]) for c in mom["stage_calls"]) == [
        (m, "rank", "ok") for m in MEMBERS
    ]
    assert mom["concluding"]["stage"] == "conclude"
    calls = [*mom["members"], *mom["stage_calls"], mom["concluding"]]
    assert Decimal(str(mom["cost"])) == sum((Decimal(str(c["cost"])) for c in calls), Decimal(0))
    # the thinking context shows the rankings and the Borda count
    content = reply.choices[0].message.content or ""
    assert content.endswith("Paris.") and "Rankings (" in content and "Borda count" in content
    for ranker, ranking in rankings.items():
        assert f"- {ranker}: " + ", ".join(f"Response {x}" for x in ranking) in content


def test_configured_rankers_and_self_votes(strategic: Service, fake: FakeUpstream) -> None:
    configure(fake, **{"m-alpha": {"ranking": ["A", "B", "C"]}, "s-ranker": {"ranking": ["C", "A", "B"]}})
    reply = client(strategic).chat.completions.create(model="ranked-by", messages=QUESTION)  # type: ignore[arg-type]
    log = fake.log()
    assert sorted(e["model"] for e in log if stage_of(e) == "rank") == ["m-alpha", "s-ranker"]
    labels = labels_of(next(e for e in log if stage_of(e) == "rank"))
    scores = expected_borda({"m-alpha": ["A", "B", "C"], "s-ranker": ["C", "A", "B"]}, labels)
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert {entry["name"]: entry["score"] for entry in mom["ranking"]} == scores
    assert {c["name"]: c["stage"] for c in mom["stage_calls"]} == {"m-alpha": "rank", "s-ranker": "rank"}


def test_a_ranking_that_cannot_be_read_counts_for_nothing(strategic: Service, fake: FakeUpstream) -> None:
    configure(fake, **{"m-alpha": {"ranking": ["Z", "B", "B"]}})  # an unknown label, a repeated one; the others none
    reply = client(strategic).chat.completions.create(model="ranked", messages=QUESTION)  # type: ignore[arg-type]
    labels = labels_of(next(e for e in fake.log() if stage_of(e) == "rank"))
    mom = reply.model_extra["mom"]  # type: ignore[index]
    expected = expected_borda({"m-alpha": ["B"]}, labels)
    assert {entry["name"]: entry["score"] for entry in mom["ranking"]} == expected


@pytest.mark.parametrize("stream", [False, True])
def test_best_of_returns_the_picked_answer_verbatim(strategic: Service, fake: FakeUpstream, stream: bool) -> None:
    configure(fake, **{"s-judge": {"pick": "B"}})
    if stream:
        chunks = client(strategic).chat.completions.create(
            model="best",
            messages=QUESTION,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        pieces, mom = [], None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            mom = (chunk.model_extra or {}).get("mom") or mom
        content = "".join(pieces)
        assert len(pieces) > 1  # streamed in pieces
    else:
        reply = client(strategic).chat.completions.create(model="best", messages=QUESTION)  # type: ignore[arg-type]
        content, mom = reply.choices[0].message.content, reply.model_extra["mom"]  # type: ignore[index]
    log = fake.log()
    judge = [e for e in log if e["model"] == "s-judge"]
    assert [stage_of(e) for e in judge] == ["judge"]
    labels = labels_of(judge[0])
    assert sorted(labels.values()) == sorted(MEMBERS)
    assert mom is not None and mom["selected"] == labels["B"] and content == TEXTS[labels["B"]]
    assert mom["concluding"]["name"] == "s-judge" and mom["concluding"]["stage"] == "judge"
    assert mom["strategy"] == "best_of"


def test_vote_majority_returns_a_members_whole_answer(strategic: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {
            "m-alpha": {"text": "Six times seven.\n**42**"},
            "m-beta": {"text": "Let me think.\nThe answer is 42.0"},
            "m-gamma": {"text": "41"},
        }
    )
    reply = client(strategic).chat.completions.create(model="voted", messages=QUESTION)  # type: ignore[arg-type]
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert reply.choices[0].message.content == "Six times seven.\n**42**"
    assert mom["selected"] == "m-alpha" and mom["strategy"] == "vote"
    assert mom["votes"] == [
        {"answer": "42", "count": 2, "members": ["m-alpha", "m-beta"]},
        {"answer": "41", "count": 1, "members": ["m-gamma"]},
    ]
    assert not any(e["model"] == "s-judge" for e in fake.log())  # the vote decided: no concluding call
    assert mom["concluding"]["status"] == "skipped"


def test_vote_with_a_pattern_and_a_tie_goes_to_the_judge(strategic: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {
            "m-alpha": {"text": "ANSWER: 7"},
            "m-beta": {"text": "ANSWER: 8 (or so)"},
            "m-gamma": {"text": "no idea"},  # no vote
            "s-judge": {"pick": "A"},
        }
    )
    reply = client(strategic).chat.completions.create(
        model="voted-pattern",
        messages=QUESTION,  # type: ignore[arg-type]
    )
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert [(v["answer"], v["count"]) for v in mom["votes"]] == [("7", 1), ("8", 1)]
    judge = next(e for e in fake.log() if e["model"] == "s-judge")
    shown = dict(RESPONSE.findall(last_user(judge)))
    assert sorted(shown.values()) == ["ANSWER: 7", "ANSWER: 8 (or so)"]  # the tied answers only
    picked = {"ANSWER: 7": "m-alpha", "ANSWER: 8 (or so)": "m-beta"}[shown["A"]]
    assert mom["selected"] == picked and reply.choices[0].message.content == shown["A"]


def test_the_request_chooses_the_strategy(strategic: Service, fake: FakeUpstream) -> None:
    configure(fake, **{"s-judge": {"pick": "C"}})
    reply = client(strategic).chat.completions.create(
        model="plain",
        messages=QUESTION,
        extra_body={"mom": {"strategy": "best_of"}},  # type: ignore[arg-type]
    )
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert mom["strategy"] == "best_of" and mom["overrides"] == {"strategy": "best_of"}
    assert reply.choices[0].message.content == TEXTS[mom["selected"]]
    fake.clear_log()
    typo = client(strategic).chat.completions.create(
        model="plain",
        messages=QUESTION,
        extra_body={"mom": {"strategy": "rnak"}},  # type: ignore[arg-type]
    )
    mom = typo.model_extra["mom"]  # type: ignore[index]
    assert mom["strategy"] == "synthesize"
    assert any("mom.strategy: unknown value 'rnak'" in n and "Did you mean 'rank'?" in n for n in mom["notices"])


def test_with_tools_the_answer_is_synthesized(strategic: Service, fake: FakeUpstream) -> None:
    configure(fake, **{"s-judge": {"text": "Synthesized."}})
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    reply = client(strategic).chat.completions.create(
        model="best",
        messages=QUESTION,
        tools=tools,  # type: ignore[arg-type]
    )
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert reply.choices[0].message.content == "Synthesized." and mom["strategy"] == "synthesize"
    assert any("strategy: 'best_of' does not apply to a request with tools" in n for n in mom["notices"])


def test_anthropic_messages_surface(strategic: Service, fake: FakeUpstream) -> None:
    configure(fake, **{"s-judge": {"pick": "A"}})
    sdk = anthropic.Anthropic(base_url=strategic.url, api_key=TOKEN, max_retries=0, timeout=30)
    message = sdk.messages.create(model="best", max_tokens=100, messages=QUESTION)  # type: ignore[arg-type]
    mom = (message.model_extra or {})["mom"]
    judge = next(e for e in fake.log() if e["model"] == "s-judge")
    assert mom["selected"] == labels_of(judge)["A"]
    assert message.content[0].text == TEXTS[mom["selected"]]  # type: ignore[union-attr]


def test_responses_surface_streamed(strategic: Service, fake: FakeUpstream) -> None:
    fake.configure({"m-alpha": {"text": "x\n12"}, "m-beta": {"text": "12"}, "m-gamma": {"text": "13"}})
    stream = client(strategic).responses.create(model="voted", input="How many months?", stream=True)
    text, body = [], None
    for event in stream:
        if event.type == "response.output_text.delta":
            text.append(event.delta)
        if event.type == "response.completed":
            body = event.response
    assert "".join(text) == "x\n12"
    assert body is not None and (body.model_extra or {})["mom"]["selected"] == "m-alpha"


def test_the_stage_of_each_call_in_the_usage_records(strategic: Service, fake: FakeUpstream) -> None:
    configure(fake, **{name: {"ranking": ["A", "B", "C"]} for name in MEMBERS})
    raw = client(strategic).chat.completions.with_raw_response.create(
        model="ranked",
        messages=QUESTION,  # type: ignore[arg-type]
    )
    request_id = raw.headers["x-request-id"]
    with sqlite3.connect(strategic.workdir / "data" / "mom.db") as db:
        query = f"SELECT llm, role, stage FROM mom_calls WHERE request_id = '{request_id}'"

        def recorded() -> bool:
            return len(db.execute(query).fetchall()) == 7

        wait_until(recorded)
        rows = sorted(db.execute(query).fetchall())
    assert rows == sorted(
        [
            *((m, "member", "answer") for m in MEMBERS),
            *((m, "ranker", "rank") for m in MEMBERS),
            ("s-judge", "concluding", "conclude"),
        ]
    )


def references_in(entry: dict[str, Any]) -> str | None:
    """The references a member got (the system message it reads last), if any."""
    last = entry["body"]["messages"][-1]
    return last["content"] if last["role"] == "system" and "as references" in last["content"] else None


def test_layers_the_second_round_sees_the_first_rounds_answers(strategic: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {name: {"texts": [f"{name} first.", f"{name} second."]} for name in MEMBERS} | {"s-judge": {"text": "Done."}}
    )
    reply = client(strategic).chat.completions.create(model="layered", messages=QUESTION)  # type: ignore[arg-type]
    log = fake.log()
    for name in MEMBERS:
        first, second = [e for e in log if e["model"] == name]  # (a member's second call waits for every first)
        assert references_in(first) is None
        seen = references_in(second)
        assert seen is not None and all(f"{other} first." in seen for other in MEMBERS)
    concluding = last_user(next(e for e in log if e["model"] == "s-judge"))
    assert all(f"{name} second." in concluding and f"{name} first." not in concluding for name in MEMBERS)
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert mom["strategy"] == "layers"
    assert sorted((m["name"], m["stage"], m["status"]) for m in mom["members"]) == [
        (name, "round-2", "ok") for name in MEMBERS
    ]
    assert sorted((c["name"], c["stage"]) for c in mom["stage_calls"]) == [(name, "answer") for name in MEMBERS]
    calls = [*mom["members"], *mom["stage_calls"], mom["concluding"]]
    assert Decimal(str(mom["cost"])) == sum((Decimal(str(c["cost"])) for c in calls), Decimal(0))
    content = reply.choices[0].message.content or ""
    assert "Model: m-alpha (round-2)\nContent: m-alpha second." in content and content.endswith("Done.")


def test_layers_apply_the_panel_rules_each_round(strategic: Service, fake: FakeUpstream) -> None:
    fake.configure(
        {
            "m-alpha": {"texts": ["A1", "A2", "A3"]},
            "m-beta": {"texts": ["B1", "B2", "B3"]},
            "m-gamma": {"hang": True},  # cut off by the quorum of 2 in every round
            "s-judge": {"text": "Done."},
        }
    )
    reply = client(strategic).chat.completions.create(model="layered-3", messages=QUESTION)  # type: ignore[arg-type]
    log = fake.log()
    alpha = [e for e in log if e["model"] == "m-alpha"]
    assert len(alpha) == 3  # (m-gamma's calls may be cut before they reach the fake: not counted)
    third = references_in(alpha[2])
    assert third is not None and "A2" in third and "B2" in third and "A1" not in third
    mom = reply.model_extra["mom"]  # type: ignore[index]
    rounds = sorted((c["name"], c["stage"], c["status"]) for c in [*mom["members"], *mom["stage_calls"]])
    assert rounds == sorted(
        (name, stage, "cancelled" if name == "m-gamma" else "ok")
        for name in MEMBERS
        for stage in ("answer", "round-2", "round-3")
    )
    assert all("quorum of 2" in m["error"] for m in [*mom["members"], *mom["stage_calls"]] if m["name"] == "m-gamma")
    with sqlite3.connect(strategic.workdir / "data" / "mom.db") as db:
        query = "SELECT count(*) FROM mom_calls WHERE stage = 'round-3' AND llm = 'm-alpha'"
        wait_until(lambda: db.execute(query).fetchone()[0] >= 1)


def test_one_llm_sampled_n_times_is_a_panel(strategic: Service, fake: FakeUpstream) -> None:
    fake.configure({"m-alpha": {"texts": ["x\n12", "y\n12", "z\n13"]}, "m-beta": {"text": "13"}})
    reply = client(strategic).chat.completions.create(
        model="sampled",
        messages=QUESTION,
        temperature=0.2,  # type: ignore[arg-type]
    )
    log = fake.log()
    alpha = [e for e in log if e["model"] == "m-alpha"]
    assert len(alpha) == 3 and all(e["body"]["temperature"] == 0.7 for e in alpha)  # each sample: its temperature
    assert [e["body"]["temperature"] for e in log if e["model"] == "m-beta"] == [0.2]  # the others: the request's
    mom = reply.model_extra["mom"]  # type: ignore[index]
    assert [m["name"] for m in mom["members"]] == ["m-alpha#1", "m-alpha#2", "m-alpha#3", "m-beta"]
    assert all(m["status"] == "ok" and m["stage"] == "answer" and m["cost"] > 0 for m in mom["members"])
    # which sample got which text depends on the order the calls arrived in: the vote is 12 (2) against 13 (2)
    assert sorted((v["answer"], v["count"]) for v in mom["votes"]) == [("12", 2), ("13", 2)]


# ------------------------------------------------------------------------------------------------ the cost cap
# Every LLM here has no output ceiling of its own (4096, LiteLLM's default) and costs $2/M in, $8/M out: a member's
# worst case is about $0.033, a ranking's (1024 tokens, reading the three answers at their ceilings) about $0.033,
# the concluding call's about $0.058. Synthesized, the panel's worst case is about $0.156; ranked, about $0.255;
# in two layers, about $0.33. The estimates are asserted by the unit tests to the digit; here, what they decide.


def capped_ask(service: Service, model: str, cap: str) -> dict[str, Any]:
    reply = client(service).chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"mom": {"max_cost_usd": cap}},
    )
    mom: dict[str, Any] = reply.model_extra["mom"]  # type: ignore[index]
    assert Decimal(str(mom["cost"])) <= Decimal(cap)
    return mom


def dropped(mom: dict[str, Any]) -> list[str]:
    return [m["name"] for m in mom["members"] if m["status"] == "skipped" and m["reason"] == "cost_cap"]


@pytest.mark.parametrize(("model", "stage"), [("ranked", "rank"), ("layered", "round-2")])
def test_the_strategys_stages_count_in_the_cap(strategic: Service, fake: FakeUpstream, model: str, stage: str) -> None:
    configure(fake, **{name: {"ranking": ["A", "B", "C"]} for name in MEMBERS})
    # $0.2 is enough for the whole panel synthesized, not for its rankings or its second round
    assert dropped(capped_ask(strategic, "plain", "0.2")) == []
    fake.clear_log()
    mom = capped_ask(strategic, model, "0.2")
    left = [name for name in MEMBERS if name not in dropped(mom)]
    assert dropped(mom) and left  # the dearest (all alike here: the later first) dropped up front, never asked
    asked = sorted(e["model"] for e in fake.log() if e["model"] in MEMBERS)
    assert asked == sorted(left * 2)  # each member kept answers, then ranks or answers again
    made = [(c["name"], c["stage"]) for c in [*mom["members"], *mom["stage_calls"]] if c["status"] == "ok"]
    assert sorted(made) == sorted([*((name, "answer") for name in left), *((name, stage) for name in left)])
    assert mom["concluding"]["status"] == "ok"
    # every call went out with its ceiling: the rankings at 1024, the others at 4096
    ceilings = {(e["model"], stage_of(e)): e["body"]["max_tokens"] for e in fake.log()}
    assert set(ceilings.values()) <= {1024, 4096}
    assert all(ceiling == 1024 for (_, asked_for), ceiling in ceilings.items() if asked_for == "rank")


def test_a_ranking_left_too_little_at_run_time_is_not_made(strategic: Service, fake: FakeUpstream) -> None:
    # The estimate fits ($0.22 under $0.3), but each member's provider counts 49166 prompt tokens (ours: a few
    # dozen): the panel costs $0.295, which leaves the first ranker about $0.0045, all it may write (about 560 tokens
    # of its 1024), and the second nothing. The concluding call gets what the ranking did not spend.
    configure(
        fake,
        **{name: {"prompt_tokens": 49166} for name in MEMBERS},
        **{"s-ranker": {"ranking": ["B", "A", "C"]}, "s-judge": {"text": "Paris."}},
    )
    mom = capped_ask(strategic, "ranked-apart", "0.3")
    assert dropped(mom) == []
    rankings = {c["name"]: c for c in mom["stage_calls"]}
    assert rankings["s-ranker"]["status"] == "ok"
    assert (rankings["s-judge"]["status"], rankings["s-judge"]["reason"]) == ("skipped", "cost_cap")
    assert "cost cap of $0.3" in rankings["s-judge"]["error"]
    asked = [(e["model"], stage_of(e), e["body"].get("max_tokens")) for e in fake.log() if e["model"].startswith("s-")]
    ranking = next(ceiling for model, stage, ceiling in asked if stage == "rank")
    assert [(model, stage) for model, stage, _ in asked] == [("s-ranker", "rank"), ("s-judge", "answer")]
    assert 16 <= ranking < 1024
    assert mom["concluding"]["status"] == "ok" and mom["ranking"][0]["score"] == 2
