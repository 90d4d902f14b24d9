"""The response cache's keys: SHA-256 digests of a canonical JSON of everything that decides an answer.

- an answer: the MoM model's panel configuration (its members and concluding LLMs as configured: model, api_base,
  params; the concluding prompt; the thinking settings), the messages, the sampling parameters (not `stream`,
  `stream_options` or `user`, so a streamed request may replay an answer first given whole), and whose answer it
  is (the caller's identity, unless the MoM model shares its cache);
- a member's answer: that LLM's configuration, the messages as that LLM receives them, the sampling parameters and
  whose it is, so a change to the concluding prompt or LLM re-runs only the synthesis.

A change in config.yaml changes the digests: old entries are never found again and expire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson

from mom_service.config import LLMDefinition, MoMConfig, MoMModelConfig

KEY_VERSION = 2  # 2: tool calls in the stored answers
NOT_IN_KEY = frozenset({"user"})  # sampling parameters that do not change an answer


def _digest(kind: str, payload: dict[str, Any]) -> str:
    canonical = orjson.dumps({"v": KEY_VERSION, "kind": kind, **payload}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def _llm_identity(llm: LLMDefinition) -> dict[str, Any]:
    """What about an LLM decides its answers (not its key's variable, timeout, retries or price)."""
    identity = {
        "model": llm.model,
        "api_base": llm.api_base,
        "params": llm.params,
        "multimodal": llm.multimodal,
        "capabilities": llm.capabilities.model_dump(),  # who calls tools: who concludes, what members read
    }
    if llm.system_prompt is not None:  # (also in the messages a member gets; here for the panel's identity)
        identity["system_prompt"] = llm.system_prompt
    if "#" in llm.name:  # a sample (NAME#2): its own answer, never another sample's
        identity["sample"] = llm.name.partition("#")[2]
    return identity


def _params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in NOT_IN_KEY}


def panel_identity(config: MoMConfig, mom: MoMModelConfig) -> str:
    """Everything in the config that decides a MoM model's answers, as one digest (made once per MoM model)."""
    # a tier's LLMs decide the answers of the requests that pick it, an allowed LLM those of the callers adding it
    names = {*mom.own_llms(), *mom.overrides.allowed_llms}
    return _digest(
        "panel",
        {
            "mom": mom.name,
            "panel": mom.model_dump(exclude={"name", "description", "cache"}),
            "llms": {name: _llm_identity(config.llm(name)) for name in names},
            "prompt": config.concluding_prompt(mom),
        },
    )


def answer_key(panel: str, messages: Sequence[dict[str, Any]], params: dict[str, Any], owner: str = "") -> str:
    """The key of an answer: the MoM model's `panel_identity`, the messages, the sampling parameters, and whose
    it is (`owner`: the caller's identity, or "" for an answer shared by every caller)."""
    return _digest("answer", {"panel": panel, "messages": messages, "params": _params(params), "owner": owner})


def member_key(
    llm: LLMDefinition,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    owner: str = "",
    encoded: bytes | None = None,
) -> str:
    """The key of a member's answer; `encoded` is `messages` already serialized with sorted keys (not again)."""
    payload = {"llm": _llm_identity(llm), "params": _params(params), "owner": owner}
    if encoded is None:
        return _digest("member", {**payload, "messages": messages})
    head = orjson.dumps({"v": KEY_VERSION, "kind": "member", **payload}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(head + b"\x00" + encoded).hexdigest()
