"""What the engine yields: typed events, and the usage arithmetic they carry. No HTTP here."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from mom_service.errors import MoMError
from mom_service.providers.tokens import Usage as Usage  # re-exported: the events carry it

MemberStatus = Literal["ok", "error", "skipped", "cancelled"]
Turn = Literal["ensemble", "relay", "vote"]
# The protocol a request came in by: Chat Completions, Anthropic Messages, OpenAI Responses, MCP's `consult` tool,
# or `mom-service eval` (its MoM models' requests and its direct calls to single LLMs and the judge)
Surface = Literal["chat", "messages", "responses", "mcp", "eval"]
# a panel member, a ranker (rank), the concluding LLM (concluding, or judging for best_of and vote)
Role = Literal["member", "ranker", "concluding"]


@dataclass(slots=True)
class CallReport:
    """One upstream call as the breakdown shows it: a panel member or the concluding call."""

    name: str
    model: str
    status: MemberStatus = "ok"
    error: str | None = None
    error_type: str | None = None  # timeout, rate_limited, http_error, connection, missing_key, cancelled, ...
    latency_ms: float | None = None
    ttft_ms: float | None = None
    usage: Usage | None = None
    cost: Decimal | None = None  # USD; None when the LLM's price is unknown
    cached: bool = False
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None  # what it proposed to call, in OpenAI's shape (members)
    role: Role = "member"
    stage: str = ""  # the strategy's stage: answer, rank, conclude, judge (docs/strategies); "": its role's
    images: Literal["sent", "placeholders"] | None = None  # how the request's images reached this call
    estimated: bool = False  # usage counted by us (a cancelled call, or none reported), not by the provider
    saved: Decimal | None = None  # a cached answer: what the call that produced it cost (not paid again)
    sent: bool = False  # the request left for the provider (a call cancelled before that made no call)
    partial: bool = False  # cut off, and what it had written went to the concluding LLM (`partial_answers`)
    # why its answer ended, as its provider said: stop, tool_calls, length (cut short by its output token limit)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.stage:  # a member answers, the concluding call concludes, unless a strategy says otherwise
            self.stage = "conclude" if self.role == "concluding" else "rank" if self.role == "ranker" else "answer"

    # The states a call goes through: each a method, so its fields change together.
    def answered(self, text: str, tool_calls: list[dict[str, Any]] | None = None) -> None:
        self.status, self.error, self.error_type, self.text, self.tool_calls = "ok", None, None, text, tool_calls

    def failed(self, kind: str, message: str) -> None:
        self.status, self.error_type, self.error = "error", kind, message

    def skipped(self, kind: str, message: str) -> None:
        """Not asked this time (its circuit is open, it cannot see the images, ...): no call, nothing to pay."""
        self.status, self.error_type, self.error, self.cost = "skipped", kind, message, Decimal(0)

    def cancelled(self, message: str) -> None:
        """Cut off before it answered (by a quorum or a deadline, the client leaving, a shutdown)."""
        self.status, self.error_type, self.error = "cancelled", "cancelled", message

    def from_cache(self, text: str, saved: Decimal | None, tool_calls: list[dict[str, Any]] | None = None) -> None:
        """Its answer to this input was cached: not asked again, nothing paid, the original call's cost saved."""
        self.answered(text, tool_calls)
        self.cached, self.cost, self.saved = True, Decimal(0), saved

    @property
    def asked(self) -> bool:
        """Meant to be asked: all but members skipped because they cannot see the request's images (a member
        skipped because its circuit is open counts, and makes the answer degraded)."""
        return self.status != "skipped" or self.error_type == "circuit_open"


@dataclass(slots=True)
class Breakdown:
    members: list[CallReport]
    concluding: CallReport  # the call that concluded (or the last one tried)
    cache: Literal["hit", "miss"] = "miss"
    concluding_failed: list[CallReport] = field(default_factory=list)  # concluding LLMs that failed before a token
    # ensemble: the panel answered and a concluding LLM concluded; relay: a tool loop's turn sent to the concluding
    # LLM alone; vote: enough members proposed the same tool calls, which are the answer
    turn: Turn = "ensemble"
    structured_output: Literal["valid", "invalid"] | None = None  # a requested JSON answer, checked
    notices: list[str] = field(default_factory=list)  # the caller's controls that were ignored, and why
    overrides: dict[str, Any] = field(default_factory=dict)  # the caller's controls that were applied
    tier: str | None = None  # the MoM model's effort tier the request's effort chose (engine/tiers.py)
    strategy: str = "synthesize"  # what followed the panel's answers (engine/strategies)
    stage_calls: list[CallReport] = field(default_factory=list)  # the strategy's calls besides members, concluding
    ranking: list[dict[str, Any]] | None = None  # rank: each member's Borda score and rank, best first
    selected: str | None = None  # best_of, vote: the member whose answer is returned verbatim
    votes: list[dict[str, Any]] | None = None  # vote: each final answer (normalized), its count and its members

    @property
    def answered(self) -> int:
        return sum(1 for m in self.members if m.status == "ok")

    @property
    def asked(self) -> int:
        """Members asked: all but those skipped because they cannot see the request's images."""
        return sum(1 for m in self.members if m.asked)

    @property
    def degraded(self) -> bool:
        return self.answered < self.asked

    @property
    def calls(self) -> tuple[CallReport, ...]:
        return (*self.members, *self.stage_calls, *self.concluding_failed, self.concluding)

    def usage(self) -> Usage:
        total = Usage()
        for report in self.calls:
            if report.usage is not None:
                total.add(report.usage)
        return total

    @property
    def cost(self) -> Decimal | None:
        """USD of every call whose price is known (exact, in Decimal); None when none is known."""
        known = [r.cost for r in self.calls if r.cost is not None]
        return sum(known, Decimal(0)) if known else None

    @property
    def saved(self) -> Decimal | None:
        """USD not spent thanks to the cache (answers or members' answers served from it); None when none was."""
        known = [r.saved for r in self.calls if r.saved is not None]
        return sum(known, Decimal(0)) if known else None

    @property
    def usage_estimated(self) -> bool:
        """Whether any call's usage is our estimate (not reported by its provider)."""
        return any(r.estimated for r in self.calls)

    @property
    def unpriced(self) -> list[str]:
        """The LLMs whose calls used tokens but have no known price: left out of `cost`."""
        return [r.name for r in self.calls if r.cost is None]


@dataclass(slots=True)
class MemberFinished:
    """A member answered, failed or was cut off; sent the moment it happens."""

    report: CallReport


@dataclass(slots=True)
class MemberStarted:
    """A member's call left for its provider: its report (name, model, stage) as it is now."""

    report: CallReport


@dataclass(slots=True)
class MemberDelta:
    """A piece of a member's answer, as it streams in."""

    report: CallReport
    text: str


@dataclass(slots=True)
class StageDone:
    """A stage of the strategy ended (the rankings, a vote): its summary, a block of the thinking context."""

    stage: str
    summary: str


@dataclass(slots=True)
class StageStarted:
    """A stage of the strategy begins (rank, judge, vote, round-2, ...): its calls are about to be made."""

    stage: str


@dataclass(slots=True)
class PanelDone:
    """Every member is settled; the concluding call starts (best_of, vote: a member's answer is returned verbatim,
    `selected` names it)."""

    reports: list[CallReport]
    selected: str | None = None


@dataclass(slots=True)
class ContentDelta:
    text: str
    logprobs: list[dict[str, Any]] | None = None  # the tokens' log probabilities, as OpenAI reports them, when asked


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a tool call of the answer, as OpenAI streams one: its first piece has its id and name, the others
    add to its arguments (a JSON string). `index` says which call of the answer it belongs to."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class Completed:
    finish_reason: str
    breakdown: Breakdown
    usage: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class Failed:
    error: MoMError
    breakdown: Breakdown


Event = (
    MemberStarted
    | MemberDelta
    | MemberFinished
    | StageStarted
    | StageDone
    | PanelDone
    | ContentDelta
    | ToolCallDelta
    | Completed
    | Failed
)

RequestStatus = Literal["ok", "error", "cancelled"]


@dataclass(frozen=True, slots=True)
class KeyLabel:
    """The API key a request came with, as its records and metrics name it (docs/keys.md)."""

    id: str
    name: str


@dataclass(slots=True)
class RequestOutcome:
    """What a finished request leaves for the usage records: how it ended and every upstream call."""

    request_id: str
    mom_model: str
    stream: bool
    status: RequestStatus
    error_code: str | None
    started_at: float  # unix seconds
    latency_ms: float
    ttft_ms: float | None
    breakdown: Breakdown
    surface: Surface = "chat"
    overrides: dict[str, Any] = field(default_factory=dict)  # the caller's controls applied (records, logs, traces)
    caller: str = ""  # who asked: the hash of its token (its usage is its own)
    key: KeyLabel | None = None  # the API key it came with (None: a static API_TOKEN)
