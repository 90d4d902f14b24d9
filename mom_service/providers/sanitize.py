"""Each provider family's message shapes: a table with one row of rules per family (`RULES`), and one function that
applies a row to a conversation. Adding a provider is adding a row, not a branch.

A family that is not given image URLs (every one but OpenAI's: the others' adapters, or servers inside the
operator's network, would fetch them) gets the `data:` URL the service downloaded instead (images.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from mom_service.config import LLMDefinition

Family = Literal["openai", "anthropic", "gemini", "ollama", "compatible"]


@dataclass(frozen=True, slots=True)
class Rules:
    """What one provider family's LiteLLM adapter accepts."""

    join_text_parts: bool  # a content list of text parts only becomes one string
    keep_name: bool  # the optional `name` of a message
    developer_role: bool  # `developer` accepted (else it becomes `system`)
    drop_empty: bool  # messages with empty content are dropped (the provider refuses them)
    merge_same_role: bool  # consecutive messages of one role are merged (the provider wants turns to alternate)
    image_detail: bool  # `image_url.detail` accepted
    # http(s) image URLs passed as they are: the provider fetches them from its own cloud, outside our network.
    # Else each becomes the `data:` URL of the bytes the service downloaded (image_fetch.py).
    image_urls: bool


RULES: dict[Family, Rules] = {
    "openai": Rules(False, True, True, False, False, True, True),
    # LiteLLM would download the URL (a second DNS lookup, from inside our network): they get the bytes
    "anthropic": Rules(True, False, False, True, True, False, False),
    "gemini": Rules(True, False, False, True, True, False, False),
    "ollama": Rules(True, False, False, True, False, False, False),
    # any other OpenAI-compatible server (vLLM, llama.cpp, LM Studio, ...): the plainest shapes; it would fetch a
    # URL from inside the operator's network, so it gets the bytes too
    "compatible": Rules(True, False, False, True, False, True, False),
}

_PREFIX_FAMILY: dict[str, Family] = {
    "openai": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "vertex_ai": "gemini",
    "ollama": "ollama",
    "ollama_chat": "ollama",
}


def family(llm: LLMDefinition) -> Family:
    prefix = llm.model.split("/", 1)[0] if "/" in llm.model else "openai"
    if prefix == "openai" and llm.api_base:
        return "compatible"  # `openai/...` with an api_base is another server speaking OpenAI's protocol
    return _PREFIX_FAMILY.get(prefix, "compatible")


def needs_bytes(llms: Iterable[LLMDefinition], vision: Mapping[str, bool]) -> bool:
    """Whether any of these LLMs sees images and takes them only as bytes (its family's `image_urls` is false)."""
    return any(vision[llm.name] and not RULES[family(llm)].image_urls for llm in llms)


IMAGE_PLACEHOLDER = "[image {n}: not shown to you; the panel's answers describe it]"
NOTHING_DOWNLOADED: Mapping[str, str] = MappingProxyType({})


def _image_url(url: str, rules: Rules, downloaded: Mapping[str, str]) -> str:
    """The URL as this family gets it: a `data:` URL stays; an http(s) URL stays only where the provider fetches it
    itself, else it is the `data:` URL of what the service downloaded (which must be in `downloaded`)."""
    if rules.image_urls or url[:5].lower() == "data:":
        return url
    return downloaded[url]


def _content(content: Any, rules: Rules, vision: bool, counter: list[int], downloaded: Mapping[str, str]) -> Any:
    if content is None or isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "image_url":
            counter[0] += 1
            if not vision:
                parts.append({"type": "text", "text": IMAGE_PLACEHOLDER.format(n=counter[0])})
                continue
            image = dict(part["image_url"])
            image["url"] = _image_url(image["url"], rules, downloaded)
            if not rules.image_detail:
                image.pop("detail", None)
            parts.append({"type": "image_url", "image_url": image})
        elif part.get("text"):
            parts.append({"type": "text", "text": part["text"]})
    if rules.join_text_parts and all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _is_empty(content: Any) -> bool:
    return content is None or (not content if isinstance(content, str) else len(content) == 0)


def _merge(first: Any, second: Any) -> Any:
    if isinstance(first, str) and isinstance(second, str):
        return f"{first}\n\n{second}"
    as_parts = [c if isinstance(c, list) else [{"type": "text", "text": c}] for c in (first, second)]
    return as_parts[0] + as_parts[1]


def sanitize(
    messages: Sequence[dict[str, Any]],
    rules: Rules,
    *,
    vision: bool,
    downloaded: Mapping[str, str] = NOTHING_DOWNLOADED,
) -> list[dict[str, Any]]:
    """The conversation in the shapes this family accepts; images become placeholders when `vision` is False.

    `downloaded` maps each http(s) image URL to the `data:` URL of its bytes, for families that take no URLs.
    """
    counter = [0]
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "developer" and not rules.developer_role:
            role = "system"
        content = _content(message.get("content"), rules, vision, counter, downloaded)
        calls = message.get("tool_calls")
        if rules.drop_empty and _is_empty(content) and not calls and role != "tool":
            continue
        cleaned: dict[str, Any] = {"role": role, "content": content}
        if rules.keep_name and message.get("name"):
            cleaned["name"] = message["name"]
        if calls:  # a tool loop's own messages keep OpenAI's shape: LiteLLM turns them into each provider's
            cleaned["tool_calls"] = calls
        if role == "tool":
            cleaned["tool_call_id"] = message["tool_call_id"]
        mergeable = role not in ("tool",) and not calls and "tool_calls" not in (out[-1] if out else {})
        if rules.merge_same_role and mergeable and out and out[-1]["role"] == role and "name" not in out[-1]:
            out[-1]["content"] = _merge(out[-1]["content"], content)
            continue
        out.append(cleaned)
    return out
