"""OpenAI's Responses wire models (`POST /v1/responses`): the request validated (strict, errors naming the param as
the client wrote it, `input[2].call_id`), what a MoM model cannot honour refused, and the parameters allowed through
to the engine, the same ones the equivalent Chat Completions request sends (so the two surfaces share the cache).

The input items become the engine's conversation in `schemas/responses_input.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError

from mom_service.api.schemas.openai import FUNCTION_NAME, RequestLimits, _Open
from mom_service.api.schemas.responses_input import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningItem,
    item_kind,
    qualified,
)
from mom_service.api.schemas.validation import array_too_long, first_error
from mom_service.config import Level
from mom_service.engine.structured import schema_problem
from mom_service.errors import InvalidRequest

MAX_METADATA = 16  # keys, as OpenAI allows
# `include` values honoured: our reasoning items carry no hidden state, so there is nothing to encrypt or lose
INCLUDABLE = frozenset({"reasoning.encrypted_content"})
# Recognised Responses parameters a MoM model cannot honour: refused, never silently dropped.
UNSUPPORTED = {
    "background": "background responses are not supported",
    "conversation": "conversations are not supported: use 'previous_response_id' or send the whole input",
    "prompt": "stored prompts are not supported: send 'instructions' and 'input'",
}
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
TOOL_TYPES = ("function", "namespace")  # a namespace groups function tools (how Codex sends an MCP server's tools)

Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(item_kind),
]


class FunctionTool(_Open):
    type: str
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_upstream(self) -> dict[str, Any]:
        """The tool as Chat Completions (and so the engine) knows it: what the equivalent chat request sends."""
        function = {k: v for k, v in self.known().items() if k != "type"}
        return {"type": "function", "function": function}

    def echo(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }


class NamespaceTool(_Open):
    """Function tools under a shared name: the LLMs get each as a function named `<namespace>__<name>`, and a call of
    one is answered as OpenAI answers it, a `function_call` with `namespace` and `name`."""

    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str | None = None
    tools: list[FunctionTool] = Field(min_length=1)

    def to_upstream(self) -> list[dict[str, Any]]:
        return [
            FunctionTool.model_validate({**tool.known(), "name": qualified(self.name, tool.name or "")}).to_upstream()
            for tool in self.tools
        ]

    def echo(self) -> dict[str, Any]:
        functions = [tool.echo() for tool in self.tools]
        return {"type": "namespace", "name": self.name, "description": self.description, "tools": functions}


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "namespace" if kind == "namespace" else "function"


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[NamespaceTool, Tag("namespace")],
    Discriminator(_tool_kind),
]


class FunctionChoice(_Open):
    type: Literal["function"]
    name: str = Field(min_length=1)
    namespace: str | None = Field(default=None, min_length=1)

    @property
    def qualified_name(self) -> str:
        return self.name if self.namespace is None else qualified(self.namespace, self.name)


class TextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def to_upstream(self) -> dict[str, Any]:
        """Chat's `response_format` for this format."""
        if self.type != "json_schema":
            return {"type": self.type}
        spec = {"name": self.name, "description": self.description, "schema": self.json_schema, "strict": self.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


class TextConfig(_Open):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint: accepted, not forwarded


class ReasoningConfig(_Open):
    effort: Level | None = None  # picks the MoM model's effort tier (engine/tiers.py); never forwarded as is
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[Item]
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    reasoning: ReasoningConfig | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = Field(default=None, min_length=1)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=64)
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    mom: dict[str, Any] | None = None  # the caller's controls (docs/steering.md), read by the engine

    @property
    def stores(self) -> bool:
        return self.store is not False

    @property
    def caller_user(self) -> str | None:
        return self.safety_identifier or self.user

    def sampling_params(self) -> dict[str, Any]:
        """What every call of the panel gets (chat's SAMPLING_PARAMS of the equivalent chat request)."""
        params: dict[str, Any] = {}
        for name in ("temperature", "top_p"):
            if (value := getattr(self, name)) is not None:
                params[name] = value
        if self.caller_user is not None:
            params["user"] = self.caller_user
        return params

    def final_params(self) -> dict[str, Any]:
        """What shapes the final answer (the concluding call's), under chat's names."""
        params: dict[str, Any] = {}
        if self.max_output_tokens is not None:
            params["max_tokens"] = self.max_output_tokens
        if self.text is not None and self.text.format is not None:
            params["response_format"] = self.text.format.to_upstream()
        if self.tools:  # tool options without tools are no-ops: not sent, as chat does
            if isinstance(self.tool_choice, FunctionChoice):
                params["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.qualified_name}}
            elif self.tool_choice is not None:
                params["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                params["parallel_tool_calls"] = self.parallel_tool_calls
        return params

    def upstream_tools(self) -> list[dict[str, Any]] | None:
        tools: list[dict[str, Any]] = []
        for tool in self.tools or ():
            tools += tool.to_upstream() if isinstance(tool, NamespaceTool) else [tool.to_upstream()]
        return tools or None

    def namespaces(self) -> dict[str, tuple[str, str]]:
        """The qualified name of each namespace tool's function -> (its namespace, its name)."""
        return {
            qualified(tool.name, function.name or ""): (tool.name, function.name or "")
            for tool in self.tools or ()
            if isinstance(tool, NamespaceTool)
            for function in tool.tools
        }

    def echo(self) -> dict[str, Any]:
        """The request's fields a Response object repeats, with OpenAI's defaults where the client set none."""
        choice: Any = self.tool_choice.known() if isinstance(self.tool_choice, FunctionChoice) else self.tool_choice
        text_format = self.text.format.known() if self.text and self.text.format else {"type": "text"}
        reasoning = self.reasoning
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "reasoning": {
                "effort": reasoning.effort if reasoning else None,
                "summary": (reasoning.summary or reasoning.generate_summary) if reasoning else None,
            },
            "store": self.stores,
            "temperature": self.temperature if self.temperature is not None else 1.0,
            "top_p": self.top_p if self.top_p is not None else 1.0,
            "text": {"format": text_format, "verbosity": self.text.verbosity if self.text else None},
            "tool_choice": choice or "auto",
            "tools": [tool.echo() for tool in self.tools or ()],
            "truncation": "disabled",
            "safety_identifier": self.safety_identifier,
            "metadata": self.metadata or {},
            "service_tier": "default",
        } | ({"user": self.user} if self.user is not None else {})  # (a string when present: OpenAI's schema)


def _unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"Unsupported parameter: '{param}': {why}.", param=param, code="unsupported_parameter")


def check_unsupported(data: dict[str, Any]) -> None:
    """Recognised parameters a MoM model cannot honour, and input items of types it does not take: a 400 naming
    each (before the models are validated, so the message says why)."""
    for name, why in UNSUPPORTED.items():
        if data.get(name) not in (None, False):
            raise _unsupported(name, why)
    items = data.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        kind = item_kind(item)
        if isinstance(item, dict) and kind not in ITEM_TYPES:
            raise InvalidRequest(
                f"The input item type '{kind}' is not supported: a MoM model takes messages, function calls, their "
                "outputs and reasoning items.",
                param=f"input[{i}].type" if kind is not None else f"input[{i}]",
                code="unsupported_item_type" if kind is not None else "missing_required_parameter",
            )
    for i, tool in enumerate(data.get("tools") or ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind not in TOOL_TYPES:
            raise _unsupported_tool(f"tools[{i}]", kind)
        inner = tool.get("tools") if kind == "namespace" else None
        for j, function in enumerate(inner if isinstance(inner, list) else ()):
            kind = function.get("type") if isinstance(function, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise _unsupported_tool(f"tools[{i}].tools[{j}]", kind)


def _unsupported_tool(where: str, kind: str) -> InvalidRequest:
    return InvalidRequest(
        f"The tool type '{kind}' is not supported: a MoM model takes 'function' tools only (and namespaces of them).",
        param=f"{where}.type",
        code="unsupported_tool_type",
    )


def check_request(request: ResponsesRequest) -> None:
    """What the models alone do not say: tools named, a tool choice naming one, a valid schema, what is included."""
    names: set[str] = set()
    for i, tool in enumerate(request.tools or ()):
        functions = tool.tools if isinstance(tool, NamespaceTool) else [tool]
        for j, function in enumerate(functions):
            where = f"tools[{i}].tools[{j}]" if isinstance(tool, NamespaceTool) else f"tools[{i}]"
            if function.name is None:
                raise InvalidRequest(
                    f"Missing required parameter: '{where}.name'.",
                    param=f"{where}.name",
                    code="missing_required_parameter",
                )
            name = qualified(tool.name, function.name) if isinstance(tool, NamespaceTool) else function.name
            if re.match(FUNCTION_NAME, name) is None:  # (a namespace's function: its qualified name)
                raise InvalidRequest(
                    f"Invalid '{where}.name': '{name}', the name the LLMs know it by, is not 1 to 64 letters, "
                    "digits, '_' or '-'.",
                    param=f"{where}.name",
                    code="invalid_value",
                )
            names.add(name)
    choice = request.tool_choice
    if isinstance(choice, FunctionChoice) and choice.qualified_name not in names:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': no tool is named '{choice.name}'.",
            param="tool_choice",
            code="invalid_value",
        )
    if request.metadata is not None:
        if len(request.metadata) > MAX_METADATA:
            raise InvalidRequest(
                f"Invalid 'metadata': too many keys ({len(request.metadata)}); at most {MAX_METADATA} are allowed.",
                param="metadata",
                code="invalid_value",
            )
        long_key = next((k for k in request.metadata if len(k) > 64), None)
        if long_key is not None:
            raise InvalidRequest(
                "Invalid 'metadata': keys are at most 64 characters.", param="metadata", code="invalid_value"
            )
    for i, value in enumerate(request.include or ()):
        if value not in INCLUDABLE:
            raise _unsupported(f"include[{i}]", f"'{value}' cannot be included by a MoM model")
    if request.top_logprobs:
        raise _unsupported("top_logprobs", "log probabilities are not supported on this surface")
    form = request.text.format if request.text else None
    if form is not None and form.type == "json_schema":
        if form.name is None:
            raise InvalidRequest("Missing required parameter: 'text.format.name'.", param="text.format.name")
        if form.json_schema is None:
            raise InvalidRequest("Missing required parameter: 'text.format.schema'.", param="text.format.schema")
        why = schema_problem(form.json_schema)
        if why is not None:
            raise InvalidRequest(
                f"Invalid schema for text.format '{form.name}': {why}.",
                param="text.format.schema",
                code="invalid_value",
            )


def parse_responses_request(data: Any, limits: RequestLimits | None = None) -> ResponsesRequest:
    """Validate a decoded body; raise an OpenAI-shaped 400 naming the first wrong parameter."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_request_body")
    limits = limits or RequestLimits()
    items = data.get("input")
    if isinstance(items, list) and len(items) > limits.max_messages:
        raise array_too_long("input", limits.max_messages, len(items))
    check_unsupported(data)
    try:
        request = ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc) from None
    check_request(request)
    return request
