"""The cost cap's arithmetic: each call's worst case, the plan's estimate, who is dropped, the 400s, the concluding
call's output ceiling from what is left; and each LLM's output ceiling (config, LiteLLM's model info, 4096). Token
counts are given (10 a message) so that every amount is exact."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from mom_service.config import MoMConfig, parse_config
from mom_service.engine.cost_cap import (
    MIN_ANSWER_TOKENS,
    CallCost,
    Room,
    Stages,
    capped,
    estimate,
    fit,
    room,
    worst_case,
)
from mom_service.engine.plan import Plan
from mom_service.engine.planning import make_plan
from mom_service.errors import InvalidRequest
from mom_service.providers.capabilities import DEFAULT_MAX_OUTPUT, max_output
from mom_service.providers.pricing import Prices, build_price_book

M = Decimal(1_000_000)


def prices(input_per_million: str, output_per_million: str, reasoning_per_million: str | None = None) -> Prices:
    output = Decimal(output_per_million) / M
    reasoning = Decimal(reasoning_per_million) / M if reasoning_per_million is not None else output
    return Prices(Decimal(input_per_million) / M, output, reasoning, Decimal(input_per_million) / M, "config")


def ten_a_message(model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    return 10 * len(messages) + (5 if tools else 0)


def definition(name: str, ceiling: int, input_per_million: str, output_per_million: str, **more: Any) -> dict[str, Any]:
    pricing = {"input_per_million": input_per_million, "output_per_million": output_per_million}
    return {
        "name": name,
        "model": f"openai/{name}",
        "api_base": "http://fake/v1",
        "params": {"max_tokens": ceiling},
        "pricing": pricing | more,
    }


def config(cap: str | None, min_successful: int = 1, **more: Any) -> MoMConfig:
    # worst cases: a 10 x $10/M + 100 x $100/M = $0.0101; b 10 x $10/M + 200 x $100/M = $0.0201;
    # c 10 x $10/M + 300 x $50/M = $0.0151; j reads 30 tokens (3 messages) and the answers (600) at $1/M and
    # writes 1000 at $10/M: $0.01063. In all: $0.05593
    return parse_config(
        {
            "llm_definitions": [
                definition("a", 100, "10", "100"),
                definition("b", 200, "10", "100"),
                definition("c", 300, "10", "50"),
                definition("j", 1000, "1", "10"),
                definition("k", 1000, "1", "10", reasoning_per_million="40"),
                {"name": "free", "model": "openai/free", "api_base": "http://fake/v1"},
            ],
            "models": [
                {
                    "name": "mom",
                    "llms_to_query": ["a", "b", "c"],
                    "concluding_llm": "j",
                    "min_successful": min_successful,
                    "max_cost_usd": cap,
                }
                | more
            ],
        },
        "<test>",
    )


def plan_of(made: MoMConfig, final_params: dict[str, Any] | None = None) -> Plan:
    return make_plan(
        made,
        made.models[0],
        [{"role": "user", "content": "How much?"}],
        {"temperature": 0.2},
        vision={d.name: False for d in made.llm_definitions},
        has_images=False,
        request_id="r",
        stream=False,
        final_params=final_params,
    )


def under_cap(made: MoMConfig, final_params: dict[str, Any] | None = None) -> Plan:
    ceilings = {d.name: max_output(d, None) for d in made.llm_definitions}
    return capped(plan_of(made, final_params), build_price_book(made, lambda model: None), ceilings, ten_a_message)


def test_the_estimate_is_every_members_worst_case_and_the_dearest_concluding_calls() -> None:
    a = CallCost(10, 100, prices("10", "100"))
    b = CallCost(10, 200, prices("10", "100"))
    j = CallCost(30, 1000, prices("1", "10"))
    dear = CallCost(30, 1000, prices("1", "20"))
    assert a.worst() == Decimal("0.0101")
    assert j.worst(300) == Decimal("0.01033")  # reading both answers at their ceilings
    assert estimate([a, b], [j]) == Decimal("0.0101") + Decimal("0.0201") + Decimal("0.01033")
    assert estimate([a, b], [j, dear]) == Decimal("0.0101") + Decimal("0.0201") + Decimal("0.02033")


def test_reasoning_is_priced_at_the_dearer_of_output_and_reasoning() -> None:
    assert CallCost(0, 1000, prices("0", "10", "40")).worst() == Decimal("0.04")
    assert CallCost(0, 1000, prices("0", "10", "5")).worst() == Decimal("0.01")


def test_the_most_expensive_members_are_dropped_first_while_enough_remain() -> None:
    members = [CallCost(10, 100, prices("10", "100")), CallCost(10, 200, prices("10", "100"))]
    members.append(CallCost(10, 300, prices("10", "50")))
    concluding = [CallCost(30, 1000, prices("1", "10"))]
    assert fit(members, concluding, Decimal("0.06"), 1) == ([], Decimal("0.05593"))
    assert fit(members, concluding, Decimal("0.04"), 1) == ([1], Decimal("0.03563"))
    assert fit(members, concluding, Decimal("0.03"), 1) == ([1, 2], Decimal("0.02023"))
    # min_successful 2: c cannot go; the estimate of the smallest plan allowed is over the cap
    assert fit(members, concluding, Decimal("0.03"), 2) == ([1], Decimal("0.03563"))
    # even one member is too many: nothing below min_successful
    assert fit(members, concluding, Decimal("0.02"), 1) == ([1, 2], Decimal("0.02023"))


def test_of_two_members_alike_the_later_one_goes() -> None:
    same = CallCost(10, 100, prices("10", "100"))
    assert fit([same, same, same], [CallCost(0, 0, prices("0", "0"))], Decimal("0.0202"), 1) == ([2], Decimal("0.0202"))


def test_a_capped_plan_drops_members_and_sends_every_ceiling() -> None:
    plan = under_cap(config("0.04"))
    a, b, c = plan.members
    assert b.skipped_kind == "cost_cap" and b.skipped is not None and "cost cap of $0.04" in b.skipped
    assert "$0.0201" in b.skipped
    assert (a.skipped, c.skipped) == (None, None)
    assert a.params == {"temperature": 0.2, "max_tokens": 100} and c.params["max_tokens"] == 300
    assert [c.ceiling for c in plan.concluders] == [1000]


def test_the_clients_limit_lowers_the_concluding_ceiling() -> None:
    # j writes at most 400: $0.004, not $0.01; with a and c: $0.0101 + $0.0151 + (30 + 400) x $1/M + $0.004
    plan = under_cap(config("0.03"), {"max_completion_tokens": 400})
    assert [m.skipped_kind for m in plan.members if m.skipped] == ["cost_cap"]
    assert plan.concluders[0].ceiling == 400


def test_no_cap_no_change() -> None:
    made = config(None)
    plan = plan_of(made)
    assert capped(plan, build_price_book(made, lambda model: None), {}, ten_a_message) is plan


def test_a_cap_even_the_smallest_plan_exceeds_is_a_400_with_the_estimate() -> None:
    with pytest.raises(InvalidRequest) as caught:
        under_cap(config("0.03", min_successful=2))
    assert caught.value.code == "cost_cap_exceeded" and caught.value.status_code == 400
    assert caught.value.message.startswith(
        "This request could cost up to $0.03563, even with only 2 panel member(s) (min_successful: 2), over its "
        "cost cap of $0.03 (max_cost_usd)."
    )


def test_the_dearest_concluding_fallback_counts() -> None:
    # k may write 1000 tokens of reasoning at $40/M: with a alone, $0.0101 + 130 x $1/M + $0.04 = $0.05023 (with j
    # alone it would be $0.02023)
    with pytest.raises(InvalidRequest) as caught:
        under_cap(config("0.05", concluding_fallbacks=["k"]))
    assert "could cost up to $0.05023, even with only 1 panel member(s)" in caught.value.message


@pytest.mark.parametrize(("members", "fallbacks"), [(["a", "free"], []), (["a"], ["free"])], ids=["member", "fallback"])
def test_an_unpriced_llm_under_a_cap_is_a_400_naming_it(members: list[str], fallbacks: list[str]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        under_cap(config("1", llms_to_query=members, concluding_fallbacks=fallbacks))
    assert caught.value.code == "cost_cap_unpriced"
    assert "its LLM(s) 'free' have no known price" in caught.value.message


def test_the_concluding_call_gets_what_is_left() -> None:
    plan = under_cap(config("0.04"))
    j = plan.concluders[0]
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}, {"role": "user", "content": "z"}]
    j_prices = prices("1", "10")

    def left_after(spent: str) -> Any:
        return room(plan, j, messages, Decimal(spent), j_prices, ten_a_message)

    # $0.04 - spent - 30 tokens read at $1/M, at $10/M a token of answer
    assert left_after("0.0252").tokens == 1000  # 1477 affordable: its ceiling
    assert left_after("0.035").tokens == 497
    assert left_after("0.0398") == Room(17)  # still enough for an answer
    short = left_after("0.0399")
    assert short is not None and short.tokens == 7 and short.refused is not None
    assert short.refused == (
        "of the cost cap of $0.04, $0.0399 was spent and $0.00007 is left once its input is paid: 7 token(s) of "
        "answer, too few"
    )
    spent_all = left_after("0.05")
    assert spent_all is not None and spent_all.tokens == 0 and spent_all.refused is not None
    assert MIN_ANSWER_TOKENS == 16


def test_a_ceiling_below_the_minimum_is_enough() -> None:
    plan = under_cap(config("0.04"), {"max_tokens": 5})
    j = plan.concluders[0]
    found = room(plan, j, [], Decimal(0), prices("1", "10"), ten_a_message)
    assert found is not None and (found.tokens, found.refused) == (5, None)


def test_without_a_cap_there_is_no_room_to_compute() -> None:
    plan = plan_of(config(None))
    assert room(plan, plan.concluders[0], [], Decimal(0), prices("1", "10"), ten_a_message) is None


def test_an_llms_output_ceiling() -> None:
    made = config(None)
    a = made.llm("a")
    assert max_output(a, {"max_output_tokens": 8192}) == 100  # the config first
    free = made.llm("free")
    assert max_output(free, {"max_output_tokens": 8192, "max_tokens": 4000}) == 8192
    assert max_output(free, {"max_tokens": 4000}) == 4000
    assert max_output(free, {"max_output_tokens": None}) == DEFAULT_MAX_OUTPUT == 4096
    assert max_output(free, None) == 4096
    both = made.llm_definitions[0].model_copy(update={"params": {"max_tokens": 300, "max_completion_tokens": 200}})
    assert max_output(both, None) == 200


# ----------------------------------------------------------------------------------- the strategies' stages


def test_later_rounds_and_rankings_read_every_answer() -> None:
    a = CallCost(10, 100, prices("10", "100"))
    b = CallCost(10, 200, prices("10", "100"))
    j = CallCost(30, 1000, prices("1", "10"))
    panel = estimate([a, b], [j])
    # layers of 3: two more rounds, each member reading both answers (300 tokens) as well as its own 20
    again = Stages(later_rounds=2, rounds=(CallCost(20, 100, a.prices), CallCost(20, 200, b.prices)))
    later = 2 * (Decimal(320 * 10 + 100 * 100) + Decimal(320 * 10 + 200 * 100)) / M
    assert estimate([a, b], [j], again) == panel + later
    # rank by the members: each ranking reads the answers; a configured ranker too
    ranked = Stages(rankings=(CallCost(30, 50, a.prices), CallCost(30, 50, b.prices)), rankers=(j,))
    rankings = (Decimal(330 * 10 + 50 * 100) * 2) / M + j.worst(300)
    assert estimate([a, b], [j], ranked) == panel + rankings
    # a member dropped neither answers again nor ranks
    assert ranked.keeping([1]).rankings == (CallCost(30, 50, b.prices),)
    assert again.keeping([0]).rounds == (CallCost(20, 100, a.prices),)


def test_a_member_that_ranks_costs_more_to_keep() -> None:
    # alone, the dearest call is c's ($0.025: 250 x $100/M), but b's ranking ($0.1) makes b the dearest to keep
    members = [CallCost(0, 100, prices("0", "100")), CallCost(0, 200, prices("0", "100"))]
    members.append(CallCost(0, 250, prices("0", "100")))
    stages = Stages(rankings=(members[0], CallCost(0, 1000, prices("0", "100")), members[0]))
    free = [CallCost(0, 0, prices("0", "0"))]
    dropped, total = fit(members, free, Decimal("0.06"), 1, stages)
    assert dropped == [1] and total == Decimal("0.055")  # a and c: 0.01 + 0.025, two rankings of 0.01


def test_a_rank_plan_counts_each_members_ranking() -> None:
    # a ranking reads 30 tokens (3 messages) and the three answers (600) at the member's input price, and writes at
    # most its ceiling (its LLM's, below 1024): a 0.0063 + 0.01, b 0.0063 + 0.02, c 0.0063 + 0.015 = 0.0639; with
    # the panel's 0.0453 and j's 0.01063: 0.11983
    plan = under_cap(config("0.12", strategy="rank"))
    assert [m.skipped for m in plan.members] == [None, None, None]
    assert [r.ceiling for r in plan.rankers] == [100, 200, 300]
    made = config("0.12", strategy="rank")
    ceilings = {d.name: max_output(d, None) for d in made.llm_definitions}
    book = build_price_book(made, lambda model: None)
    assert worst_case(plan_of(made), book, ceilings, ten_a_message) == Decimal("0.11983")
    # under 0.1, b goes (it saves the most: its call, its ranking, its answer read by every ranking and by j)
    dropped = under_cap(config("0.1", strategy="rank"))
    assert [m.llm.name for m in dropped.members if m.skipped_kind == "cost_cap" and m.skipped] == ["b"]
    with pytest.raises(InvalidRequest) as caught:
        under_cap(config("0.1", strategy="rank", min_successful=3))
    assert "could cost up to $0.11983, even with only 3 panel member(s)" in caught.value.message


def test_configured_rankers_count_and_must_be_priced() -> None:
    # j ranks: 30 + 600 tokens read at $1/M, 1000 written at $10/M: 0.01063, and concludes: 0.01063
    with pytest.raises(InvalidRequest) as caught:
        under_cap(config("0.066", strategy="rank", rankers=["j"], min_successful=3))
    assert "could cost up to $0.06656," in caught.value.message
    assert under_cap(config("0.0666", strategy="rank", rankers=["j"], min_successful=3)).rankers[0].ceiling == 1000
    with pytest.raises(InvalidRequest) as unpriced:
        under_cap(config("1", strategy="rank", rankers=["free"]))
    assert unpriced.value.code == "cost_cap_unpriced" and "'free'" in unpriced.value.message


def test_a_layers_plan_counts_every_later_round() -> None:
    # layers: 3, two more rounds: each member reads its 10 tokens, the references' frame (10) and the answers (600)
    # at $10/M: a 0.0062 + 0.01, b 0.0062 + 0.02, c 0.0062 + 0.015 = 0.0636 a round; with the panel and j: 0.18313
    with pytest.raises(InvalidRequest) as caught:
        under_cap(config("0.18", strategy="layers", layers=3, min_successful=3))
    assert "could cost up to $0.18313," in caught.value.message
    assert under_cap(config("0.18313", strategy="layers", layers=3, min_successful=3)).members[1].skipped is None
