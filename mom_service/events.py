"""What the engine yields: typed events, and the usage arithmetic they carry. No HTTP here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mom_service.errors import MoMError

MemberStatus = Literal["ok", "error", "skipped", "cancelled"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes reasoning tokens, as OpenAI reports them
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cached_tokens += other.cached_tokens


@dataclass(slots=True)
class CallReport:
    """One upstream call as the breakdown shows it: a panel member or the concluding call."""

    name: str
    model: str
    status: MemberStatus = "ok"
    error: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    usage: Usage | None = None
    cost: float | None = None
    cached: bool = False
    text: str = ""


@dataclass(slots=True)
class Breakdown:
    members: list[CallReport]
    concluding: CallReport
    cache: Literal["hit", "miss"] = "miss"

    @property
    def answered(self) -> int:
        return sum(1 for m in self.members if m.status == "ok")

    @property
    def degraded(self) -> bool:
        return self.answered < len(self.members)

    def usage(self) -> Usage:
        total = Usage()
        for report in (*self.members, self.concluding):
            if report.usage is not None:
                total.add(report.usage)
        return total


@dataclass(slots=True)
class MemberFinished:
    """A member answered, failed or was cut off; sent the moment it happens."""

    report: CallReport


@dataclass(slots=True)
class PanelDone:
    """Every member is settled; the concluding call starts."""

    reports: list[CallReport]


@dataclass(slots=True)
class ContentDelta:
    text: str


@dataclass(slots=True)
class Completed:
    finish_reason: str
    breakdown: Breakdown
    usage: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class Failed:
    error: MoMError
    breakdown: Breakdown


Event = MemberFinished | PanelDone | ContentDelta | Completed | Failed
