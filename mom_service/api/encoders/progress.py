"""The progress stream's events (docs/progress.md): one run's engine events as progress frames, published to the
hub as they come, and the headers that tell a client where to read them.

Lifecycle events are published at once. Text is coalesced: the pieces of the answer (and of each member's, when
members stream) arriving within FLUSH_S make one delta, published by a timer, or before the next lifecycle event
(so a member's deltas come before its member_done, the answer's before run_done). On the per-chunk path a
ContentDelta costs a list append (and arming the timer, for the first piece of a batch).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from mom_service.api.encoders.breakdown import breakdown_dict, report_dict, usage_dict
from mom_service.api.signing import LinkSigner
from mom_service.engine.events import (
    CallReport,
    Completed,
    ContentDelta,
    Event,
    Failed,
    MemberDelta,
    MemberFinished,
    MemberStarted,
    PanelDone,
    StageDone,
    StageStarted,
)
from mom_service.engine.plan import Plan
from mom_service.errors import WITH_TRACEBACK
from mom_service.progress.hub import Frame, ProgressHub

logger = logging.getLogger("mom_service")

FLUSH_S = 0.05  # text pieces within this long make one delta event
REQUEST_ID_HEADER = "X-MoM-Request-Id"
PROGRESS_URL_HEADER = "X-MoM-Progress-Url"
# how a run that ended without its final event (the client left, the service stopped) is reported
CANCELLED = {
    "message": "The request ended before its answer: the client left, or the service stopped.",
    "type": "cancelled",
    "param": None,
    "code": "cancelled",
}


def progress_headers(run_id: str, links: LinkSigner) -> dict[str, str]:
    """The run's id, and the path of its progress stream with the run's link token."""
    return {REQUEST_ID_HEADER: run_id, PROGRESS_URL_HEADER: f"/v1/progress/{run_id}?token={links.token(run_id)}"}


def _call(name: str, model: str) -> dict[str, str]:
    return {"name": name, "model": model}


def run_started(plan: Plan) -> dict[str, Any]:
    """Who is asked (each member pending, or skipped and why), who concludes, by which strategy."""
    members = [
        {
            **_call(member.llm.name, member.llm.model),
            "status": "pending" if member.skipped is None else "skipped",
            "reason": None if member.skipped is None else member.skipped_kind,
        }
        for member in plan.members
    ]
    first = plan.concluders[0].llm
    return {
        "request_id": plan.request_id,
        "model": plan.mom.name,
        "surface": plan.surface,
        "stream": plan.stream,
        "strategy": plan.strategy,
        "turn": plan.turn,
        "tier": plan.tier,
        "members": members,
        "concluding": _call(first.name, first.model),
    }


def member(report: CallReport) -> dict[str, Any]:
    return {**_call(report.name, report.model), "stage": report.stage}


class RunProgress:
    """One run's progress: `see` each event, `close` when the run is over (however it ended)."""

    __slots__ = ("_answer", "_ended", "_hub", "_id", "_members", "_plan", "_sent", "_seq", "_timer")

    def __init__(self, hub: ProgressHub, plan: Plan, owner: str) -> None:
        self._hub, self._plan, self._id = hub, plan, plan.request_id
        self._seq = 0
        self._answer: list[str] = []  # the answer's text pieces; those up to `_sent` are published
        self._sent = 0
        self._members: dict[int, tuple[CallReport, list[str]]] = {}  # members' pieces not yet published
        self._timer: asyncio.TimerHandle | None = None  # armed while text waits to be published
        self._ended = False
        hub.open(self._id, owner)
        self._emit("run_started", run_started(plan))

    def see(self, event: Event) -> None:
        if type(event) is ContentDelta:  # first: nearly every event is one
            self._answer.append(event.text)
            if self._timer is None:
                self._arm()
            return
        try:
            self._lifecycle(event)
        except Exception as exc:  # the progress stream must never break an answer
            logger.error("progress of request %s failed", self._id, exc_info=exc, extra=WITH_TRACEBACK)

    def close(self) -> None:
        """The run is over: a run that ended without its final event is reported failed (cancelled)."""
        if not self._ended:
            self._flush()
            self._end("run_failed", {"error": CANCELLED, "mom": None})

    def _lifecycle(self, event: Event) -> None:
        if isinstance(event, MemberDelta):
            self._members.setdefault(id(event.report), (event.report, []))[1].append(event.text)
            if self._timer is None:
                self._arm()
            return
        if self._timer is not None:  # the text so far comes first
            self._flush()
        if isinstance(event, MemberStarted):
            self._emit("member_started", member(event.report))
        elif isinstance(event, MemberFinished):
            self._emit("member_done", {**report_dict(event.report), "text": event.report.text})
        elif isinstance(event, StageStarted):
            self._emit("stage_started", {"stage": event.stage})
        elif isinstance(event, StageDone):
            self._emit("stage_done", {"stage": event.stage, "summary": event.summary})
        elif isinstance(event, PanelDone):
            self._emit("concluding_started", self._concluding(event))
        elif isinstance(event, Completed):
            breakdown = event.breakdown
            done = {
                "finish_reason": event.finish_reason,
                "content": "".join(self._answer),
                "usage": usage_dict(event.usage, breakdown.cost),
                "mom": breakdown_dict(breakdown),
            }
            self._end("run_done", done)
        elif isinstance(event, Failed):
            self._end("run_failed", {"error": event.error.to_dict()["error"], "mom": breakdown_dict(event.breakdown)})

    def _concluding(self, event: PanelDone) -> dict[str, Any]:
        """Who writes the answer: the concluding LLM, or (best_of, vote) no one: `selected`'s answer is returned
        verbatim."""
        first = self._plan.concluders[0].llm
        writer = None if event.selected is not None else _call(first.name, first.model)
        return {"strategy": self._plan.strategy, "concluding": writer, "selected": event.selected}

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        self._seq += 1
        self._hub.publish(self._id, Frame.of(self._seq, kind, orjson.dumps(payload)))

    def _end(self, kind: str, payload: dict[str, Any]) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._emit(kind, payload)

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self._flush()
        except Exception as exc:
            logger.error("progress of request %s failed", self._id, exc_info=exc, extra=WITH_TRACEBACK)

    def _flush(self) -> None:
        """The text waiting: one member_delta per member, then one concluding_delta."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for report, pieces in self._members.values():
            self._emit("member_delta", {"name": report.name, "stage": report.stage, "text": "".join(pieces)})
        self._members.clear()
        if self._sent < len(self._answer):
            text = "".join(self._answer[self._sent :])
            self._sent = len(self._answer)
            if text:
                self._emit("concluding_delta", {"text": text})
