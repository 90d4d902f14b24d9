"""What a new config changes against the running one: the MoM models and the LLMs added, removed or changed (what a
reload reports, and what decides which LLMs keep their circuit breakers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mom_service.config import MoMConfig


@dataclass(frozen=True, slots=True)
class NameChanges:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def summary(self) -> str:
        """For the log: `added a, b; removed none; changed c`."""
        return "; ".join(f"{what} {', '.join(names) or 'none'}" for what, names in self.as_dict().items())


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    models: NameChanges
    llms: NameChanges  # an LLM's definition (its samples, NAME#2, are LLMs of their own)

    @classmethod
    def none(cls) -> ConfigChanges:
        return cls(NameChanges(), NameChanges())

    def as_dict(self) -> dict[str, Any]:
        return {"models": self.models.as_dict(), "llms": self.llms.as_dict()}


def _names(old: list[str], new: list[str], differs: set[str]) -> NameChanges:
    kept = set(old) & set(new)
    return NameChanges(
        added=[n for n in new if n not in kept],
        removed=[n for n in old if n not in kept],
        changed=[n for n in new if n in differs],
    )


def config_changes(old: MoMConfig, new: MoMConfig) -> ConfigChanges:
    """The LLMs whose definition differs (any field: model, api_base, params, key variable, timeout, price...), and
    the MoM models whose answers may differ: their own settings, their concluding prompt's text, or the definition
    of one of their LLMs."""
    old_llms = [d.name for d in old.llm_definitions]
    new_llms = [d.name for d in new.llm_definitions]
    llms_changed = {n for n in set(old_llms) & set(new_llms) if old.llm(n) != new.llm(n)}
    models_changed: set[str] = set()
    for model in new.models:
        before = old.mom_model(model.name)
        if before is None:
            continue
        names = {*model.own_llms(), *model.overrides.allowed_llms}
        if before != model or old.concluding_prompt(before) != new.concluding_prompt(model) or names & llms_changed:
            models_changed.add(model.name)
    return ConfigChanges(
        models=_names([m.name for m in old.models], [m.name for m in new.models], models_changed),
        llms=_names(old_llms, new_llms, llms_changed),
    )
