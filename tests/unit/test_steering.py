"""The directive parser and the steering rules, as pure functions."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest

from mom_service.config import MoMConfig, parse_config
from mom_service.engine.directives import extract
from mom_service.engine.steering import KEYS, NO_STEERING, steer
from mom_service.errors import ConfigError, InvalidRequest


def config(**model: Any) -> MoMConfig:
    llms = [{"name": n, "model": f"openai/{n}"} for n in ("a", "b", "c", "j", "k", "x")]
    base = {"name": "m", "llms_to_query": ["a", "b", "c"], "concluding_llm": "j", "concluding_fallbacks": ["k"]}
    return parse_config({"llm_definitions": llms, "models": [base | model]}, "test")


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_keys_then_instruction_and_the_block_removed() -> None:
    text = "Before.\n<<SYSTEM>>\n\nOnly: a, b\nmin-successful: 2\nBe brief.\nkey: not a key now\n<</SYSTEM>>\nAfter."
    messages, directive = extract(user(text), KEYS)
    assert messages == user("Before.\n\nAfter.")
    assert directive.keys == {"only": "a, b", "min_successful": "2"}
    assert directive.instruction == "Be brief.\nkey: not a key now"


def test_a_conversation_without_a_block_is_the_same_object() -> None:
    messages = user("No block <<here>>.")
    assert extract(messages, KEYS)[0] is messages


def test_a_misspelt_key_is_a_key_but_an_ordinary_word_is_an_instruction() -> None:
    _, directive = extract(user("<<SYSTEM>>exlude: a\nNote: be kind<</SYSTEM>>Q"), KEYS)
    assert directive.keys == {"exlude": "a"}
    assert directive.instruction == "Note: be kind"


def test_nothing_steered_is_the_model_as_configured() -> None:
    cfg = config()
    mom = cfg.models[0]
    assert steer(cfg, mom, None, user("Q")) == (mom, user("Q"), NO_STEERING)
    assert steer(cfg, mom, {}, user("Q"))[2] is NO_STEERING


def test_concluding_goes_first_and_the_chain_follows() -> None:
    cfg = config()
    steered, _, steering = steer(cfg, cfg.models[0], {"concluding": "k"}, user("Q"))
    assert (steered.concluding_llm, steered.concluding_fallbacks) == ("k", ["j"])
    assert steering.applied == {"concluding": "k"}


def test_the_body_wins_and_values_are_read_from_text() -> None:
    cfg = config()
    text = "<<SYSTEM>>quorum: 2\nmin_successful: 1\nmax_cost_usd: 0.5\ncache: OFF<</SYSTEM>>Q"
    steered, _, steering = steer(cfg, cfg.models[0], {"quorum": 3}, user(text))
    assert (steered.quorum, steered.min_successful) == (3, 1)
    assert steering.max_cost_usd == Decimal("0.5") and steering.cache_off
    assert steering.notices == ()


def test_a_quorum_below_min_successful_is_ignored_with_a_notice() -> None:
    cfg = config()
    steered, _, steering = steer(cfg, cfg.models[0], {"quorum": 1, "min_successful": 2}, user("Q"))
    assert steered.quorum is None and steered.min_successful == 2
    assert steering.notices == ("mom.quorum: 1 is less than min_successful (2); ignored.",)


@pytest.mark.parametrize("value", [True, "2.5", -1, 0, [2]])
def test_a_number_that_cannot_be_read_is_a_notice(value: Any) -> None:
    cfg = config()
    steered, _, steering = steer(cfg, cfg.models[0], {"min_successful": value}, user("Q"))
    assert steered.min_successful == 1
    assert steering.notices[0].startswith("mom.min_successful: expected an integer of at least 1")


@pytest.mark.parametrize("value", ["lots", -0.01, "NaN", True, None])
def test_a_cap_that_cannot_be_read_is_refused(value: Any) -> None:
    cfg = config()
    with pytest.raises(InvalidRequest) as refused:
        steer(cfg, cfg.models[0], {"max_cost_usd": value}, user("Q"))
    assert refused.value.code == "invalid_value"


def test_allowed_llms_must_exist() -> None:
    with pytest.raises(ConfigError, match=re.escape("overrides.allowed_llms': unknown LLM 'nope'")):
        config(overrides={"allowed_llms": ["nope"]})


def test_a_tiers_llms_are_the_models_own() -> None:
    cfg = config(tiers={"low": {"llms_to_query": ["a"], "concluding_llm": "x"}})
    configured = cfg.models[0]
    tier = configured.model_copy(update={"llms_to_query": ["a"]})  # the tier chosen: its panel only
    steered, _, steering = steer(cfg, tier, {"include": ["b", "x"]}, user("Q"), configured)
    assert steered.llms_to_query == ["a", "b", "x"]  # x concludes the low tier: one of the model's own
    assert steering.applied == {"include": ["b", "x"]}
    with pytest.raises(InvalidRequest) as refused:
        steer(cfg, tier, {"include": ["b"]}, user("Q"))  # without the model as configured, b (not in the tier) is not
    assert refused.value.code == "llm_not_allowed"


def test_only_the_members_excluded_are_applied() -> None:
    cfg = config()
    steered, _, steering = steer(cfg, cfg.models[0], {"exclude": ["c", "zz"]}, user("Q"))
    assert steered.llms_to_query == ["a", "b"]
    assert steering.applied == {"exclude": ["c"]}
    assert steering.notices == ("mom.exclude: 'zz' is not asked; ignored.",)
