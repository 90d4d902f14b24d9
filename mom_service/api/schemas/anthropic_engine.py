"""An Anthropic Messages request as the engine's: an OpenAI-shaped conversation, the allowlisted sampling
parameters, the final answer's shape, function tools. The same request sent as Chat Completions becomes the same
engine request (so the response cache is shared between the surfaces).

- `system` (a string or text blocks, joined by a blank line) is a system message, and so are the texts of the
  messages with the role `system` (as Claude Code sends its environment mid-conversation), in order after it: one
  system message first, whatever LLM reads it;
- text and image blocks are content parts (one text block alone is a plain string); a base64 image is a
  `data:<media_type>;base64,...` URL, a URL image its URL (both checked by the engine's image guard);
- an assistant's `tool_use` blocks are its `tool_calls` (arguments: the compact JSON of `input`); its `thinking`
  blocks are checked (a wrong signature is a 400) and dropped, `redacted_thinking` dropped;
- a user's `tool_result` blocks are `tool` messages, before the rest of that user message; `is_error` prefixes
  "Error: "; a result's images go to the user message after the tool messages, each announced by a line of text
  (an OpenAI tool message holds text only); its `tool_reference` blocks are a line of text each, and load the tool
  they name;
- tools with `defer_loading: true` are left out until a `tool_reference` block in the conversation names them (as
  Anthropic loads them), so Claude Code's placeholder never reaches an LLM and its tool search works;
- `stop_sequences` is `stop`, `max_tokens` `max_tokens` (the concluding call's), `metadata.user_id` `user`,
  `tool_choice` OpenAI's (`any` is `required`, `disable_parallel_tool_use` is `parallel_tool_calls: false`),
  `output_config.format` `response_format` (json_schema); `top_k` is accepted and not forwarded;
- `thinking` is the request's effort (which picks the MoM model's tier): `enabled` is a level by its
  `budget_tokens` (below 4,096 `low`, below 16,384 `medium`, else `high`); `disabled`, `adaptive` and
  `between_tools` name no level (the model decides how much to think): no effort, the MoM model as configured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from mom_service.api.schemas.anthropic import (
    CountTokensRequest,
    ImageBlock,
    Message,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    Thinking,
    ThinkingBlock,
    Tool,
    ToolReferenceBlock,
    ToolResultBlock,
    ToolUseBlock,
    invalid,
)
from mom_service.api.schemas.validation import conversation_chars

Verify = Callable[[str, str], bool]  # (thinking, signature) -> whether the service signed it
ImagePaths = dict[tuple[int, int], str]  # (engine message, content part) -> where the client wrote the image

_ALLOWED = {
    "user": (TextBlock, ImageBlock, ToolResultBlock),
    "assistant": (TextBlock, ToolUseBlock, ThinkingBlock, RedactedThinkingBlock),
    "system": (TextBlock,),
}


@dataclass(frozen=True, slots=True)
class EngineParts:
    messages: list[dict[str, Any]]
    params: dict[str, Any]  # sampling: every call
    final_params: dict[str, Any]  # the final answer's shape: the concluding call
    tools: list[dict[str, Any]] | None
    user: str | None
    images: ImagePaths = field(default_factory=dict)
    effort: str | None = None  # the reasoning effort as a level (engine/tiers.py)


# `thinking.budget_tokens` as a level: below each bound, that level; from the last bound up, `high`
EFFORT_BUDGETS: tuple[tuple[int, str], ...] = ((4096, "low"), (16384, "medium"))


def effort_of(thinking: Thinking | None) -> str | None:
    """The level a request's `thinking` asks for: only `enabled` names one, by its budget."""
    if thinking is None or thinking.type != "enabled" or thinking.budget_tokens is None:
        return None
    return next((level for bound, level in EFFORT_BUDGETS if thinking.budget_tokens < bound), "high")


def translate(request: CountTokensRequest, verify: Verify, max_text_chars: int) -> EngineParts:
    """The engine's parts of a request (400 naming the field for what cannot be translated)."""
    conversation = _Conversation(verify)
    conversation.system(request.system, [m for m in request.messages if m.role == "system"])
    conversation.messages(request.messages)
    chars = conversation_chars(conversation.out)
    if chars > max_text_chars:
        raise invalid(
            "messages",
            f"The messages hold {chars} characters of text; at most {max_text_chars} are accepted.",
            "request_too_large",
        )
    user = request.metadata.user_id if request.metadata is not None else None
    params: dict[str, Any] = {
        name: value
        for name, value in (("temperature", request.temperature), ("top_p", request.top_p), ("user", user))
        if value is not None
    }
    return EngineParts(
        messages=conversation.out,
        params=params,
        final_params=final_params(request),
        tools=_tools(request.tools or [], conversation.loaded) or None,
        user=user,
        images=conversation.images,
        effort=effort_of(request.thinking),
    )


def final_params(request: CountTokensRequest) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if isinstance(request, MessagesRequest):
        params["max_tokens"] = request.max_tokens
    if request.stop_sequences:
        params["stop"] = list(request.stop_sequences)
    if request.output_config is not None and request.output_config.format is not None:
        params["response_format"] = request.output_config.format.to_upstream()
    choice = request.tool_choice
    if request.tools and choice is not None:  # tool options without tools: no-ops, as on Chat Completions
        kinds = {"auto": "auto", "any": "required", "none": "none"}
        named = {"type": "function", "function": {"name": choice.name}}
        params["tool_choice"] = kinds.get(choice.type, named)
        if choice.disable_parallel_tool_use:
            params["parallel_tool_calls"] = False
    return params


def _tools(tools: list[Tool], loaded: set[str]) -> list[dict[str, Any]]:
    """The function tools: every tool but the deferred ones no `tool_reference` has loaded."""
    return [_tool(t.name, t.description, t.input_schema) for t in tools if not t.defer_loading or t.name in loaded]


def _tool(name: str, description: str | None, schema: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    function["parameters"] = schema
    return {"type": "function", "function": function}


def _joined(text: str | list[Any] | None) -> str:
    """A system prompt's text: a string, or its text blocks joined by a blank line."""
    if text is None or isinstance(text, str):
        return text or ""
    return "\n\n".join(block.text for block in text if isinstance(block, TextBlock))


def _text_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One text part alone is a plain string, as most clients of Chat Completions send it."""
    return parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts


def _image_part(image: ImageBlock) -> dict[str, Any]:
    source = image.source
    url = f"data:{source.media_type};base64,{source.data}" if source.type == "base64" else str(source.url)
    return {"type": "image_url", "image_url": {"url": url}}


class _Conversation:
    """The engine's messages, built one Anthropic message at a time; tool ids checked as Anthropic checks them."""

    def __init__(self, verify: Verify) -> None:
        self.verify = verify
        self.out: list[dict[str, Any]] = []
        self.images: ImagePaths = {}
        self.loaded: set[str] = set()  # the tools `tool_reference` blocks named

    def system(self, system: str | list[TextBlock] | None, later: list[Message]) -> None:
        """The system prompt, then the texts of the `system` messages, as the conversation's one system message."""
        texts = [_joined(system), *(_joined(m.content) for m in later)]  # (a system message holds text blocks)
        text = "\n\n".join(t for t in texts if t)
        if text:
            self.out.append({"role": "system", "content": text})

    def messages(self, messages: list[Message]) -> None:
        pending: tuple[int, list[str]] | None = None  # the previous assistant message's tool_use ids
        for i, message in enumerate(messages):
            blocks = message.content if isinstance(message.content, list) else []
            for j, block in enumerate(blocks):
                if not isinstance(block, _ALLOWED[message.role]):
                    raise invalid(
                        f"messages.{i}.content.{j}.type",
                        f"a `{block.type}` block is not allowed in a message with the role '{message.role}'.",
                    )
            if message.role == "system":  # in the system prompt already: not between a call and its result
                continue
            results = [(j, b.tool_use_id) for j, b in enumerate(blocks) if isinstance(b, ToolResultBlock)]
            _check_pairs(i, pending, results)
            if message.role == "assistant":
                calls = [b.id for b in blocks if isinstance(b, ToolUseBlock)]
                pending = (i, calls) if calls else None
                self.assistant(i, message)
            else:
                pending = None
                self.user(i, message)
        _check_pairs(len(messages), pending, [])

    def assistant(self, i: int, message: Message) -> None:
        if isinstance(message.content, str):
            if message.content:
                self.out.append({"role": "assistant", "content": message.content})
            return
        texts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            if isinstance(block, TextBlock) and block.text:
                texts.append({"type": "text", "text": block.text})
            elif isinstance(block, ToolUseBlock):
                function = {"name": block.name, "arguments": orjson.dumps(block.input).decode()}
                calls.append({"id": block.id, "type": "function", "function": function})
            elif isinstance(block, ThinkingBlock) and not self.verify(block.thinking, block.signature):
                raise invalid(f"messages.{i}.content.{j}", "Invalid `signature` in `thinking` block.")
        if not texts and not calls:  # nothing but thinking: nothing the engine's conversation holds
            return
        reply: dict[str, Any] = {"role": "assistant", "content": _text_content(texts) if texts else None}
        if calls:
            reply["tool_calls"] = calls
        self.out.append(reply)

    def user(self, i: int, message: Message) -> None:
        if isinstance(message.content, str):
            self.out.append({"role": "user", "content": message.content})
            return
        parts: list[dict[str, Any]] = []
        paths: list[str | None] = []  # for each part, where an image was written
        for j, block in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
                paths.append(None)
            elif isinstance(block, ImageBlock):
                parts.append(_image_part(block))
                paths.append(f"{where}.source")
            elif isinstance(block, ToolResultBlock):
                images = self.tool_result(block)
                for k, image in images:
                    parts.append({"type": "text", "text": f"(An image from the tool result {block.tool_use_id}:)"})
                    parts.append(_image_part(image))
                    paths += [None, f"{where}.content.{k}.source"]
        if not parts:
            return
        index = len(self.out)
        self.images.update({(index, p): path for p, path in enumerate(paths) if path is not None})
        self.out.append({"role": "user", "content": _text_content(parts)})

    def tool_result(self, block: ToolResultBlock) -> list[tuple[int, ImageBlock]]:
        """The result as a tool message; its images, to follow in the user's message."""
        images: list[tuple[int, ImageBlock]] = []
        if isinstance(block.content, list):
            lines = []
            for part in block.content:
                if isinstance(part, TextBlock):
                    lines.append(part.text)
                elif isinstance(part, ToolReferenceBlock):
                    lines.append(f"(The tool {part.tool_name} is loaded: it can be called now.)")
                    self.loaded.add(part.tool_name)
            text = "\n".join(lines)
            images = [(k, p) for k, p in enumerate(block.content) if isinstance(p, ImageBlock)]
        else:
            text = block.content or ""
        if block.is_error:
            text = f"Error: {text}"
        self.out.append({"role": "tool", "content": text, "tool_call_id": block.tool_use_id})
        return images


def _check_pairs(i: int, pending: tuple[int, list[str]] | None, results: list[tuple[int, str]]) -> None:
    """Each `tool_result` answers a `tool_use` of the message just before; each `tool_use` is answered in the
    message just after (Anthropic's rules, and OpenAI-compatible LLMs refuse a conversation that breaks them)."""
    called = pending[1] if pending is not None else []
    for j, tool_use_id in results:
        if tool_use_id not in called:
            raise invalid(
                f"messages.{i}.content.{j}",
                f"unexpected `tool_use_id` found in `tool_result` blocks: {tool_use_id}. Each `tool_result` block "
                "must have a corresponding `tool_use` block in the previous message.",
            )
    answered = {tool_use_id for _, tool_use_id in results}
    missing = [c for c in called if c not in answered]
    if pending is not None and missing:
        raise invalid(
            f"messages.{pending[0]}",
            f"`tool_use` ids were found without `tool_result` blocks immediately after: {', '.join(missing)}. Each "
            "`tool_use` block must have a corresponding `tool_result` block in the next message.",
        )
