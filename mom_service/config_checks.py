"""A config's problems, each named with its file, entry and field: pydantic's validation errors described, and the
cross-references the models alone cannot check (unique names, the LLMs and prompts each MoM model names, the panel
rules that count its panel)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

    from mom_service.config import MoMConfig, MoMModelConfig


def _entry_label(raw: Mapping[str, Any], section: str, index: int) -> str:
    label = f"{section}[{index}]"
    items = raw.get(section)
    if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
        name = items[index].get("name")
        if isinstance(name, str):
            label += f" (name '{name}')"
    return label


def describe_validation_error(source: str, raw: Mapping[str, Any], exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
            entry = _entry_label(raw, loc[0], loc[1])
            field = ".".join(str(p) for p in loc[2:] if p != "[key]")  # a mapping's key: named by itself
            where = f"{entry}: field '{field}'" if field else entry
        else:
            where = f"field '{'.'.join(str(p) for p in loc)}'"
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def _check_names_unique(source: str, section: str, names: list[str]) -> list[str]:
    seen: set[str] = set()
    problems = []
    for index, name in enumerate(names):
        if name in seen:
            problems.append(f"{source}: {section}[{index}] (name '{name}'): field 'name': duplicate name '{name}'")
        seen.add(name)
    return problems


def _check_panel(
    entry: str,
    model: MoMModelConfig,
    panel: list[str],
    concluding: str,
    llms: set[str],
    prefix: str = "",
    of_tier: str = "",
) -> list[str]:
    """A panel's names (the MoM model's, or one tier's: `prefix` names its fields), and the rules that count it."""
    problems = [
        f"{entry}: field '{prefix}llms_to_query': unknown LLM '{member}' (not in llm_definitions)"
        for member in panel
        if member not in llms
    ]
    if len(set(panel)) != len(panel):
        problems.append(f"{entry}: field '{prefix}llms_to_query': an LLM is listed twice")
    if concluding not in llms:
        problems.append(f"{entry}: field '{prefix}concluding_llm': unknown LLM '{concluding}' (not in llm_definitions)")
    counts = {"min_successful": model.min_successful, "quorum": model.quorum}
    if model.tools.strategy == "vote":
        counts["tools.vote_threshold"] = model.tools.vote_threshold
    for field, value in counts.items():
        if value is not None and value > len(panel):
            problems.append(f"{entry}: field '{field}': {value} is more than the {len(panel)} LLMs to query{of_tier}")
    return problems


def check_references(source: str, config: MoMConfig) -> list[str]:
    problems: list[str] = []
    problems += _check_names_unique(source, "llm_definitions", [d.name for d in config.llm_definitions])
    problems += _check_names_unique(source, "prompt_definitions", [p.name for p in config.prompt_definitions])
    problems += _check_names_unique(source, "models", [m.name for m in config.models])
    llms = {d.name for d in config.llm_definitions}
    prompts = {p.name for p in config.prompt_definitions}
    for index, model in enumerate(config.models):
        entry = f"{source}: models[{index}] (name '{model.name}')"
        problems += _check_panel(entry, model, model.llms_to_query, model.concluding_llm, llms)
        for level, tier in (model.tiers or {}).items():
            panel = tier.llms_to_query or model.llms_to_query
            concluding = tier.concluding_llm or model.concluding_llm
            problems += _check_panel(entry, model, panel, concluding, llms, f"tiers.{level}.", f" of tier '{level}'")
        if model.quorum is not None and model.quorum < model.min_successful:
            problems.append(f"{entry}: field 'quorum': {model.quorum} is less than min_successful")
        for fallback in model.concluding_fallbacks:
            if fallback not in llms:
                problems.append(
                    f"{entry}: field 'concluding_fallbacks': unknown LLM '{fallback}' (not in llm_definitions)"
                )
        chain = [model.concluding_llm, *model.concluding_fallbacks]
        if len(set(chain)) != len(chain):
            problems.append(f"{entry}: field 'concluding_fallbacks': an LLM is listed twice (or is concluding_llm)")
        for allowed in model.overrides.allowed_llms:
            if allowed not in llms:
                problems.append(
                    f"{entry}: field 'overrides.allowed_llms': unknown LLM '{allowed}' (not in llm_definitions)"
                )
        for ranker in model.rankers or ():
            if ranker not in llms:
                problems.append(f"{entry}: field 'rankers': unknown LLM '{ranker}' (not in llm_definitions)")
        if model.concluding_prompt is not None and model.concluding_prompt not in prompts:
            problems.append(
                f"{entry}: field 'concluding_prompt': unknown prompt '{model.concluding_prompt}' "
                "(not in prompt_definitions)"
            )
    return problems
