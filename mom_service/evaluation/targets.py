"""The targets of a run and how each is asked, in process through the service's engine: a MoM model as a request
(`Engine.prepare`, `Engine.run`), a single LLM (or the judge) as one direct call through the engine's caller, priced
from its price book. Every request and call is recorded as `serve` records it (surface `eval`)."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from mom_service.config import LLMDefinition, MoMConfig
from mom_service.engine.cost_cap import CallCost, worst_case
from mom_service.engine.engine import Engine
from mom_service.engine.events import Breakdown, CallReport, Completed, ContentDelta, Failed, RequestOutcome
from mom_service.engine.plan import Request
from mom_service.errors import MoMError
from mom_service.evaluation.errors import EvalError
from mom_service.providers.errors import LLMCallError
from mom_service.providers.pricing import call_cost
from mom_service.providers.tokens import count_request

CALLER = "eval"  # the caller of the evaluation's requests in the usage records (no token's hash: it matches none)


@dataclass(frozen=True, slots=True)
class Target:
    """A MoM model, or a single LLM of llm_definitions asked directly."""

    name: str
    kind: Literal["mom", "llm"]


def resolve_targets(names: list[str], config: MoMConfig) -> list[Target]:
    targets: list[Target] = []
    llms = {d.name for d in config.llm_definitions}
    for name in names:
        if config.mom_model(name) is not None:
            targets.append(Target(name, "mom"))
        elif name in llms:
            targets.append(Target(name, "llm"))
        else:
            raise EvalError(
                f"Unknown target {name!r}: not a MoM model ({', '.join(m.name for m in config.models)}) nor an LLM "
                f"of llm_definitions ({', '.join(sorted(llms))})."
            )
    return targets


@dataclass(slots=True)
class Answer:
    text: str
    cost: Decimal | None  # None: an LLM's price is unknown
    latency_ms: float
    error: str | None = None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


class Asker:
    """Asks targets and the judge through one engine (the app's state's, as `serve` builds it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _llm(self, name: str) -> LLMDefinition:
        return self.engine.config.llm(name)

    async def ask(self, target: Target, messages: list[dict[str, Any]]) -> Answer:
        if target.kind == "mom":
            return await self._mom(target.name, messages)
        return await self.call(target.name, messages)

    async def worst_case(self, target: Target, messages: list[dict[str, Any]]) -> Decimal | None:
        """What asking it may cost at most (the cost cap's estimate); None when an LLM it calls has no price."""
        if target.kind == "llm":
            return self.call_worst_case(target.name, messages)
        engine = self.engine
        try:
            plan = await engine.prepare(_request(target.name, messages))
        except MoMError:
            return Decimal(0)  # refused before any call: asking it costs nothing (and records why)
        return worst_case(plan, engine.calls.prices, engine.ceilings)

    def call_worst_case(self, name: str, messages: list[dict[str, Any]]) -> Decimal | None:
        llm = self._llm(name)
        prices = self.engine.calls.prices.get(name)
        if prices is None:
            return None
        return CallCost(count_request(llm.model, messages), self.engine.ceilings[name], prices).worst()

    async def _mom(self, model: str, messages: list[dict[str, Any]]) -> Answer:
        started = time.perf_counter()
        text: list[str] = []
        try:
            plan = await self.engine.prepare(_request(model, messages))
            async with aclosing(self.engine.run(plan)) as events:
                async for event in events:
                    if isinstance(event, ContentDelta):
                        text.append(event.text)
                    elif isinstance(event, Completed):
                        return Answer("".join(text), event.breakdown.cost, _ms(started))
                    elif isinstance(event, Failed):
                        error = f"{event.error.message} ({event.error.code or event.error.error_type})"
                        return Answer("".join(text), event.breakdown.cost, _ms(started), error)
        except MoMError as exc:
            return Answer("", Decimal(0), _ms(started), f"{exc.message} ({exc.code or exc.error_type})")
        return Answer("".join(text), None, _ms(started), "the engine ended without an answer")

    async def call(self, name: str, messages: list[dict[str, Any]]) -> Answer:
        """One direct call to an LLM (a single-LLM target, or the judge), priced and recorded."""
        llm = self._llm(name)
        report = CallReport(name=name, model=llm.model, role="concluding", sent=True)
        started, started_at = time.perf_counter(), time.time()
        calls = self.engine.calls
        try:
            result = await self.engine.caller.complete(llm, messages, {})
        except LLMCallError as exc:
            calls.failed(llm, report, exc, messages, "")
        else:
            report.answered(result.text)
            report.usage = result.usage
            calls.charge(llm, report, messages, result.text)
        report.latency_ms = _ms(started)
        if report.usage is None:  # failed before it reached the provider: nothing spent
            report.cost = call_cost(None, calls.prices.get(name))
        self.engine.record(_outcome(name, report, started_at))
        error = None if report.status == "ok" else f"{report.error} ({report.error_type})"
        return Answer(report.text, report.cost, report.latency_ms, error)


def _request(model: str, messages: list[dict[str, Any]]) -> Request:
    """A MoM model's request as the evaluation makes it: fresh answers (no response cache), surface `eval`."""
    return Request(
        model=model,
        messages=messages,
        params={},
        request_id=f"eval-{uuid.uuid4()}",
        caller=CALLER,
        cache=None,
        surface="eval",
    )


def _outcome(name: str, report: CallReport, started_at: float) -> RequestOutcome:
    """A direct call as a request of its own in the records: its model is the LLM's name, its one call concluding."""
    return RequestOutcome(
        request_id=f"eval-{uuid.uuid4()}",
        mom_model=name,
        stream=False,
        status="ok" if report.status == "ok" else "error",
        error_code=report.error_type if report.status != "ok" else None,
        started_at=started_at,
        latency_ms=report.latency_ms or 0.0,
        ttft_ms=None,
        breakdown=Breakdown(members=[], concluding=report),
        surface="eval",
        caller=CALLER,
    )
