"""The MCP server (docs/mcp.md): the ensemble as a tool, for agents that want a panel's opinion without changing
their model. Three tools: `consult` (a question to a MoM model's panel, with the same controls as
the `mom` body field, progress reported as each member settles), `list_models` and `usage`.

Over streamable HTTP at `/mcp` (`add_mcp`): the same token as every endpoint, checked before MCP's transport sees
the request; stateless (every POST stands alone, so any replica answers it, and nothing is kept between them), its
answers as SSE so that progress notifications reach the client. Over stdio, `mom-service mcp` (cli.py) runs the
same server. Off unless MOM_MCP_ENABLED=true.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mom_service import __version__
from mom_service.api.admission import Admission
from mom_service.api.auth import caller_id, require_caller
from mom_service.api.errors import scope_error_response
from mom_service.api.keys import Caller
from mom_service.api.routers.usage import usage_report
from mom_service.api.state import AppState, get_state
from mom_service.api.streaming import ServerStopping, unless_disconnected
from mom_service.api.surface import admitted, request_id
from mom_service.engine.events import (
    Breakdown,
    CallReport,
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberFinished,
    PanelDone,
    StageDone,
)
from mom_service.engine.plan import CachePolicy, Plan
from mom_service.engine.plan import Request as EngineRequest
from mom_service.errors import MoMError
from mom_service.settings import Settings
from mom_service.usage.money import usd

MCP_PATH = "/mcp"
LOCAL_CALLER = "stdio"  # the caller over stdio when no token names it (not a token's hash: it matches none)

INSTRUCTIONS = (
    "A Mixture-of-Models panel: `consult` asks several LLMs the same question and one concluding LLM writes the "
    "answer from theirs. Use it for a second opinion on a hard or high-stakes question; it costs the calls of the "
    "whole panel. `list_models` names the panels, `usage` reports what was spent."
)
CONSULT = (
    "Ask a MoM model's panel a question: every member answers it, then the concluding LLM writes one answer from "
    "theirs. Returns the answer, each member's status and cost, and the total cost (USD). The panel sees only the "
    "question: put in it everything it needs (code, context, constraints). Progress is reported as members answer."
)
CONTROLS = (
    "Optional steering of this request, the same as the `mom` body field of the HTTP API: only (list of members: "
    "ask just these), exclude (list: drop these), include (list: add these LLMs), concluding (an LLM name), thinking "
    "(off, think_tags, reasoning_content), min_successful, quorum, member_deadline_ms, max_cost_usd (a hard cap, "
    "USD), cache (on, off). Unknown names are ignored and reported in `notices`."
)


class CallResult(BaseModel):
    """One member (or the concluding LLM) of a consult: how it ended and what it cost."""

    name: str
    status: str  # ok, error, skipped, cancelled
    reason: str | None = None  # why it did not answer: timeout, http_error, cost_cap, ...
    error: str | None = None
    cost: float | None = None  # USD; null when its price is unknown
    latency_ms: float | None = None


class ConsultResult(BaseModel):
    answer: str
    model: str
    members: list[CallResult]
    concluding: CallResult
    cost: float | None = Field(description="USD of every call whose price is known; null when none is")
    answered: int
    asked: int
    degraded: bool = Field(description="true when some member asked did not answer")
    unpriced: list[str] = Field(description="LLMs without a known price, left out of the cost")
    notices: list[str] = Field(description="controls that were ignored, and why")


class ModelInfo(BaseModel):
    name: str
    description: str | None
    members: list[str]
    concluding: str


class ModelList(BaseModel):
    models: list[ModelInfo]


@dataclass(frozen=True, slots=True)
class Asker:
    """Who asks, for one tool call: the caller (their identity, their key) and the request's id (records, trace,
    log)."""

    caller: Caller
    request_id: str


StateSource = Callable[[], AppState | None]
CallerSource = Callable[[Context], Asker]
CALLER = "mcp_caller"  # request.state's: the caller `McpEndpoint` authenticated


def http_caller(ctx: Context) -> Asker:
    """The caller of a tool call over HTTP: its POST's (authenticated by `McpEndpoint`), its request id."""
    request = ctx.request_context.request
    caller = getattr(request.state, CALLER, None) if isinstance(request, Request) else None
    if not isinstance(request, Request) or not isinstance(caller, Caller):
        raise ToolError("This tool call came without its HTTP request.")
    return Asker(caller, request_id(request))


def stdio_caller(settings: Settings) -> CallerSource:
    """Over stdio the process owner is trusted; their requests are MOM_MCP_TOKEN's, else the first API_TOKEN's
    (sharing that token's cached answers and rate limit), else a local caller's. (A static token: an API key there
    is not looked up.)"""
    token = settings.mom_mcp_token.get_secret_value().encode() if settings.mom_mcp_token else None
    token = token or next(iter(settings.api_tokens), None)
    identity = Caller(caller_id(token) if token else LOCAL_CALLER)

    def caller(ctx: Context) -> Asker:
        return Asker(identity, str(uuid.uuid4()))

    return caller


def _call_result(report: CallReport) -> CallResult:
    return CallResult(
        name=report.name,
        status=report.status,
        reason=report.error_type,
        error=report.error,
        cost=usd(report.cost),
        latency_ms=report.latency_ms,
    )


def consult_result(model: str, answer: str, breakdown: Breakdown) -> ConsultResult:
    return ConsultResult(
        answer=answer,
        model=model,
        members=[_call_result(m) for m in breakdown.members],
        concluding=_call_result(breakdown.concluding),
        cost=usd(breakdown.cost),
        answered=breakdown.answered,
        asked=breakdown.asked,
        degraded=breakdown.degraded,
        unpriced=breakdown.unpriced,
        notices=list(breakdown.notices),
    )


def _settled(report: CallReport) -> str:
    """A progress message: the member and how it ended."""
    why = f" ({report.error_type})" if report.status != "ok" and report.error_type else ""
    return f"{report.name}: {report.status}{why}"


def _failure(error: MoMError, breakdown: Breakdown) -> str:
    members = ", ".join(_settled(m) for m in breakdown.members)
    spent = usd(breakdown.cost)
    cost = f"; the calls made cost {spent} USD" if spent else ""
    return f"{_error_text(error)} Members: {members}{cost}."


def _error_text(error: MoMError) -> str:
    return f"{error.message} ({error.code or error.error_type})"


class Tools:
    """The tools, over the app's state (HTTP: the app's; stdio: the process's) and a way to know the caller."""

    def __init__(self, state: StateSource, caller: CallerSource) -> None:
        self._state = state
        self._caller = caller

    def state(self) -> AppState:
        state = self._state()
        if state is None:
            raise ToolError("The service is starting or stopping; retry shortly.")
        return state

    async def consult(
        self,
        question: Annotated[str, Field(min_length=1, description="The question, with all the context it needs.")],
        ctx: Context,
        model: Annotated[str | None, Field(description="A MoM model (list_models); default: the first")] = None,
        controls: Annotated[dict[str, Any] | None, Field(description=CONTROLS)] = None,
    ) -> ConsultResult:
        state, asker = self.state(), self._caller(ctx)
        caller = asker.caller
        engine = state.engine  # this call's, to its end: a config reload meanwhile does not change it
        asked = EngineRequest(
            model=model or engine.config.models[0].name,
            messages=[{"role": "user", "content": question}],
            params={},
            request_id=asker.request_id,
            caller=caller.id,
            key=caller.label,
            cache=CachePolicy() if engine.cache is not None else None,
            surface="mcp",
            controls=controls,
        )
        try:
            await state.keys.admit_rate(caller)
            plan = await admitted(state, engine, caller, asked)
            work = _answer(plan, engine.run(plan), ctx)
            return await unless_disconnected(None, work, state.admission.cut_off)
        except ServerStopping:
            raise ToolError(_error_text(Admission.cut_off_error())) from None
        except MoMError as exc:
            raise ToolError(_error_text(exc)) from None
        finally:  # a run that never started reports no outcome (a settled one is not changed)
            state.keys.release(asker.request_id)

    async def list_models(self) -> ModelList:
        models = self.state().config.models
        return ModelList(
            models=[
                ModelInfo(name=m.name, description=m.description, members=m.llms_to_query, concluding=m.concluding_llm)
                for m in models
            ]
        )

    async def usage(
        self,
        ctx: Context,
        start: Annotated[str | None, Field(description="ISO 8601 or unix seconds; default: 24 h before end")] = None,
        end: Annotated[str | None, Field(description="ISO 8601 or unix seconds; default: now")] = None,
        model: Annotated[str | None, Field(description="only this MoM model")] = None,
        llm: Annotated[str | None, Field(description="only this LLM's calls")] = None,
        group_by: Annotated[str | None, Field(description="model, llm, surface, key, day or hour")] = None,
    ) -> dict[str, Any]:
        try:
            caller = self._caller(ctx).caller  # the caller's own requests only (a key's: the key's)
            query = {"start": start, "end": end, "model": model, "llm": llm, "group_by": group_by}
            owner = {"key_id": caller.key.id} if caller.key is not None else {"caller": caller.id}
            return await usage_report(self.state(), **query, **owner)
        except MoMError as exc:
            raise ToolError(_error_text(exc)) from None


def _steps(plan: Plan) -> int:
    """How many steps a run's progress counts: each member's call in each round (`layers`), the strategy's stage
    (a ranking, a judgement, a vote), the answer."""
    rounds = plan.mom.layers if plan.strategy == "layers" else 1
    return len(plan.members) * rounds + (plan.strategy in ("rank", "best_of", "vote")) + 1


async def _answer(plan: Plan, events: AsyncGenerator[Event], ctx: Context) -> ConsultResult:
    """The engine's events as one result; progress meanwhile: each member as it settles (in each round), the
    strategy's stage, of those steps and the answer (`_steps`)."""
    total = _steps(plan)
    settled = 0
    text: list[str] = []
    concluding = plan.concluders[0].llm.name if plan.concluders else plan.mom.concluding_llm
    async with aclosing(events):
        async for event in events:
            if isinstance(event, MemberFinished | StageDone):
                settled = min(settled + 1, total - 1)
                done = _settled(event.report) if isinstance(event, MemberFinished) else f"{event.stage}: done"
                await ctx.report_progress(settled, total, done)
            elif isinstance(event, PanelDone):
                await ctx.report_progress(settled, total, f"{concluding}: concluding from the panel's answers")
            elif isinstance(event, ContentDelta):
                text.append(event.text)
            elif isinstance(event, Completed):
                await ctx.report_progress(total, total, f"{concluding}: {event.breakdown.concluding.status}")
                return consult_result(plan.mom.name, "".join(text), event.breakdown)
            elif isinstance(event, Failed):
                raise ToolError(_failure(event.error, event.breakdown))
    raise RuntimeError("the engine ended without an answer")


def build_server(state: StateSource, caller: CallerSource) -> MCPServer:
    """The MCP server with its three tools."""
    tools = Tools(state, caller)
    server = _keeping_root_logger(
        lambda: MCPServer("mom-service", title="MoM Service", version=__version__, instructions=INSTRUCTIONS)
    )
    server.add_tool(tools.consult, name="consult", description=CONSULT)
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    server.add_tool(
        tools.list_models,
        name="list_models",
        description="The MoM models: each one's description, panel members and concluding LLM.",
        annotations=read_only,
    )
    server.add_tool(
        tools.usage,
        name="usage",
        description="Your usage report (requests, tokens, cost, latency) over a time range, as GET /v1/metrics/usage "
        "gives it, of your own requests only: totals, per-MoM-model and per-LLM figures, optionally grouped.",
        annotations=read_only,
    )
    return server


def _keeping_root_logger(build: Callable[[], MCPServer]) -> MCPServer:
    """MCPServer's constructor configures the root logger (a handler, a level): keep ours as it was, so that the
    service's logs stay its own (observability/logs.py)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return build()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class McpEndpoint:
    """`/mcp`: the token checked as on every endpoint (401 without it, before MCP sees the request), then MCP's
    streamable HTTP transport."""

    def __init__(self, server: MCPServer) -> None:
        self._transport = StreamableHTTPASGIApp(server.session_manager)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            setattr(request.state, CALLER, await require_caller(request, await get_state(request)))
        except MoMError as exc:
            await scope_error_response(exc, scope)(scope, receive, send)
            return
        await self._transport(scope, receive, send)


def add_mcp(app: FastAPI, settings: Settings) -> MCPServer:
    """Serve the MCP server at /mcp; the app's lifespan runs its `session_manager`."""

    def state() -> AppState | None:
        found = getattr(app.state, "mom", None)
        return found if isinstance(found, AppState) else None

    server = build_server(state, http_caller)
    server.streamable_http_app(
        stateless_http=True,
        json_response=False,  # SSE: progress notifications travel before the result
        max_request_body_size=settings.mom_max_body_bytes,
        # The token guards /mcp, and CORS is the app's: no Host allowlist, which would refuse every public name
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    app.router.routes.append(Route(MCP_PATH, McpEndpoint(server)))
    return server
