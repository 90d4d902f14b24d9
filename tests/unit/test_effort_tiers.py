"""Effort tiers: the config's `tiers` validated, the tier a level picks (snapping), what each role is asked with,
who takes `reasoning_effort`, and the cache key of a plan changing with its tier and efforts."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from mom_service.cache.keys import panel_identity
from mom_service.config import LLMDefinition, MoMConfig, parse_config
from mom_service.engine.plan import Plan
from mom_service.engine.planning import make_plan
from mom_service.engine.tiers import choose_tier, nearest_tier, tiers_shown
from mom_service.errors import ConfigError
from mom_service.providers.capabilities import capabilities_of
from mom_service.providers.openai_http import lean_route, request_body

NAMES = ("a", "b", "c", "j", "k")


def raw_config(**model: Any) -> dict[str, Any]:
    return {
        "llm_definitions": [{"name": n, "model": f"openai/{n}", "api_base": "http://x/v1"} for n in NAMES],
        "models": [
            {"name": "mom", "llms_to_query": ["a", "b", "c"], "concluding_llm": "j", **model},
        ],
    }


TIERS = {
    "low": {"llms_to_query": ["a"], "concluding_llm": "k", "effort": "minimal", "concluding_effort": "none"},
    "medium": {"llms_to_query": ["a", "b"]},
    "high": {"effort": "high", "concluding_effort": "xhigh"},
}


def config(**model: Any) -> MoMConfig:
    return parse_config(raw_config(**model), "config.yaml")


def problem(**model: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config(**model)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ the config


def test_tiers_are_parsed_with_their_defaults() -> None:
    mom = config(tiers=TIERS).models[0]
    assert mom.tiers is not None and list(mom.tiers) == ["low", "medium", "high"]
    medium = mom.tiers["medium"]
    assert (medium.concluding_llm, medium.effort, medium.concluding_effort) == (None, "client", "client")
    assert config().models[0].tiers is None


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        (
            {"low": {"llms_to_query": ["zz"]}},
            "field 'tiers.low.llms_to_query': unknown LLM 'zz' (not in llm_definitions)",
        ),
        (
            {"high": {"concluding_llm": "zz"}},
            "field 'tiers.high.concluding_llm': unknown LLM 'zz' (not in llm_definitions)",
        ),
        ({"low": {"llms_to_query": ["a", "a"]}}, "field 'tiers.low.llms_to_query': an LLM is listed twice"),
    ],
)
def test_a_tiers_names_are_checked(tiers: dict[str, Any], message: str) -> None:
    assert f"config.yaml: models[0] (name 'mom'): {message}" in problem(tiers=tiers)


def test_the_panel_rules_must_fit_each_tiers_panel() -> None:
    message = problem(min_successful=2, tiers={"low": {"llms_to_query": ["a"]}})
    assert "field 'min_successful': 2 is more than the 1 LLMs to query of tier 'low'" in message
    message = problem(quorum=3, tiers={"medium": {"llms_to_query": ["a", "b"]}})
    assert "field 'quorum': 3 is more than the 2 LLMs to query of tier 'medium'" in message
    message = problem(tools={"strategy": "vote", "vote_threshold": 2}, tiers={"low": {"llms_to_query": ["c"]}})
    assert "field 'tools.vote_threshold': 2 is more than the 1 LLMs to query of tier 'low'" in message


@pytest.mark.parametrize(
    ("tiers", "where"),
    [
        ({"extreme": {}}, "tiers.extreme"),  # a level of OpenAI's scale, nothing else
        ({"low": {"effort": "max"}}, "tiers.low.effort"),
        ({"low": {"concluding_effort": "lots"}}, "tiers.low.concluding_effort"),
        ({"low": {"llms_to_query": []}}, "tiers.low.llms_to_query"),
        ({"low": {"members": ["a"]}}, "tiers.low.members"),
        ({}, "tiers"),
    ],
)
def test_wrong_tiers_are_refused(tiers: dict[str, Any], where: str) -> None:
    assert f"config.yaml: models[0] (name 'mom'): field '{where}'" in problem(tiers=tiers)


# ------------------------------------------------------------------------------------------- choosing a tier


@pytest.mark.parametrize(
    ("levels", "effort", "chosen"),
    [
        (["low", "medium", "high"], "medium", "medium"),  # its own
        (["low", "medium", "high"], "xhigh", "high"),  # above the top: the top
        (["low", "medium", "high"], "minimal", "low"),
        (["low", "medium", "high"], "none", "low"),
        (["low", "high"], "medium", "low"),  # as near to both: the lower, cheaper one
        (["minimal", "xhigh"], "high", "xhigh"),
        (["high"], "none", "high"),
    ],
)
def test_an_effort_snaps_to_the_nearest_tier(levels: list[Any], effort: Any, chosen: str) -> None:
    assert nearest_tier(levels, effort) == chosen


def test_a_tier_sets_the_panel_the_concluding_chain_and_each_roles_effort() -> None:
    mom = config(tiers=TIERS, concluding_fallbacks=["k"]).models[0]
    low = choose_tier(mom, "low")
    assert (low.tier, low.mom.llms_to_query, low.mom.concluding_llm) == ("low", ["a"], "k")
    assert low.mom.concluding_fallbacks == ["j"]  # the model's chain, after the tier's concluding LLM, without it
    assert (low.member_effort, low.concluding_effort) == ("minimal", None)  # `none`: no effort sent
    medium = choose_tier(mom, "medium")
    assert (medium.mom.llms_to_query, medium.mom.concluding_llm, medium.mom.concluding_fallbacks) == (
        ["a", "b"],
        "j",
        ["k"],
    )
    assert (medium.member_effort, medium.concluding_effort) == ("medium", "medium")  # `client`: the request's own
    snapped = choose_tier(mom, "xhigh")
    assert (snapped.tier, snapped.mom.llms_to_query) == ("high", ["a", "b", "c"])
    assert (snapped.member_effort, snapped.concluding_effort) == ("high", "xhigh")
    assert choose_tier(mom, "minimal").tier == "low"


def test_without_an_effort_or_without_tiers() -> None:
    mom = config(tiers=TIERS).models[0]
    same = choose_tier(mom, None)
    assert (same.mom, same.tier, same.member_effort, same.concluding_effort) == (mom, None, None, None)
    plain = config().models[0]
    passed = choose_tier(plain, "high")
    assert (passed.mom, passed.tier, passed.member_effort, passed.concluding_effort) == (plain, None, "high", "high")
    assert (choose_tier(plain, "none").member_effort, choose_tier(plain, "none").concluding_effort) == (None, None)


def test_the_tiers_as_listed() -> None:
    shown = tiers_shown(config(tiers={"high": {}, "low": TIERS["low"]}).models[0])
    assert shown == {
        "low": {"llms_to_query": ["a"], "concluding_llm": "k", "effort": "minimal", "concluding_effort": "none"},
        "high": {
            "llms_to_query": ["a", "b", "c"],
            "concluding_llm": "j",
            "effort": "client",
            "concluding_effort": "client",
        },
    }
    assert list(shown) == ["low", "high"]  # in the scale's order
    assert tiers_shown(config().models[0]) is None


# --------------------------------------------------------------------------------------- who takes the effort


def test_who_takes_reasoning_effort() -> None:
    known = {"openai/o3-mini": {"supports_reasoning": True}, "openai/gpt-4o-mini": {"supports_reasoning": False}}

    def able(model: str, **capabilities: Any) -> bool:
        llm = LLMDefinition(name="x", model=model, capabilities=capabilities)
        return capabilities_of(llm, known.get, lambda _: None).reasoning

    assert able("openai/o3-mini") and not able("openai/gpt-4o-mini")
    assert not able("openai/my-server-model")  # unknown to LiteLLM: not sent, unless the config says so
    assert able("openai/my-server-model", reasoning=True)
    assert not able("openai/o3-mini", reasoning=False)


def plan_of(cfg: MoMConfig, effort: str | None, takes: set[str]) -> Plan:
    tiered = choose_tier(cfg.models[0], effort)
    return make_plan(
        cfg,
        tiered.mom,
        [{"role": "user", "content": "Hi"}],
        {"temperature": 0.5},
        vision=dict.fromkeys(NAMES, False),
        has_images=False,
        request_id="r",
        stream=False,
        tiered=tiered,
        reasoning_ok={n: n in takes for n in NAMES},
    )


def test_only_the_llms_that_take_it_get_reasoning_effort() -> None:
    plan = plan_of(config(tiers=TIERS, concluding_fallbacks=["k"]), "high", takes={"a", "b", "k"})
    assert [m.params.get("reasoning_effort") for m in plan.members] == ["high", "high", None]
    assert all(m.params["temperature"] == 0.5 for m in plan.members)
    assert [(c.llm.name, c.effort) for c in plan.concluders] == [("j", None), ("k", "xhigh")]
    assert "reasoning_effort" not in plan.params_of(plan.concluders[0])
    assert plan.params_of(plan.concluders[1])["reasoning_effort"] == "xhigh"
    assert plan.tier == "high"


def test_the_cache_key_changes_with_the_tier_and_the_effort() -> None:
    tiered = config(tiers=TIERS)
    plain = config()
    keys = [
        plan_of(tiered, None, set(NAMES)).key_params,
        plan_of(tiered, "low", set(NAMES)).key_params,
        plan_of(tiered, "medium", set(NAMES)).key_params,
        plan_of(tiered, "high", set(NAMES)).key_params,
        plan_of(tiered, "xhigh", set(NAMES)).key_params,  # the high tier, with the same efforts: the same answer
        plan_of(plain, "low", set(NAMES)).key_params,
        plan_of(plain, "high", set(NAMES)).key_params,
    ]
    assert keys[3] == keys[4]
    distinct = [keys[i] for i in (0, 1, 2, 3, 5, 6)]
    assert all(a != b for i, a in enumerate(distinct) for b in distinct[i + 1 :])
    assert keys[0] == plan_of(plain, None, set(NAMES)).key_params  # no effort: as before tiers


def test_a_tiers_own_llms_are_part_of_the_panels_identity() -> None:
    def identity(k_params: dict[str, Any]) -> str:
        raw = raw_config(tiers=TIERS)
        raw["llm_definitions"][NAMES.index("k")]["params"] = k_params  # k concludes the low tier only
        cfg = parse_config(raw, "config.yaml")
        return panel_identity(cfg, cfg.models[0])

    assert identity({"temperature": 0}) != identity({"temperature": 1})


def test_an_llms_own_reasoning_effort_keeps_the_lean_path_and_a_requests_replaces_it() -> None:
    own = LLMDefinition(name="x", model="openai/local", api_base="http://h:1/v1", params={"reasoning_effort": "low"})
    route = lean_route(own, "k", frozenset())
    assert route is not None  # a body field LiteLLM passes through as it is, for an OpenAI-compatible server
    body = orjson.loads(request_body(route, [], {"reasoning_effort": "high"}))
    assert body["reasoning_effort"] == "high"
