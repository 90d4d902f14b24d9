"""The plan: one request resolved against the config, before any upstream call. Who is asked (with images, only
the members that can see them), who concludes, with what: the conversation in each provider family's shapes,
images checked (and downloaded for the providers that need the bytes), what the cache may do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal

import orjson

from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
from mom_service.engine.events import Surface
from mom_service.engine.steering import NO_STEERING, Steering, steer
from mom_service.engine.tiers import Tiered, choose_tier
from mom_service.engine.tools import describe_tools, ends_with_tool_results, has_tool_history, history_as_text
from mom_service.errors import InvalidRequest, NotFound
from mom_service.providers.image_fetch import download_all
from mom_service.providers.images import check_images
from mom_service.providers.sanitize import NOTHING_DOWNLOADED, RULES, Family, family, needs_bytes, sanitize


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
    tier: str | None = None  # the effort tier chosen (engine/tiers.py)
    efforts: tuple[str | None, str | None] = (None, None)  # the members' and the concluding effort, as asked
    strategy: str = "synthesize"  # what follows the panel's answers (engine/strategies), as this request runs it
    rankers: tuple[Concluder, ...] = ()  # rank: who ranks, as each would be asked (empty: the members who answered)

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


ToolsMode = Literal["native", "text", "none"]


def _tools_mode(tools: list[dict[str, Any]] | None, history: bool, can_call: bool) -> ToolsMode:
    """How an LLM gets the request's tools: the real ones, written out as text (it cannot call them, or the
    conversation has tool history but the request no tools), or not at all."""
    if tools and can_call:
        return "native"
    return "text" if tools or history else "none"


def _format_note(form: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a member is told of a requested JSON answer: the concluding LLM formats it, the member reasons freely."""
    if form is None:
        return None
    schema = (form.get("json_schema") or {}).get("schema")
    shape = f"JSON matching this schema: {orjson.dumps(schema).decode()}" if schema else "a JSON object"
    text = (
        f"Note: the final answer to the user will be {shape}, written by another model from your answer. Reason "
        "and answer freely; do not worry about the format."
    )
    return {"role": "system", "content": text}


class _Shapes:
    """The conversation in the shapes each LLM gets, made once per (family, images, tools), serialized once."""

    def __init__(
        self,
        messages: list[dict[str, Any]],
        downloaded: Mapping[str, str],
        tools: list[dict[str, Any]] | None,
        note: dict[str, Any] | None,
    ) -> None:
        self._messages, self._downloaded, self._tools, self._note = messages, downloaded, tools, note
        self._shaped: dict[tuple[Family, bool, ToolsMode, bool], list[dict[str, Any]]] = {}
        self._encoded: dict[int, bytes] = {}

    def of(self, llm: LLMDefinition, sees: bool, mode: ToolsMode, member: bool) -> list[dict[str, Any]]:
        key = (family(llm), sees, mode, member)
        if key not in self._shaped:
            messages = self._messages if mode != "text" else history_as_text(self._messages)
            shaped = sanitize(messages, RULES[key[0]], vision=sees, downloaded=self._downloaded)
            extra = (
                [{"role": "system", "content": describe_tools(self._tools)}] if mode == "text" and self._tools else []
            )
            if member and self._note is not None:
                extra.append(self._note)
            self._shaped[key] = [*shaped, *extra]
        return self._shaped[key]

    def encoded(self, shapes: list[dict[str, Any]]) -> bytes:
        if id(shapes) not in self._encoded:
            self._encoded[id(shapes)] = orjson.dumps(shapes, option=orjson.OPT_SORT_KEYS)
        return self._encoded[id(shapes)]


def make_plan(
    config: MoMConfig,
    mom: MoMModelConfig,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    vision: Mapping[str, bool],
    has_images: bool,
    request_id: str,
    stream: bool,
    user: str | None = None,
    cache: CachePolicy | None = None,
    downloaded: Mapping[str, str] = NOTHING_DOWNLOADED,
    caller: str = "",
    final_params: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tools_ok: Mapping[str, bool] | None = None,
    surface: Surface = "chat",
    steering: Steering = NO_STEERING,
    tiered: Tiered | None = None,
    reasoning_ok: Mapping[str, bool] | None = None,
) -> Plan:
    """Who is asked: with images, only the members that can see them (400 when none can); with tools, concluding
    LLMs that can call them (400 when none can); a tool loop's next step (the conversation ends with tool results)
    goes to the concluding LLM alone unless the MoM model says `continuation: panel`."""
    final_params = final_params or {}
    can_call = tools_ok or {}
    turn: Literal["ensemble", "relay"] = (
        "relay" if ends_with_tool_results(messages) and mom.tools.continuation == "relay" else "ensemble"
    )
    history = has_tool_history(messages)
    form = final_params.get("response_format")
    note = _format_note(form if isinstance(form, dict) and form.get("type") != "text" else None)
    shapes = _Shapes(messages, downloaded, tools, note)
    members = _members(config, mom, shapes, params, final_params, tools, history, vision, can_call, has_images, turn)
    concluders = _concluders(config, mom, shapes, tools, history, vision, can_call, has_images)
    tiered = tiered or Tiered(mom)
    members, concluders = _with_efforts(members, concluders, tiered, reasoning_ok or {})
    voting = tools is not None and mom.tools.strategy == "vote" and turn == "ensemble"
    strategy, steering = _strategy(mom, tools, form, turn, steering)
    rankers = _rankers(config, mom, shapes, vision, has_images, history, members) if strategy == "rank" else ()
    return Plan(
        request_id=request_id,
        mom=mom,
        members=tuple(members),
        concluders=concluders,
        has_images=has_images,
        prompt=_with_instruction(config.concluding_prompt(mom), steering.instruction),
        params=params,
        stream=stream,
        user=user,
        conversation=tuple(messages),
        cache=cache if cache is not None and _cached(mom, final_params, steering) else NO_CACHE,
        cache_owner="" if mom.cache.scope == "global" else caller,
        final_params=final_params,
        tools=tools,
        turn=turn,
        vote_threshold=mom.tools.vote_threshold if voting else None,
        surface=surface,
        max_cost_usd=steering.max_cost_usd if steering.max_cost_usd is not None else mom.max_cost_usd,
        steering=steering,
        caller=caller,
        tier=tiered.tier,
        efforts=(tiered.member_effort, tiered.concluding_effort),
        strategy=strategy,
        rankers=rankers,
    )


def _strategy(
    mom: MoMModelConfig, tools: list[dict[str, Any]] | None, form: Any, turn: str, steering: Steering
) -> tuple[str, Steering]:
    """The strategy this request runs: the MoM model's (as steered), but `synthesize` for a tool loop's relay turn,
    and, with a notice, for a request with tools or a JSON answer (only a concluding call can keep those)."""
    if mom.strategy == "synthesize" or turn == "relay" or (mom.strategy == "layers" and mom.layers < 2):
        return "synthesize", steering
    why = (
        "tools" if tools else "a JSON response format" if isinstance(form, dict) and form.get("type") != "text" else ""
    )
    if not why:
        return mom.strategy, steering
    notice = f"strategy: '{mom.strategy}' does not apply to a request with {why}; the answer is synthesized."
    return "synthesize", replace(steering, notices=(*steering.notices, notice))


def _rankers(
    config: MoMConfig,
    mom: MoMModelConfig,
    shapes: _Shapes,
    vision: Mapping[str, bool],
    has_images: bool,
    history: bool,
    members: list[Member],
) -> tuple[Concluder, ...]:
    """The configured rankers, as each is asked (the conversation in its shapes); none configured: the members."""
    names = mom.rankers if mom.rankers is not None else [m.llm.name for m in members if m.skipped is None]
    out = []
    for name in dict.fromkeys(names):
        llm = config.llm(name)
        sees = vision[llm.name]
        images: Literal["sent", "placeholders"] | None = ("sent" if sees else "placeholders") if has_images else None
        conversation = tuple(shapes.of(llm, sees, _tools_mode(None, history, True), member=False))
        out.append(Concluder(llm, conversation, images))
    return tuple(out)


def _cached(mom: MoMModelConfig, final_params: dict[str, Any], steering: Steering) -> bool:
    return mom.cache.enabled and not final_params.get("logprobs") and not steering.cache_off


INSTRUCTION_HEAD = "The user gave this instruction for the final answer (the panel did not see it):"


def _with_instruction(prompt: str, instruction: str | None) -> str:
    """The concluding prompt, with the caller's directive instruction (which no member sees) after it."""
    return prompt if not instruction else f"{prompt}\n\n{INSTRUCTION_HEAD}\n{instruction}"


def _with_efforts(
    members: list[Member], concluders: tuple[Concluder, ...], tiered: Tiered, takes: Mapping[str, bool]
) -> tuple[list[Member], tuple[Concluder, ...]]:
    """Each call's `reasoning_effort`: its role's (the tier's, or the request's), for the LLMs that take one."""
    member, concluding = tiered.member_effort, tiered.concluding_effort
    if member is not None:
        members = [
            replace(m, params={**m.params, "reasoning_effort": member}) if takes.get(m.llm.name, False) else m
            for m in members
        ]
    if concluding is not None:
        concluders = tuple(replace(c, effort=concluding) if takes.get(c.llm.name, False) else c for c in concluders)
    return members, concluders


def _members(
    config: MoMConfig,
    mom: MoMModelConfig,
    shapes: _Shapes,
    params: dict[str, Any],
    final_params: dict[str, Any],
    tools: list[dict[str, Any]] | None,
    history: bool,
    vision: Mapping[str, bool],
    can_call: Mapping[str, bool],
    has_images: bool,
    turn: str,
) -> list[Member]:
    members = []
    choice = final_params.get("tool_choice")
    voting = mom.tools.strategy == "vote"
    for name in mom.llms_to_query:
        llm = config.llm(name)
        if turn == "relay":
            members.append(Member(llm, [], skipped="not asked: a tool loop's turn, relayed", skipped_kind="relay"))
            continue
        if has_images and not vision[name]:
            members.append(Member(llm, [], skipped="cannot see images (multimodal: false, or not in LiteLLM's info)"))
            continue
        mode = _tools_mode(tools, history, can_call.get(name, True))
        conversation = shapes.of(llm, True, mode, member=True)
        member_params = dict(params)
        temperature = mom.temperature_of(name)
        if temperature is not None:  # a sample's own (Self-MoA)
            member_params["temperature"] = temperature
        if mode == "native" and tools:
            member_params["tools"] = tools
            member_params["tool_choice"] = (
                choice if voting and choice is not None else ("none" if choice == "none" else "auto")
            )
            if voting and "parallel_tool_calls" in final_params:  # a vote's calls are the answer: as the client allows
                member_params["parallel_tool_calls"] = final_params["parallel_tool_calls"]
        members.append(Member(llm, conversation, encoded=shapes.encoded(conversation), params=member_params))
    if turn != "relay" and not any(m.skipped is None for m in members):
        raise InvalidRequest(
            f"The MoM model '{mom.name}' cannot answer a request with images: none of its panel members "
            f"({', '.join(mom.llms_to_query)}) can see images.",
            param="messages",
            code="images_not_supported",
        )
    return members


def _concluders(
    config: MoMConfig,
    mom: MoMModelConfig,
    shapes: _Shapes,
    tools: list[dict[str, Any]] | None,
    history: bool,
    vision: Mapping[str, bool],
    can_call: Mapping[str, bool],
    has_images: bool,
) -> tuple[Concluder, ...]:
    names = [mom.concluding_llm, *mom.concluding_fallbacks]
    able = [n for n in names if can_call.get(n, True)] if tools else names
    if not able:
        raise InvalidRequest(
            f"The MoM model '{mom.name}' cannot answer a request with tools: none of its concluding LLMs "
            f"({', '.join(names)}) can call tools.",
            param="tools",
            code="tools_not_supported",
        )
    out = []
    for name in able:
        llm = config.llm(name)
        sees = vision[llm.name]
        images: Literal["sent", "placeholders"] | None = ("sent" if sees else "placeholders") if has_images else None
        mode = _tools_mode(tools, history, can_call.get(name, True))
        out.append(Concluder(llm, tuple(shapes.of(llm, sees, mode, member=False)), images))
    return tuple(out)


async def prepare(
    request: Request,
    config: MoMConfig,
    vision: Mapping[str, bool],
    images: ImagePolicy = DEFAULT_IMAGES,
    tools_ok: Mapping[str, bool] | None = None,
    *,
    download: bool = True,
    reasoning_ok: Mapping[str, bool] | None = None,
) -> Plan:
    """The plan of a request: its MoM model (404 when there is none), its images checked, downloaded where a
    provider needs the bytes (400 on any problem), all before any upstream call. Without `download`, a plan only to
    look at (to count its tokens): images are checked, not downloaded. The request's effort picks the MoM model's
    tier first (engine/tiers.py)."""
    configured = config.mom_model(request.model)
    if configured is None:
        raise NotFound(f"The model '{request.model}' does not exist.", code="model_not_found", param="model")
    tiered = choose_tier(configured, request.effort)  # the tier first: the caller's controls change it
    mom, messages, steering = steer(config, tiered.mom, request.controls, request.messages, configured)
    checked = await check_images(messages, max_images=images.max_images, allow_private=images.allow_private)
    downloaded: dict[str, str] = {}  # image URL -> the data: URL of its bytes, for the providers that need them
    asked = (config.llm(n) for n in (*mom.llms_to_query, mom.concluding_llm, *mom.concluding_fallbacks))
    if not download:  # each URL stands for its bytes: nothing will be sent
        downloaded = {image.url: image.url for image in checked.remote}
    elif checked.remote and needs_bytes(asked, vision):
        downloaded = await download_all(checked.remote, max_bytes=images.max_bytes, timeout_s=images.fetch_timeout_s)
    return make_plan(
        config,
        mom,
        messages,
        request.params,
        vision=vision,
        has_images=checked.count > 0,
        downloaded=downloaded,
        request_id=request.request_id,
        stream=request.stream,
        user=request.user,
        cache=request.cache,
        caller=request.caller,
        final_params=request.final_params,
        tools=request.tools,
        tools_ok=tools_ok,
        surface=request.surface,
        steering=steering,
        tiered=tiered,
        reasoning_ok=reasoning_ok,
    )
