"""The caller steers one request, within the operator's limits: the `mom` body field and the in-message directive
(the body wins for a key both set) choose who is asked (`only`, `exclude`, `include`, in that order), who concludes,
the thinking context, the panel rules, the strategy, a cost cap and the cache. A mistake costs nothing and hides
nothing: an unknown key, name or value is ignored and reported as a notice (with the closest valid one); what cannot
run is a 400 before any upstream call."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from mom_service.config import STRATEGIES, MoMConfig, MoMModelConfig
from mom_service.engine.directives import extract
from mom_service.errors import InvalidRequest

KEYS = (
    "only",
    "exclude",
    "include",
    "concluding",
    "thinking",
    "min_successful",
    "quorum",
    "member_deadline_ms",
    "max_cost_usd",
    "cache",
    "strategy",
    "stream_members",
)
THINKING = ("off", "think_tags", "reasoning_content")
CACHE = ("on", "off")
STREAM_MEMBERS = ("auto", "on", "off")

Source = Literal["body", "directive"]


@dataclass(frozen=True, slots=True)
class Steering:
    """What the caller's controls did to a request: the overrides applied (as recorded), the notices, the
    instruction for the concluding LLM, the cost cap, whether the cache is off."""

    applied: dict[str, Any] = field(default_factory=dict)
    notices: tuple[str, ...] = ()
    instruction: str | None = None
    max_cost_usd: Decimal | None = None
    cache_off: bool = False

    @property
    def key(self) -> dict[str, Any]:
        """What of it decides the answer (for the cache key): all but the cap, the cache, the thinking context and
        whether members stream."""
        kept = ("max_cost_usd", "cache", "thinking", "stream_members")
        return {k: v for k, v in self.applied.items() if k not in kept}


NO_STEERING = Steering()


def suggestion(name: str, options: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, sorted(set(options)), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


@dataclass(slots=True)
class _Reader:
    """The controls as given, each with where it came from; notices as they are found."""

    values: dict[str, tuple[Source, Any]]
    notices: list[str] = field(default_factory=list)

    @staticmethod
    def where(source: Source, key: str) -> str:
        return f"mom.{key}" if source == "body" else f"<<SYSTEM>> {key}"

    def notice(self, key: str, text: str) -> None:
        self.notices.append(f"{self.where(self.values[key][0], key)}: {text}")

    def names(self, key: str) -> list[str] | None:
        if key not in self.values:
            return None
        value = self.values[key][1]
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(dict.fromkeys(v.strip() for v in value if v.strip()))
        self.notice(key, "expected a list of LLM names; ignored.")
        return None

    def name(self, key: str) -> str | None:
        if key not in self.values:
            return None
        value = self.values[key][1]
        if isinstance(value, str) and value.strip():
            return value.strip()
        self.notice(key, "expected an LLM name; ignored.")
        return None

    def choice(self, key: str, options: tuple[str, ...]) -> str | None:
        if key not in self.values:
            return None
        value = self.values[key][1]
        text = value.strip().lower() if isinstance(value, str) else None
        if text in options:
            return text
        hint = suggestion(str(value), options)
        self.notice(key, f"unknown value {_shown(value)} (one of {', '.join(options)}); ignored.{hint}")
        return None

    def integer(self, key: str, minimum: int) -> int | None:
        if key not in self.values:
            return None
        value = self.values[key][1]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        self.notice(key, f"expected an integer of at least {minimum}, got {_shown(value)}; ignored.")
        return None

    def money(self, key: str) -> Decimal | None:
        """A cap that cannot be read is a 400, never no cap."""
        if key not in self.values:
            return None
        source, value = self.values[key]
        amount: Decimal | None = None
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                amount = Decimal(str(value).strip())
            except InvalidOperation:
                amount = None
        if amount is None or not amount.is_finite() or amount < 0:
            raise InvalidRequest(
                f"Invalid '{self.where(source, key)}': expected an amount in USD of at least 0, got {_shown(value)}.",
                param="mom.max_cost_usd" if source == "body" else "messages",
                code="invalid_value",
            )
        return amount


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_controls(controls: Mapping[str, Any] | None, directive: Mapping[str, str]) -> _Reader:
    values: dict[str, tuple[Source, Any]] = {k: ("directive", v) for k, v in directive.items()}
    values.update({k: ("body", v) for k, v in (controls or {}).items()})  # the body wins
    reader = _Reader(values)
    for key in [k for k in values if k not in KEYS]:
        reader.notice(key, f"unknown key; ignored.{suggestion(key, KEYS)}")
        del values[key]
    return reader


@dataclass(slots=True)
class _Panel:
    """The panel and the concluding chain as the controls change them, and the overrides applied."""

    members: list[str]
    chain: list[str]
    mine: frozenset[str]  # the MoM model's own LLMs (its panel and concluding chain): usable without being allowed
    allowed: frozenset[str]  # the operator's allowed_llms
    catalogue: frozenset[str]
    applied: dict[str, Any] = field(default_factory=dict)

    def may_use(self, name: str, key: str, mom: str, where: str) -> None:
        if name not in self.mine and name not in self.allowed:
            raise InvalidRequest(
                f"'{where}': the LLM '{name}' may not be used with the MoM model '{mom}' (it is not one of its "
                "LLMs, and not in its overrides.allowed_llms).",
                param=f"mom.{key}" if where.startswith("mom.") else "messages",
                code="llm_not_allowed",
            )


def _choose(reader: _Reader, panel: _Panel, mom: str) -> None:
    """`only`, `exclude`, `include` (in that order), then `concluding`."""
    only = reader.names("only")
    if only is not None:
        for name in [n for n in only if n not in panel.members]:
            reader.notice("only", f"'{name}' is not a member of this panel; ignored.{suggestion(name, panel.members)}")
        panel.members = [n for n in only if n in panel.members]
        panel.applied["only"] = list(panel.members)
    exclude = reader.names("exclude")
    if exclude is not None:
        for name in [n for n in exclude if n not in panel.members]:
            reader.notice("exclude", f"'{name}' is not asked; ignored.{suggestion(name, panel.members)}")
        panel.applied["exclude"] = [n for n in exclude if n in panel.members]
        panel.members = [n for n in panel.members if n not in exclude]
    include = reader.names("include")
    added = []
    for name in include or ():
        where = reader.where(reader.values["include"][0], "include")
        if name in panel.members:
            reader.notice("include", f"'{name}' is already asked; ignored.")
        elif name not in panel.catalogue:
            usable = (panel.mine | panel.allowed) - set(panel.members)
            reader.notice("include", f"unknown LLM '{name}'; ignored.{suggestion(name, usable)}")
        else:
            panel.may_use(name, "include", mom, where)
            panel.members.append(name)
            added.append(name)
    if added:
        panel.applied["include"] = added
    concluding = reader.name("concluding")
    if concluding is not None:
        where = reader.where(reader.values["concluding"][0], "concluding")
        if concluding not in panel.catalogue:
            hint = suggestion(concluding, panel.mine | panel.allowed)
            reader.notice("concluding", f"unknown LLM '{concluding}'; ignored.{hint}")
        else:
            panel.may_use(concluding, "concluding", mom, where)
            panel.chain = [concluding, *(n for n in panel.chain if n != concluding)]
            panel.applied["concluding"] = concluding


def _rules(reader: _Reader, mom: MoMModelConfig, members: int, applied: dict[str, Any]) -> dict[str, Any]:
    """The thinking context and the panel rules asked for; a panel that cannot run is a 400 `empty_panel`."""
    update: dict[str, Any] = {}
    thinking = reader.choice("thinking", THINKING)
    if thinking is not None:
        update["include_thinking_context"] = thinking != "off"
        if thinking != "off":
            update["thinking_format"] = thinking
        applied["thinking"] = thinking
    strategy = reader.choice("strategy", STRATEGIES)
    if strategy is not None:
        update["strategy"] = applied["strategy"] = strategy
    streaming = reader.choice("stream_members", STREAM_MEMBERS)
    if streaming is not None:
        update["stream_members"] = applied["stream_members"] = streaming
    for key, minimum in (("min_successful", 1), ("quorum", 1), ("member_deadline_ms", 1)):
        value = reader.integer(key, minimum)
        if value is not None:
            update[key] = applied[key] = value
    needed = update.get("min_successful", mom.min_successful)
    if members == 0 or needed > members:
        why = "nothing is left to ask" if members == 0 else f"{members} member(s) to ask, {needed} must answer"
        raise InvalidRequest(
            f"The controls leave the MoM model '{mom.name}' with no panel that can answer: {why}.",
            param="mom",
            code="empty_panel",
        )
    quorum = update.get("quorum")
    if quorum is not None and quorum < needed:
        reader.notice("quorum", f"{quorum} is less than min_successful ({needed}); ignored.")
        del update["quorum"], applied["quorum"]
    elif quorum is not None and quorum > members:
        reader.notice("quorum", f"{quorum} is more than the {members} member(s) asked: every answer is awaited.")
    return update


def _refuse_disabled(mom: MoMModelConfig) -> None:
    raise InvalidRequest(
        f"The MoM model '{mom.name}' does not take per-request overrides (the `mom` field or a <<SYSTEM>> block).",
        param="mom",
        code="overrides_disabled",
    )


def steer(
    config: MoMConfig,
    mom: MoMModelConfig,
    controls: Mapping[str, Any] | None,
    messages: list[dict[str, Any]],
    configured: MoMModelConfig | None = None,
) -> tuple[MoMModelConfig, list[dict[str, Any]], Steering]:
    """The MoM model as this request runs it (`mom`: as configured, or its effort tier), the conversation without
    its directive blocks, and what was steered. A request with no controls and no block is returned as it is.
    The LLMs of the model as `configured` (its tiers' too) are its own: usable without being allowed."""
    stripped, directive = extract(messages, KEYS)
    if not controls and not directive.found:
        return mom, stripped, NO_STEERING  # (an earlier message's block, stale, is removed all the same)
    if not mom.overrides.enabled:
        _refuse_disabled(mom)
    _refuse_an_empty_question(stripped)
    reader = _read_controls(controls, directive.keys)
    chain = [mom.concluding_llm, *mom.concluding_fallbacks]
    panel = _Panel(
        members=list(mom.llms_to_query),
        chain=chain,
        mine=frozenset([*mom.llms_to_query, *chain, *(configured or mom).own_llms()]),
        allowed=frozenset(mom.overrides.allowed_llms),
        catalogue=frozenset(d.name for d in config.llm_definitions),
    )
    _choose(reader, panel, mom.name)
    update = _rules(reader, mom, len(panel.members), panel.applied)
    cap = reader.money("max_cost_usd")
    if cap is not None:
        panel.applied["max_cost_usd"] = str(cap)
    cache = reader.choice("cache", CACHE)
    if cache is not None:
        panel.applied["cache"] = cache
        if cache == "on" and not mom.cache.enabled:
            reader.notice("cache", f"the cache is off for the MoM model '{mom.name}'; ignored.")
    if directive.instruction:
        panel.applied["instruction"] = True
    steered = mom.model_copy(
        update={
            "llms_to_query": panel.members,
            "concluding_llm": panel.chain[0],
            "concluding_fallbacks": panel.chain[1:],
            **update,
        }
    )
    steering = Steering(
        applied=panel.applied,
        notices=tuple(reader.notices),
        instruction=directive.instruction or None,
        max_cost_usd=cap,
        cache_off=cache == "off",
    )
    return steered, stripped, steering


def _refuse_an_empty_question(messages: list[dict[str, Any]]) -> None:
    users = [m for m in messages if m.get("role") == "user"]
    if users and not users[-1].get("content"):
        raise InvalidRequest(
            "The last user message holds only a <<SYSTEM>> block: there is no question to answer.",
            param="messages",
            code="empty_message",
        )
