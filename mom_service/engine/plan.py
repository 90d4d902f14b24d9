"""The plan's types: the engine's request, and the plan made of it before any upstream call (who is asked, who
concludes and who ranks, with what). Planning itself is engine/planning.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from mom_service.config import LLMDefinition, MoMModelConfig
from mom_service.engine.events import KeyLabel, Surface
from mom_service.engine.steering import NO_STEERING, Steering


@dataclass(frozen=True, slots=True)
class Request:
    """What the engine is asked, whatever the protocol it came in: a MoM model, an OpenAI-shaped conversation (the
    engine's one shape of messages), the sampling parameters allowed through, and who asks."""

    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]  # sampling: every call gets them
    request_id: str
    caller: str = ""  # the caller's identity (a hash of its token): whose cached answers it may see
    stream: bool = False
    user: str | None = None
    cache: CachePolicy | None = None  # what the request lets the cache do (None: the cache is off)
    final_params: dict[str, Any] = field(default_factory=dict)  # the final answer's shape: the concluding call's
    tools: list[dict[str, Any]] | None = None  # function tools, in OpenAI's shape
    surface: Surface = "chat"  # the protocol it came in by (records, metrics, logs, traces; never the cache key)
    controls: Mapping[str, Any] | None = None  # the caller's steering: the `mom` body field, as sent (a JSON object)
    effort: str | None = None  # the request's reasoning effort as a level (none, minimal, low, medium, high, xhigh)
    key: KeyLabel | None = None  # the API key it came with (None: a static API_TOKEN): its records name it


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """What a request's images may be (MOM_MAX_IMAGES, MOM_ALLOW_PRIVATE_IMAGE_URLS, MOM_MAX_IMAGE_BYTES, ...)."""

    max_images: int = 20
    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    fetch_timeout_s: float = 10.0


DEFAULT_IMAGES = ImagePolicy()


@dataclass(slots=True, frozen=True)
class Member:
    """A panel member as this request asks it: the conversation in its provider's shapes and its call's parameters
    (the real tools when it can call them), or why it is skipped."""

    llm: LLMDefinition
    messages: list[dict[str, Any]]
    skipped: str | None = None
    skipped_kind: str = "cannot_see_images"
    encoded: bytes | None = None  # `messages` serialized once, shared by the members that get the same ones
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Concluder:
    """A concluding LLM as this request would ask it: the conversation in its shapes, images or placeholders."""

    llm: LLMDefinition
    conversation: tuple[dict[str, Any], ...]
    images: Literal["sent", "placeholders"] | None
    effort: str | None = None  # its `reasoning_effort` (None: not sent)
    ceiling: int | None = None  # under a cost cap: its output ceiling (max_tokens), at most what is left when it runs


@dataclass(slots=True, frozen=True)
class CachePolicy:
    """What the request lets the cache do (`Cache-Control: no-cache` skips the lookup, `no-store` the storing)."""

    lookup: bool = True
    store: bool = True

    @property
    def used(self) -> bool:
        return self.lookup or self.store


NO_CACHE = CachePolicy(lookup=False, store=False)


@dataclass(slots=True, frozen=True)
class Plan:
    """One request, resolved against the config: who is asked, who concludes, with what."""

    request_id: str
    mom: MoMModelConfig
    members: tuple[Member, ...]
    concluders: tuple[Concluder, ...]  # the concluding LLM, then its fallbacks (those able to), in order
    has_images: bool
    prompt: str
    params: dict[str, Any]  # sampling, for every call
    stream: bool
    user: str | None = None
    conversation: tuple[dict[str, Any], ...] = ()  # as the client sent it (for the trace)
    cache: CachePolicy = NO_CACHE  # what the cache may do for this request (NO_CACHE when the model's is off)
    cache_owner: str = ""  # whose cached answers it may see: the caller's identity, or "" when shared by everyone
    final_params: dict[str, Any] = field(default_factory=dict)  # the final answer's shape: the concluding call's
    tools: list[dict[str, Any]] | None = None
    turn: Literal["ensemble", "relay"] = "ensemble"  # relay: a tool loop's next step, the concluding LLM alone
    vote_threshold: int | None = None  # with tools and the vote strategy: how many members must agree
    surface: Surface = "chat"
    max_cost_usd: Decimal | None = None  # the request's cost cap (the caller's, else the MoM model's), USD
    steering: Steering = NO_STEERING  # what the caller's controls changed (`mom` is the model as steered)
    caller: str = ""  # who asks (the hash of its token): its usage records are its own
    key: KeyLabel | None = None  # the API key it came with: its records and metrics name it
    tier: str | None = None  # the effort tier chosen (engine/tiers.py)
    efforts: tuple[str | None, str | None] = (None, None)  # the members' and the concluding effort, as asked
    strategy: str = "synthesize"  # what follows the panel's answers (engine/strategies), as this request runs it
    rankers: tuple[Concluder, ...] = ()  # rank: who ranks, as each would be asked (empty: the members who answered)

    @property
    def members_streamed(self) -> bool:
        """Whether members are called streaming: as the MoM model (or the request) says; `auto`: when their text is
        used as they write it (reasoning_content thinking in a streamed answer; partial answers of members that a
        quorum or deadline may cut)."""
        mom = self.mom
        if mom.stream_members != "auto":
            return mom.stream_members == "on"
        live = self.stream and mom.include_thinking_context and mom.thinking_format == "reasoning_content"
        cut = mom.partial_answers and (mom.quorum is not None or mom.member_deadline_ms is not None)
        return live or cut

    @property
    def concluding_params(self) -> dict[str, Any]:
        """The concluding call's parameters: the sampling, the final answer's shape, the real tools."""
        params = {**self.params, **self.final_params}
        if self.tools:
            params["tools"] = self.tools
        return params

    def params_of(self, concluder: Concluder) -> dict[str, Any]:
        """One concluding LLM's parameters: the concluding call's, with its reasoning effort."""
        params = self.concluding_params
        if concluder.effort is not None:
            params["reasoning_effort"] = concluder.effort
        return params

    @property
    def response_format(self) -> dict[str, Any] | None:
        form = self.final_params.get("response_format")
        return form if isinstance(form, dict) and form.get("type") in ("json_object", "json_schema") else None

    @property
    def key_params(self) -> dict[str, Any]:
        """Everything in the request that decides the answer besides its messages (for the cache key)."""
        key = {**self.concluding_params, "turn": self.turn}
        if self.tier or any(self.efforts):
            key |= {"tier": self.tier, "efforts": self.efforts}
        if self.steering.applied:
            key["steering"] = {**self.steering.key, "instruction": self.steering.instruction}
        dropped = [m.llm.name for m in self.members if m.skipped_kind == "cost_cap"]
        if dropped:  # an answer without them is not the panel's answer to an uncapped request
            key["cost_cap_dropped"] = dropped
        if self.strategy != "synthesize":
            key["strategy"] = self.strategy
        return key
