"""The worst case of a MoM model's request that the evaluation's spending limit reserves: the cost cap's own
estimate, without a cap; None when an LLM it may call has no price."""

from __future__ import annotations

from decimal import Decimal

from mom_service.config import parse_config
from mom_service.engine.cost_cap import worst_case
from mom_service.providers.capabilities import max_output
from mom_service.providers.pricing import build_price_book
from tests.unit.test_cost_cap import config, definition, plan_of, ten_a_message


def test_the_worst_case_is_the_cost_caps_estimate() -> None:
    made = config(None)  # no cap: the plan keeps every member
    ceilings = {d.name: max_output(d, None) for d in made.llm_definitions}
    book = build_price_book(made, lambda model: None)
    # a $0.0101, b $0.0201, c $0.0151, j $0.01063 (test_cost_cap.config)
    assert worst_case(plan_of(made), book, ceilings, ten_a_message) == Decimal("0.05593")


def test_an_unpriced_llm_has_no_worst_case() -> None:
    made = parse_config(
        {
            "llm_definitions": [
                definition("a", 100, "10", "100"),
                {"name": "free", "model": "openai/free", "api_base": "http://fake/v1"},
            ],
            "models": [{"name": "mom", "llms_to_query": ["a", "free"], "concluding_llm": "a"}],
        },
        "<test>",
    )
    ceilings = {d.name: max_output(d, None) for d in made.llm_definitions}
    assert worst_case(plan_of(made), build_price_book(made, lambda model: None), ceilings, ten_a_message) is None
