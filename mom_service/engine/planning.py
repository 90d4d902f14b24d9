"""Planning: one request resolved against the config, before any upstream call. Who is asked (with images, only
the members that can see them), who concludes and who ranks, with what: the conversation in each provider family's
shapes, images checked (and downloaded for the providers that need the bytes), the strategy, what the cache may
do. The plan's types are in engine/plan.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import orjson

from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig
from mom_service.engine.events import KeyLabel, Surface
from mom_service.engine.plan import DEFAULT_IMAGES, NO_CACHE, CachePolicy, Concluder, ImagePolicy, Member, Plan, Request
from mom_service.engine.steering import NO_STEERING, Steering, steer
from mom_service.engine.tiers import Tiered, choose_tier
from mom_service.engine.tools import describe_tools, ends_with_tool_results, has_tool_history, history_as_text
from mom_service.errors import InvalidRequest, NotFound
from mom_service.providers.image_fetch import download_all
from mom_service.providers.images import check_images
from mom_service.providers.sanitize import NOTHING_DOWNLOADED, RULES, Family, family, needs_bytes, sanitize

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
        self._shaped: dict[tuple[Family, bool, ToolsMode, bool, str | None], list[dict[str, Any]]] = {}
        self._encoded: dict[int, bytes] = {}

    def of(self, llm: LLMDefinition, sees: bool, mode: ToolsMode, member: bool) -> list[dict[str, Any]]:
        """The conversation as `llm` gets it; a member's starts with the LLM's own `system_prompt`, if it has one
        (before the conversation's system messages, which stay)."""
        own = llm.system_prompt if member else None
        key = (family(llm), sees, mode, member, own)
        if key not in self._shaped:
            messages = self._messages if mode != "text" else history_as_text(self._messages)
            shaped = sanitize(messages, RULES[key[0]], vision=sees, downloaded=self._downloaded)
            extra = (
                [{"role": "system", "content": describe_tools(self._tools)}] if mode == "text" and self._tools else []
            )
            if member and self._note is not None:
                extra.append(self._note)
            first = [{"role": "system", "content": own}] if own is not None else []
            self._shaped[key] = [*first, *shaped, *extra]
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
    key: KeyLabel | None = None,
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
        key=key,
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
        key=request.key,
        final_params=request.final_params,
        tools=request.tools,
        tools_ok=tools_ok,
        surface=request.surface,
        steering=steering,
        tiered=tiered,
        reasoning_ok=reasoning_ok,
    )
