"""Prices and cost arithmetic: the price book from config.yaml and LiteLLM's cost map, exact Decimal costs."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest

from mom_service.config import Pricing, parse_config
from mom_service.engine.events import Breakdown, CallReport, Usage
from mom_service.providers.litellm_api import cost_map_entry
from mom_service.providers.pricing import Prices, build_price_book, call_cost, from_config, from_cost_map
from mom_service.usage.money import from_pico, to_pico, usd

# USD per token, chosen so every product is easy to compute by hand.
PRICES = Prices(
    input=Decimal("1"),
    output=Decimal("10"),
    reasoning=Decimal("100"),
    cached_input=Decimal("0.1"),
    source="config",
)


def report(name: str, cost: Decimal | None, **extra: Any) -> CallReport:
    return CallReport(name=name, model=f"openai/{name}", cost=cost, **extra)


# ------------------------------------------------------------------------------------------------ from_config


def test_from_config_per_million_becomes_exact_per_token() -> None:
    prices = from_config(Pricing(input_per_million=Decimal("0.15"), output_per_million=Decimal("0.60")))
    assert prices.input == Decimal("0.00000015")
    assert prices.output == Decimal("0.0000006")
    # exact: scaling back gives the configured price, not a float approximation
    assert prices.input * 1_000_000 == Decimal("0.15")
    assert prices.output * 1_000_000 == Decimal("0.60")
    assert all(isinstance(v, Decimal) for v in (prices.input, prices.output, prices.reasoning, prices.cached_input))
    assert prices.source == "config"


def test_from_config_reasoning_defaults_to_output_and_cached_to_input() -> None:
    prices = from_config(Pricing(input_per_million=Decimal("3"), output_per_million=Decimal("15")))
    assert prices.reasoning == prices.output == Decimal("0.000015")
    assert prices.cached_input == prices.input == Decimal("0.000003")


def test_from_config_uses_explicit_reasoning_and_cached_prices() -> None:
    prices = from_config(
        Pricing(
            input_per_million=Decimal("3"),
            output_per_million=Decimal("15"),
            reasoning_per_million=Decimal("60"),
            cached_input_per_million=Decimal("0.0375"),
        )
    )
    assert prices.input == Decimal("0.000003")
    assert prices.output == Decimal("0.000015")
    assert prices.reasoning == Decimal("0.00006")
    assert prices.cached_input == Decimal("0.0000000375")


def test_from_config_explicit_zero_prices_are_kept() -> None:
    prices = from_config(
        Pricing(
            input_per_million=Decimal("3"),
            output_per_million=Decimal("15"),
            reasoning_per_million=Decimal("0"),
            cached_input_per_million=Decimal("0"),
        )
    )
    assert prices.reasoning == Decimal(0)
    assert prices.cached_input == Decimal(0)


def test_from_config_yaml_floats_stay_exact() -> None:
    """A YAML float such as 0.15 must not become 0.1499999999999999944488848768742172978818416595458984375."""
    prices = from_config(Pricing(input_per_million=0.15, output_per_million=0.6))  # type: ignore[arg-type]
    assert prices.input == Decimal("0.00000015")
    assert prices.output == Decimal("0.0000006")


# ---------------------------------------------------------------------------------------------- from_cost_map


def test_from_cost_map_reads_litellm_keys_exactly() -> None:
    prices = from_cost_map(
        {
            "input_cost_per_token": 1.5e-07,
            "output_cost_per_token": 6e-07,
            "output_cost_per_reasoning_token": 2.4e-06,
            "cache_read_input_token_cost": 7.5e-08,
        }
    )
    assert prices is not None
    assert prices.input == Decimal("1.5E-7")
    assert str(prices.input) == "1.5E-7"  # never 1.499999...E-7
    assert prices.output == Decimal("6E-7")
    assert prices.reasoning == Decimal("2.4E-6")
    assert prices.cached_input == Decimal("7.5E-8")
    assert prices.source == "cost_map"


@pytest.mark.parametrize("value", [1.5e-07, 6e-07, 7.5e-08, 2.5e-06, 1.1e-05, 3e-08, 0.1, 1.25e-07])
def test_from_cost_map_float_conversion_is_the_shortest_decimal(value: float) -> None:
    prices = from_cost_map({"input_cost_per_token": value, "output_cost_per_token": value})
    assert prices is not None
    assert prices.input == Decimal(repr(value))
    assert len(prices.input.as_tuple().digits) <= 17  # the shortest form, not the binary expansion
    assert float(prices.input) == value


def test_from_cost_map_accepts_ints_and_strings() -> None:
    prices = from_cost_map({"input_cost_per_token": 0, "output_cost_per_token": "0.000002"})
    assert prices is not None
    assert prices.input == Decimal(0)  # a free model is priced, not unknown
    assert prices.output == Decimal("0.000002")


@pytest.mark.parametrize(
    "entry",
    [
        {"output_cost_per_token": 6e-07},
        {"input_cost_per_token": 1.5e-07},
        {"input_cost_per_token": None, "output_cost_per_token": 6e-07},
        {"input_cost_per_token": 1.5e-07, "output_cost_per_token": None},
        {"input_cost_per_token": True, "output_cost_per_token": 6e-07},
        {"input_cost_per_token": [1], "output_cost_per_token": 6e-07},
        {},
    ],
)
def test_from_cost_map_without_input_or_output_price_is_none(entry: dict[str, Any]) -> None:
    assert from_cost_map(entry) is None


def test_from_cost_map_reasoning_defaults_to_output_and_cached_to_input() -> None:
    prices = from_cost_map(
        {
            "input_cost_per_token": 1.5e-07,
            "output_cost_per_token": 6e-07,
            "output_cost_per_reasoning_token": None,
        }
    )
    assert prices is not None
    assert prices.reasoning == prices.output == Decimal("6E-7")
    assert prices.cached_input == prices.input == Decimal("1.5E-7")


# ------------------------------------------------------------------------------------------- build_price_book


def book_config() -> dict[str, Any]:
    return {
        "llm_definitions": [
            {
                "name": "priced",
                "model": "openai/gpt-4o-mini",  # in the cost map, but config.yaml's price wins
                "pricing": {"input_per_million": "2.5", "output_per_million": "10", "cached_input_per_million": "1.25"},
            },
            {"name": "catalog", "model": "openai/gpt-4o-mini"},
            {"name": "mystery", "model": "openai/no-such-model-xyz"},
        ],
        "models": [{"name": "mom", "llms_to_query": ["priced", "catalog", "mystery"], "concluding_llm": "priced"}],
    }


def test_build_price_book_config_cost_map_and_unknown(mom_log: pytest.LogCaptureFixture) -> None:
    config = parse_config(book_config(), "test.yaml")
    book = build_price_book(config, cost_map_entry)

    assert set(book) == {"priced", "catalog", "mystery"}

    priced = book["priced"]
    assert priced is not None
    assert priced.source == "config"
    assert priced.input == Decimal("0.0000025")
    assert priced.output == Decimal("0.00001")
    assert priced.reasoning == Decimal("0.00001")
    assert priced.cached_input == Decimal("0.00000125")

    entry = cost_map_entry("openai/gpt-4o-mini")
    assert entry is not None
    for key in ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost"):
        assert entry[key] is not None, key
    catalog = book["catalog"]
    assert catalog is not None
    assert catalog.source == "cost_map"
    assert catalog.input == Decimal(repr(entry["input_cost_per_token"]))
    assert catalog.output == Decimal(repr(entry["output_cost_per_token"]))
    assert catalog.cached_input == Decimal(repr(entry["cache_read_input_token_cost"]))
    # LiteLLM's bundled entry for gpt-4o-mini: $0.15 / $0.60 / $0.075 per million
    assert catalog.input == Decimal("1.5E-7")
    assert catalog.output == Decimal("6E-7")
    assert catalog.cached_input == Decimal("7.5E-8")
    reasoning = entry.get("output_cost_per_reasoning_token")
    assert catalog.reasoning == (Decimal(repr(reasoning)) if reasoning is not None else catalog.output)

    assert book["mystery"] is None
    warnings = [r for r in mom_log.records if r.name == "mom_service" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'mystery'" in message
    assert "openai/no-such-model-xyz" in message
    assert "pricing" in message


def test_build_price_book_one_warning_per_unpriced_llm(mom_log: pytest.LogCaptureFixture) -> None:
    raw = {
        "llm_definitions": [
            {"name": "ghost-a", "model": "openai/no-such-model-xyz"},
            {"name": "ghost-b", "model": "custom/other-unknown"},
            {"name": "known", "model": "x/y", "pricing": {"input_per_million": 1, "output_per_million": 2}},
        ],
        "models": [{"name": "mom", "llms_to_query": ["ghost-a", "ghost-b"], "concluding_llm": "known"}],
    }
    entries = {"custom/other-unknown": {"input_cost_per_token": 1e-06}}  # no output price: unusable
    asked: list[str] = []

    def lookup(model: str) -> dict[str, Any] | None:
        asked.append(model)
        return entries.get(model)

    book = build_price_book(parse_config(raw, "test.yaml"), lookup)
    assert book["ghost-a"] is None
    assert book["ghost-b"] is None
    assert book["known"] is not None
    assert asked == ["openai/no-such-model-xyz", "custom/other-unknown"]  # config-priced LLMs are not looked up
    warnings = [r.getMessage() for r in mom_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "'ghost-a'" in warnings[0]
    assert "'ghost-b'" in warnings[1]


def test_build_price_book_all_priced_logs_nothing(mom_log: pytest.LogCaptureFixture) -> None:
    raw = {
        "llm_definitions": [
            {"name": "a", "model": "x/y", "pricing": {"input_per_million": 1, "output_per_million": 2}}
        ],
        "models": [{"name": "mom", "llms_to_query": ["a"], "concluding_llm": "a"}],
    }
    book = build_price_book(parse_config(raw, "test.yaml"), lambda model: None)
    assert book["a"] is not None
    assert [r for r in mom_log.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------------------------------------------- call_cost


def test_call_cost_plain_input_and_output() -> None:
    assert call_cost(Usage(prompt_tokens=7, completion_tokens=5), PRICES) == Decimal(7 + 50)


def test_call_cost_reasoning_tokens_priced_once_at_reasoning_price() -> None:
    # completion_tokens includes the 3 reasoning tokens: 2 at the output price, 3 at the reasoning price
    cost = call_cost(Usage(prompt_tokens=0, completion_tokens=5, reasoning_tokens=3), PRICES)
    assert cost == Decimal(2 * 10 + 3 * 100)
    assert cost != Decimal(5 * 10 + 3 * 100)


def test_call_cost_cached_prompt_tokens_at_cached_price() -> None:
    cost = call_cost(Usage(prompt_tokens=7, completion_tokens=0, cached_tokens=4), PRICES)
    assert cost == Decimal("3.4")  # 3 * 1 + 4 * 0.1


def test_call_cost_all_four_kinds_together() -> None:
    cost = call_cost(Usage(prompt_tokens=10, completion_tokens=8, reasoning_tokens=5, cached_tokens=6), PRICES)
    assert cost == Decimal(4 * 1) + Decimal("0.6") + Decimal(3 * 10) + Decimal(5 * 100)


def test_call_cost_cached_above_prompt_is_clamped() -> None:
    assert call_cost(Usage(prompt_tokens=7, cached_tokens=10), PRICES) == Decimal("0.7")


def test_call_cost_reasoning_above_completion_is_clamped() -> None:
    assert call_cost(Usage(completion_tokens=5, reasoning_tokens=9), PRICES) == Decimal(500)


def test_call_cost_negative_cached_and_reasoning_count_as_zero() -> None:
    cost = call_cost(Usage(prompt_tokens=2, completion_tokens=3, reasoning_tokens=-4, cached_tokens=-1), PRICES)
    assert cost == Decimal(2 + 30)


def test_call_cost_without_usage_is_zero() -> None:
    assert call_cost(None, PRICES) == Decimal(0)
    zero = call_cost(None, None)  # a failed call that reported nothing costs 0, even for an unpriced LLM
    assert zero is not None
    assert zero == Decimal(0)
    assert isinstance(zero, Decimal)


def test_call_cost_unknown_price_with_usage_is_none() -> None:
    assert call_cost(Usage(prompt_tokens=1, completion_tokens=1), None) is None


def test_call_cost_real_prices() -> None:
    prices = from_config(
        Pricing(
            input_per_million=Decimal("0.15"),
            output_per_million=Decimal("0.60"),
            cached_input_per_million=Decimal("0.075"),
        )
    )
    cost = call_cost(Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=200), prices)
    assert cost == Decimal("0.000435")  # 800 * 0.15e-6 + 200 * 0.075e-6 + 500 * 0.6e-6


# ---------------------------------------------------------------------------------------------------- exactness


def test_ten_thousand_tiny_calls_sum_exactly() -> None:
    prices = from_config(Pricing(input_per_million=Decimal("0.15"), output_per_million=Decimal("0.60")))
    cost = call_cost(Usage(prompt_tokens=1), prices)
    assert cost == Decimal("0.00000015")
    reports = [report(f"m{i}", cost) for i in range(10_000)]
    breakdown = Breakdown(members=reports[:-1], concluding=reports[-1])
    assert breakdown.cost == Decimal("0.0015")
    assert to_pico(breakdown.cost) == 1_500_000_000
    assert usd(breakdown.cost) == 0.0015
    # the same sum in floats drifts: that is what the Decimal arithmetic avoids
    assert sum(float(r.cost) for r in reports if r.cost is not None) != 0.0015


def test_tenth_and_fifth_cent_prices_sum_exactly() -> None:
    tenth = from_config(Pricing(input_per_million=Decimal("0.10"), output_per_million=Decimal("0.20")))
    costs = [call_cost(Usage(prompt_tokens=1), tenth) for _ in range(1000)]
    costs += [call_cost(Usage(completion_tokens=1), tenth) for _ in range(1000)]
    reports = [report(f"m{i}", cost) for i, cost in enumerate(costs)]
    breakdown = Breakdown(members=reports[:-1], concluding=reports[-1])
    assert breakdown.cost == Decimal("0.0003")
    assert to_pico(breakdown.cost) == 300_000_000
    assert sum(float(c) for c in costs if c is not None) != 0.0003  # the float sum would be off


def test_pico_round_trip() -> None:
    for value in ["0", "0.0015", "0.000000000001", "123.456789012345", "0.0000000375", "1E-12", "98765.4321"]:
        cost = Decimal(value)
        pico = to_pico(cost)
        assert isinstance(pico, int)
        assert from_pico(pico) == cost
    for pico in [0, 1, 37_500, 1_500_000_000, 10**18 + 7]:
        assert to_pico(from_pico(pico)) == pico


def test_pico_of_prices_is_whole() -> None:
    assert to_pico(Decimal("0.0375") / 1_000_000) == 37_500
    assert to_pico(Decimal("0.15") / 1_000_000) == 150_000


@pytest.mark.parametrize(
    ("usd_value", "pico"),
    [
        ("0.0000000000005", 0),  # 0.5 pico: to the even 0
        ("0.0000000000015", 2),  # 1.5 pico: to the even 2
        ("0.0000000000025", 2),  # 2.5 pico: to the even 2
        ("0.0000000000035", 4),
        ("0.00000000000250000001", 3),  # just above half: up
        ("0.00000000000249999999", 2),  # just below half: down
        ("-0.0000000000025", -2),
    ],
)
def test_to_pico_rounds_half_even(usd_value: str, pico: int) -> None:
    assert to_pico(Decimal(usd_value)) == pico


def test_none_passes_through() -> None:
    assert to_pico(None) is None
    assert from_pico(None) is None
    assert usd(None) is None


def test_usd_is_a_float_of_the_exact_value() -> None:
    value = usd(Decimal("0.0003"))
    assert isinstance(value, float)
    assert value == 0.0003
    assert usd(Decimal(0)) == 0.0


# ---------------------------------------------------------------------------------------------------- Breakdown


def test_breakdown_cost_sums_known_costs_and_lists_unpriced() -> None:
    breakdown = Breakdown(
        members=[report("a", Decimal("0.1")), report("b", None), report("c", Decimal("0.2"))],
        concluding=report("judge", Decimal("0.3"), role="concluding"),
    )
    assert breakdown.cost == Decimal("0.6")
    assert breakdown.unpriced == ["b"]


def test_breakdown_cost_is_none_when_nothing_is_known() -> None:
    breakdown = Breakdown(members=[report("a", None), report("b", None)], concluding=report("judge", None))
    assert breakdown.cost is None
    assert breakdown.unpriced == ["a", "b", "judge"]


def test_breakdown_zero_cost_is_known() -> None:
    breakdown = Breakdown(members=[report("a", Decimal(0))], concluding=report("judge", None))
    assert breakdown.cost == Decimal(0)
    assert breakdown.cost is not None
    assert breakdown.unpriced == ["judge"]


def test_breakdown_all_priced_has_no_unpriced() -> None:
    breakdown = Breakdown(members=[report("a", Decimal("0.5"))], concluding=report("judge", Decimal("0.25")))
    assert breakdown.cost == Decimal("0.75")
    assert breakdown.unpriced == []


def test_local_llms_cost_zero_unless_priced_and_openai_behind_api_base_is_not_auto_local() -> None:
    config = parse_config(
        {
            "llm_definitions": [
                {"name": "llama", "model": "openai/smollm2", "api_base": "http://127.0.0.1:8080/v1", "local": True},
                {"name": "ollama", "model": "ollama/llama3.2", "api_base": "http://127.0.0.1:11434"},
                {"name": "vllm", "model": "hosted_vllm/qwen", "api_base": "http://127.0.0.1:8000/v1"},
                {
                    "name": "priced-vllm",
                    "model": "hosted_vllm/qwen",
                    "api_base": "http://127.0.0.1:8000/v1",
                    "pricing": {"input_per_million": "1", "output_per_million": "2"},
                },
                {"name": "proxy", "model": "openai/smollm2", "api_base": "http://127.0.0.1:8080/v1"},
                {"name": "remote-ollama", "model": "ollama/llama3.2", "local": False},
            ],
            "models": [{"name": "mom", "llms_to_query": ["llama", "ollama", "vllm"], "concluding_llm": "llama"}],
        },
        "test",
    )
    book = build_price_book(config, lambda model: None)
    for name in ("llama", "ollama", "vllm"):
        prices = book[name]
        assert prices is not None and prices.source == "local", name
        assert call_cost(Usage(prompt_tokens=1000, completion_tokens=50), prices) == 0
    priced = book["priced-vllm"]
    assert priced is not None and priced.source == "config" and priced.input == Decimal(1) / 1_000_000
    assert book["proxy"] is None  # an OpenAI-compatible server is not assumed local: its price is unknown
    assert book["remote-ollama"] is None
