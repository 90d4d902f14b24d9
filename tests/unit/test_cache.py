"""The response cache's pure parts: keys, the in-process LRU with TTL, entries' round trip."""

from __future__ import annotations

import asyncio
import tracemalloc
from decimal import Decimal
from typing import Any

import orjson

from mom_service.cache.keys import answer_key, member_key, panel_identity
from mom_service.cache.stores import MemoryCache
from mom_service.config import MoMConfig, parse_config
from mom_service.engine.cached import ResponseCache, cacheable
from mom_service.engine.events import Breakdown, CallReport

MESSAGES = [{"role": "user", "content": "Same question?"}]


def config(**changes: Any) -> MoMConfig:
    raw: dict[str, Any] = {
        "llm_definitions": [
            {"name": "a", "model": "openai/a", "params": {"temperature": 0.2}},
            {"name": "b", "model": "openai/b"},
            {"name": "j", "model": "openai/j"},
        ],
        "prompt_definitions": [{"name": "p", "content": "Combine."}],
        "models": [{"name": "mom", "llms_to_query": ["a", "b"], "concluding_llm": "j", "concluding_prompt": "p"}],
    }
    for path, value in changes.items():
        section, index, field = path.split(".")
        raw[section][int(index)][field] = value
    return parse_config(raw, "<test>")


def key(cfg: MoMConfig, messages: list[dict[str, Any]] = MESSAGES, **params: Any) -> str:
    return answer_key(panel_identity(cfg, cfg.models[0]), messages, params)


def test_answer_key_ignores_user_and_parameter_order() -> None:
    cfg = config()
    assert key(cfg, temperature=0.5, top_p=1) == key(cfg, top_p=1, temperature=0.5, user="someone")
    assert len(key(cfg)) == 64


def test_answer_key_changes_with_what_decides_the_answer() -> None:
    base = key(config())
    assert key(config(), temperature=0.5) != base
    assert key(config(), [{"role": "user", "content": "Another question?"}]) != base
    assert key(config(**{"llm_definitions.0.params": {"temperature": 0.9}})) != base  # a member's params
    assert key(config(**{"llm_definitions.2.model": "openai/j2"})) != base  # the concluding LLM's model
    assert key(config(**{"prompt_definitions.0.content": "Merge."})) != base  # the concluding prompt's text
    assert key(config(**{"models.0.include_thinking_context": True})) != base
    # not the answer's business: timeouts, retries, prices, descriptions, the cache settings themselves
    assert key(config(**{"llm_definitions.0.timeout": 5})) == base
    assert key(config(**{"llm_definitions.0.retries": 3})) == base
    assert key(config(**{"models.0.description": "text"})) == base
    assert key(config(**{"models.0.cache": {"enabled": True, "ttl_seconds": 5}})) == base


def test_member_key_is_the_llm_and_its_input_only() -> None:
    cfg = config()
    a = cfg.llm("a")
    assert member_key(a, MESSAGES, {"user": "x"}) == member_key(a, MESSAGES, {})
    assert member_key(a, MESSAGES, {}) != member_key(cfg.llm("b"), MESSAGES, {})
    changed = config(**{"prompt_definitions.0.content": "Merge."})  # the synthesis changes, the member does not
    assert member_key(changed.llm("a"), MESSAGES, {}) == member_key(a, MESSAGES, {})
    # its own system prompt changes its answer (it is also the first of the messages it gets), and the panel's
    skeptic = config(**{"llm_definitions.0.system_prompt": "You are the skeptic."})
    assert member_key(skeptic.llm("a"), MESSAGES, {}) != member_key(a, MESSAGES, {})
    assert key(skeptic) != key(cfg)
    assert key(config(**{"llm_definitions.0.local": True})) == key(cfg)  # where it runs does not


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_memory_cache_expires_entries_after_their_ttl() -> None:
    clock = Clock()
    cache = MemoryCache(1000, clock=clock)

    async def run() -> None:
        await cache.set("k", b"value", ttl_s=10)
        clock.now += 9.9
        assert await cache.get("k") == b"value"
        clock.now += 0.2
        assert await cache.get("k") is None
        assert len(cache) == 0 and cache.size == 0

    asyncio.run(run())


def test_memory_cache_is_bounded_in_bytes_least_recently_used_out_first() -> None:
    cache = MemoryCache(30)

    async def run() -> None:
        for name in ("a", "b", "c"):
            await cache.set(name, b"x" * 10, ttl_s=60)
        assert await cache.get("a") == b"x" * 10  # a is now the most recently used
        await cache.set("d", b"y" * 10, ttl_s=60)  # over 30 bytes: b, the least recently used, goes
        assert await cache.get("b") is None
        assert {k for k in ("a", "c", "d") if await cache.get(k)} == {"a", "c", "d"}
        assert cache.size == 30
        await cache.set("big", b"z" * 31, ttl_s=60)  # larger than the whole bound: not stored, nothing evicted
        assert await cache.get("big") is None and len(cache) == 3
        await cache.set("a", b"w" * 5, ttl_s=60)  # replacing an entry counts its new size only
        assert cache.size == 25

    asyncio.run(run())


def test_an_answer_round_trips_as_a_cache_hit() -> None:
    members = [
        CallReport(name="a", model="openai/a", text="A says", cost=Decimal("0.000003")),
        CallReport(name="b", model="openai/b", status="cancelled", error="cut off", error_type="cancelled"),
    ]
    concluding = CallReport(name="j", model="openai/j", role="concluding", cost=Decimal("0.00001"))
    breakdown = Breakdown(members=members, concluding=concluding)
    cache = ResponseCache(MemoryCache(10_000), config())

    async def run() -> None:
        await cache.put_answer("k", 60, breakdown, ["Hel", "lo"], "stop")
        hit = await cache.get_answer("k")
        assert hit is not None
        assert hit.pieces == ["Hel", "lo"] and hit.finish_reason == "stop"
        assert [(m.name, m.status, m.text, m.cached, m.cost, m.saved) for m in hit.members] == [
            ("a", "ok", "A says", True, Decimal(0), Decimal("0.000003")),
            ("b", "cancelled", "", True, Decimal(0), None),
        ]
        assert (hit.concluding.role, hit.concluding.cost, hit.concluding.saved) == ("concluding", 0, Decimal("0.00001"))
        replayed = Breakdown(members=hit.members, concluding=hit.concluding, cache="hit")
        assert replayed.cost == 0 and replayed.saved == Decimal("0.000013") and replayed.usage().total_tokens == 0
        await cache.store.set("a:broken", b"not json", 60)
        assert await cache.get_answer("broken") is None  # an unreadable entry is a miss

    asyncio.run(run())


def test_only_whole_answers_are_cacheable() -> None:
    ok = CallReport(name="a", model="m")
    judge = CallReport(name="j", model="m", role="concluding")
    cut = CallReport(name="b", model="m", status="cancelled", error_type="cancelled")
    failed = CallReport(name="b", model="m", status="error", error_type="http_error")
    open_circuit = CallReport(name="b", model="m", status="skipped", error_type="circuit_open")
    blind = CallReport(name="b", model="m", status="skipped", error_type="cannot_see_images")
    assert cacheable(Breakdown(members=[ok, cut], concluding=judge))  # a quorum's cut is by design
    assert cacheable(Breakdown(members=[ok, blind], concluding=judge))
    assert not cacheable(Breakdown(members=[ok, failed], concluding=judge))
    assert not cacheable(Breakdown(members=[ok, open_circuit], concluding=judge))
    failed_judge = CallReport(name="j", model="m", role="concluding", status="error")
    assert not cacheable(Breakdown(members=[ok], concluding=failed_judge))


async def test_memory_cache_entries_take_their_size_not_orjsons_buffer() -> None:
    # a bytes object from orjson.dumps keeps its whole write buffer (4 KiB at least): stored as is, 1,000 short
    # entries would take over 4 MB while the byte bound counts 40 KB of them
    cache = MemoryCache(10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            await cache.set(f"k{i}", orjson.dumps({"text": "short", "i": i}), 60)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 1000 and cache.size < 1000 * 40
    assert grown < 1000 * 600, grown
