"""A Responses request's input items as the engine's conversation (Chat Completions' messages, the engine's one
shape), and as the input items `GET /v1/responses/{id}/input_items` lists.

`instructions` is a system message first; a string input is one user message; a `message` item is a message of its
role (`input_text`/`output_text`/`refusal` parts are text, `input_image` an image URL); consecutive `function_call`
items are one assistant message with tool calls (after the assistant text they follow; a call with a `namespace` is
named `<namespace>__<name>`, as the function tools of a namespace tool are); a `function_call_output` is a
tool message that must answer a call made earlier (in this input or the stored conversation it continues);
`reasoning` items are accepted and dropped (a MoM model's reasoning is its panel's, asked afresh).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from mom_service.api.schemas.openai import _Open
from mom_service.errors import InvalidRequest


def item_kind(value: Any) -> str | None:
    """An input item's type: `message` when it has a role and no type (OpenAI's EasyInputMessage)."""
    if isinstance(value, dict):
        kind = value.get("type")
        if kind is None and "role" in value:
            return "message"
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def qualified(namespace: str, name: str) -> str:
    """The name the LLMs know a function of a namespace tool by (Chat Completions has no namespaces)."""
    return f"{namespace}__{name}"


class InputText(_Open):
    type: Literal["input_text", "output_text"]
    text: str

    def to_upstream(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


class Refusal(_Open):
    type: Literal["refusal"]
    refusal: str

    def to_upstream(self) -> dict[str, Any]:
        return {"type": "text", "text": self.refusal}


class InputImage(_Open):
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, min_length=1)
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    def to_upstream(self) -> dict[str, Any]:
        image: dict[str, Any] = {"url": self.image_url}
        if self.detail is not None:
            image["detail"] = self.detail
        return {"type": "image_url", "image_url": image}


class InputFile(_Open):
    type: Literal["input_file"]


Part = Annotated[
    Annotated[InputText, Tag("input_text")]
    | Annotated[InputText, Tag("output_text")]
    | Annotated[Refusal, Tag("refusal")]
    | Annotated[InputImage, Tag("input_image")]
    | Annotated[InputFile, Tag("input_file")],
    Discriminator(item_kind),
]


class MessageItem(_Open):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    namespace: str | None = Field(default=None, min_length=1)
    arguments: str
    id: str | None = None

    @property
    def qualified_name(self) -> str:
        return self.name if self.namespace is None else qualified(self.namespace, self.name)


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Part]
    id: str | None = None


class ReasoningItem(_Open):
    type: Literal["reasoning"]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


@dataclass(slots=True)
class Translated:
    """The engine's conversation (the instructions, the stored one it continues, then this input), and this
    input's items as stored."""

    messages: list[dict[str, Any]]
    items: list[dict[str, Any]] = field(default_factory=list)
    instructed: bool = False  # the first message is the request's instructions

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """What a response continuing this one gets: the messages without this request's instructions."""
        return self.messages[1:] if self.instructed else list(self.messages)


def _unsupported_part(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"Unsupported value for '{param}': {why}.", param=param, code="unsupported_value")


def _content(item: MessageItem, where: str) -> str | list[dict[str, Any]]:
    """A message's content in chat's shape: text parts only for an assistant's (as one string), images a user's."""
    if isinstance(item.content, str):
        return item.content
    for j, part in enumerate(item.content):
        if isinstance(part, InputFile):
            raise _unsupported_part(f"{where}.content[{j}].type", "file inputs are not supported")
        if isinstance(part, InputImage):
            if part.image_url is None:
                param = f"{where}.content[{j}]." + ("file_id" if part.file_id is not None else "image_url")
                raise _unsupported_part(param, "images are taken by 'image_url' (a URL or a data: URL) only")
            if item.role != "user":
                raise _unsupported_part(f"{where}.content[{j}].type", f"a {item.role} message holds text only")
    parts = [part.to_upstream() for part in item.content if not isinstance(part, InputFile)]
    if item.role == "user":
        return parts
    return "".join(p["text"] for p in parts)


def _output_text(output: str | list[Any], where: str) -> str:
    if isinstance(output, str):
        return output
    texts = []
    for j, part in enumerate(output):
        if not isinstance(part, InputText | Refusal):
            raise _unsupported_part(f"{where}.output[{j}].type", "a function call's output holds text only")
        texts.append(part.to_upstream()["text"])
    return "".join(texts)


def _calls_made(messages: Sequence[dict[str, Any]]) -> set[str]:
    return {call["id"] for m in messages for call in m.get("tool_calls") or ()}


def translate(
    instructions: str | None, items: str | Sequence[InputItem], previous: Sequence[dict[str, Any]] = ()
) -> Translated:
    """The conversation the engine gets: the stored one continued (without its instructions: a new request's own
    apply, as OpenAI does), this request's instructions as a system message first, then the input."""
    head: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions is not None else []
    instructed = bool(head)
    if isinstance(items, str):
        item: dict[str, Any] = {"id": new_id("msg"), "type": "message", "role": "user", "status": "completed"}
        item["content"] = [{"type": "input_text", "text": items}]
        return Translated([*head, *previous, {"role": "user", "content": items}], [item], instructed)
    out = Translated([*head, *previous], instructed=instructed)
    called = _calls_made(previous)
    for i, entry in enumerate(items):
        if isinstance(entry, MessageItem):
            content = _content(entry, f"input[{i}]")
            out.messages.append({"role": entry.role, "content": content})
            out.items.append(_message_item(entry, content))
        elif isinstance(entry, FunctionCallItem):
            _add_call(out, entry)
            called.add(entry.call_id)
        elif isinstance(entry, FunctionCallOutputItem):
            _add_output(out, entry, f"input[{i}]", called)
    if not out.messages or all(m["role"] in ("system", "developer") for m in out.messages):
        raise InvalidRequest("Invalid 'input': it holds no message to answer.", param="input", code="invalid_value")
    return out


def _add_call(out: Translated, entry: FunctionCallItem) -> None:
    """A function call joins the assistant message it follows (its text, or the calls before it)."""
    function = {"name": entry.qualified_name, "arguments": entry.arguments}
    call = {"id": entry.call_id, "type": "function", "function": function}
    last = out.messages[-1] if out.messages else None
    if last is not None and last["role"] == "assistant" and isinstance(last.get("content"), str | None):
        out.messages[-1] = {**last, "tool_calls": [*(last.get("tool_calls") or ()), call]}
    else:
        out.messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    out.items.append(_call_item(entry))


def _add_output(out: Translated, entry: FunctionCallOutputItem, where: str, called: set[str]) -> None:
    """A function call's output: a tool message, answering a call made earlier in the conversation."""
    if entry.call_id not in called:
        raise InvalidRequest(
            f"No tool call found for function call output with call_id '{entry.call_id}'.",
            param=f"{where}.call_id",
            code="invalid_tool_message",
        )
    text = _output_text(entry.output, where)
    out.messages.append({"role": "tool", "tool_call_id": entry.call_id, "content": text})
    item = {"id": entry.id or new_id("fco"), "type": "function_call_output", "call_id": entry.call_id}
    out.items.append(item | {"output": text, "status": "completed"})


def _message_item(entry: MessageItem, text: str | list[dict[str, Any]]) -> dict[str, Any]:
    """The item as listed: an assistant's as an output message (one `output_text`), the others as input messages."""
    if entry.role == "assistant":
        assert isinstance(text, str)
        content: list[dict[str, Any]] = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    elif isinstance(entry.content, str):
        content = [{"type": "input_text", "text": entry.content}]
    else:
        content = [part.known() for part in entry.content]
    item = {"id": entry.id or new_id("msg"), "type": "message", "role": entry.role, "content": content}
    return item | {"status": "completed"}


def _call_item(entry: FunctionCallItem) -> dict[str, Any]:
    item = {"id": entry.id or new_id("fc"), "type": "function_call", "call_id": entry.call_id, "name": entry.name}
    if entry.namespace is not None:
        item["namespace"] = entry.namespace
    return item | {"arguments": entry.arguments, "status": "completed"}
