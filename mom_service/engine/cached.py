"""What the engine keeps in the response cache: whole answers (the calls' reports and the synthesis as it was
streamed) and members' answers, as orjson bytes in a store (cache/stores.py) under the keys of cache/keys.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import orjson

from mom_service.cache.keys import answer_key, panel_identity
from mom_service.cache.stores import CacheStore
from mom_service.config import MoMConfig
from mom_service.engine.events import Breakdown, CallReport, Turn
from mom_service.providers.pricing import ZERO


def _cost(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _paid(report: CallReport) -> Decimal | None:
    """What the call that produced this answer cost (of an answer itself from the cache: what that one saved)."""
    return report.saved if report.cached else report.cost


def cached_copy(report: CallReport) -> CallReport:
    """A call as a cache hit shows it: no upstream call was made, so nothing is paid; its cost is saved."""
    return CallReport(
        name=report.name,
        model=report.model,
        status=report.status,
        error=report.error,
        error_type=report.error_type,
        cost=ZERO,
        saved=None if report.status == "skipped" else _paid(report),
        cached=True,
        text=report.text,
        tool_calls=report.tool_calls,
        role=report.role,
        stage=report.stage,
        images=report.images,
        partial=report.partial,
        finish_reason=report.finish_reason,
    )


# A piece of an answer as it was streamed: its text, or a piece of one of its tool calls (ToolCallDelta's fields).
Piece = str | dict[str, Any]


@dataclass(slots=True)
class CachedAnswer:
    members: list[CallReport]
    concluding: CallReport
    pieces: list[Piece]  # the answer as it was streamed, replayed as the same chunks
    finish_reason: str
    turn: Turn = "ensemble"
    structured_output: Literal["valid", "invalid"] | None = None


@dataclass(slots=True, frozen=True)
class CachedMember:
    text: str
    saved: Decimal | None  # what the call that produced it cost
    tool_calls: list[dict[str, Any]] | None = None


def cacheable(breakdown: Breakdown) -> bool:
    """A whole answer of the synthesize strategy: no member failed or was skipped by its circuit (cut off by
    design by a quorum or deadline is fine), the concluding call answered."""
    if breakdown.structured_output == "invalid" or breakdown.strategy != "synthesize":
        return False  # (another strategy's stages and results are not part of what is stored)
    return breakdown.concluding.status in ("ok", "skipped") and not any(
        m.status == "error" or m.error_type == "circuit_open" for m in breakdown.members
    )


class ResponseCache:
    """Answers and members' answers over a store (memory or Redis), with their (de)serialization."""

    def __init__(self, store: CacheStore, config: MoMConfig) -> None:
        self.store = store
        self._panels = {m.name: panel_identity(config, m) for m in config.models}

    def answer_key(
        self, mom: str, messages: Sequence[dict[str, Any]], params: dict[str, Any], *, owner: str = ""
    ) -> str:
        return answer_key(self._panels[mom], messages, params, owner)

    async def get_answer(self, key: str) -> CachedAnswer | None:
        raw = await self.store.get("a:" + key)
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            members = [self._report(m) for m in data["members"]]
            concluding = self._report(data["concluding"])
            return CachedAnswer(
                members, concluding, data["pieces"], data["finish_reason"], data["turn"], data["structured_output"]
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # an entry of another version: a miss

    async def put_answer(
        self, key: str, ttl_s: float, breakdown: Breakdown, pieces: list[Piece], finish_reason: str
    ) -> None:
        data = {
            "members": [self._entry(m) for m in breakdown.members],
            "concluding": self._entry(breakdown.concluding),
            "pieces": pieces,
            "finish_reason": finish_reason,
            "turn": breakdown.turn,
            "structured_output": breakdown.structured_output,
        }
        await self.store.set("a:" + key, orjson.dumps(data), ttl_s)

    async def get_member(self, key: str) -> CachedMember | None:
        """A member's cached answer (its text and tool calls), with the cost of the call that produced it."""
        raw = await self.store.get("m:" + key)
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            cost = None if data["cost"] is None else Decimal(data["cost"])
            return CachedMember(str(data["text"]), cost, data["tool_calls"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, ArithmeticError):
            return None

    async def put_member(self, key: str, ttl_s: float, report: CallReport) -> None:
        value = {"text": report.text, "tool_calls": report.tool_calls, "cost": _cost(report.cost)}
        await self.store.set("m:" + key, orjson.dumps(value), ttl_s)

    @staticmethod
    def _entry(report: CallReport) -> dict[str, Any]:
        return {
            "name": report.name,
            "model": report.model,
            "status": report.status,
            "error": report.error,
            "error_type": report.error_type,
            "text": report.text,
            "tool_calls": report.tool_calls,
            "role": report.role,
            "stage": report.stage,
            "images": report.images,
            "cost": _cost(_paid(report)),
            "partial": report.partial,
            "finish_reason": report.finish_reason,
        }

    @staticmethod
    def _report(data: dict[str, Any]) -> CallReport:
        original = CallReport(
            name=data["name"],
            model=data["model"],
            status=data["status"],
            error=data["error"],
            error_type=data["error_type"],
            text=data["text"],
            tool_calls=data["tool_calls"],
            role=data["role"],
            stage=data.get("stage", "conclude" if data["role"] == "concluding" else "answer"),
            images=data["images"],
            cost=None if data["cost"] is None else Decimal(data["cost"]),
            partial=data.get("partial", False),
            finish_reason=data.get("finish_reason"),
        )
        return cached_copy(original)


def as_hit(breakdown: Breakdown, *, answered: bool = True) -> Breakdown:
    """An identical request's breakdown, as this request (which followed it and called nothing) shows it; when
    no answer came of it, it is not a hit and saved nothing."""
    hit = Breakdown(
        members=[cached_copy(r) for r in breakdown.members],
        concluding=cached_copy(breakdown.concluding),
        cache="hit" if answered else "miss",
        turn=breakdown.turn,
        structured_output=breakdown.structured_output,
        tier=breakdown.tier,
        strategy=breakdown.strategy,
        stage_calls=[cached_copy(r) for r in breakdown.stage_calls],
        ranking=breakdown.ranking,
        selected=breakdown.selected,
        votes=breakdown.votes,
    )
    if not answered:
        for report in hit.calls:
            report.saved = None
    return hit
