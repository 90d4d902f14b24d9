"""The Responses surface's stored state and errors through the live service (docs/responses.md): retrieve, delete
and input items; each token owns its responses (any other gets a 404 reading, continuing or deleting them); store
false keeps nothing; an expired row is gone; errors in OpenAI's shape before a stream and during it
(`response.failed`); the surface in metrics and usage records; the cache shared with Chat Completions."""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import openai
import pytest

from tests.api.test_metrics import scrape
from tests.api.test_responses import OTHER_TOKEN, WEATHER, client, responder, responses_config, stream_events
from tests.conftest import TOKEN, Service, StartService, wait_until
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

__all__ = ["responder"]  # the fixture, shared with test_responses.py


def post(service: Service, body: dict[str, Any], token: str = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{service.base_url}/responses", headers=headers, json=body, timeout=30)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    validate(body, "ErrorResponse")
    error: dict[str, Any] = body["error"]
    return error


def test_retrieve_input_items_and_delete(responder: Service, fake: FakeUpstream) -> None:
    sdk = client(responder)
    items: list[Any] = [
        {"role": "user", "content": "First."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": [{"type": "input_text", "text": "Second."}]},
    ]
    created = sdk.responses.create(model="mom", input=items)
    assert sdk.responses.retrieve(created.id).output_text == created.output_text
    url = f"{responder.base_url}/responses/{created.id}/input_items"
    listed = httpx.get(url, headers=responder.headers()).json()
    validate(listed, "ResponseItemList")
    assert [i["role"] for i in listed["data"]] == ["user", "assistant", "user"][::-1]  # newest first, as OpenAI
    assert listed["has_more"] is False and listed["first_id"] == listed["data"][0]["id"]
    page = httpx.get(url, headers=responder.headers(), params={"order": "asc", "limit": 2}).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["First.", "Noted."] and page["has_more"] is True
    rest = httpx.get(url, headers=responder.headers(), params={"order": "asc", "after": page["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["Second."]
    assert [i.id for i in sdk.responses.input_items.list(created.id, order="asc")] == [
        i["id"] for i in listed["data"][::-1]
    ]
    deleted = httpx.delete(f"{responder.base_url}/responses/{created.id}", headers=responder.headers())
    assert deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    error = error_of(httpx.get(f"{responder.base_url}/responses/{created.id}", headers=responder.headers()), 404)
    assert error == {
        "message": f"Response with id '{created.id}' not found.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(created.id)


def test_a_response_is_its_tokens_alone(responder: Service, fake: FakeUpstream) -> None:
    mine = client(responder).responses.create(model="mom", input="Secret question.")
    theirs = client(responder, OTHER_TOKEN)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(mine.id)
    continued = error_of(
        post(responder, {"model": "mom", "input": "And?", "previous_response_id": mine.id}, OTHER_TOKEN), 404
    )
    assert continued["param"] == "previous_response_id" and continued["code"] == "previous_response_not_found"
    assert continued["message"] == f"Previous response with id '{mine.id}' not found."
    # still the owner's, untouched; and the other token's own responses work
    assert client(responder).responses.retrieve(mine.id).id == mine.id
    own = theirs.responses.create(model="mom", input="Mine.")
    assert theirs.responses.retrieve(own.id).id == own.id


def test_store_false_keeps_nothing(responder: Service, fake: FakeUpstream) -> None:
    sdk = client(responder)
    unstored = sdk.responses.create(model="mom", input="Forget this.", store=False)
    assert unstored.store is False and unstored.output_text == "Answer from judge."
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)
    streamed = stream_events(responder, {"model": "mom", "input": "Forget this too.", "stream": True, "store": False})
    response_id = streamed[-1]["response"]["id"]
    error_of(httpx.get(f"{responder.base_url}/responses/{response_id}", headers=responder.headers()), 404)


def test_a_continued_conversation_holds_the_earlier_turns(responder: Service, fake: FakeUpstream) -> None:
    sdk = client(responder)
    first = sdk.responses.create(model="mom", input="My name is Ada.", instructions="Old instructions.")
    fake.clear_log()
    second = sdk.responses.create(model="mom", input="What is my name?", previous_response_id=first.id)
    (concluding,) = [e["body"] for e in fake.log() if e["model"] == "judge"]
    assert concluding["messages"][1:-1] == [  # the earlier instructions are not carried over, as OpenAI does
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Answer from judge."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.previous_response_id == first.id


def test_an_expired_response_is_gone(responder: Service, fake: FakeUpstream) -> None:
    sdk = client(responder)
    created = sdk.responses.create(model="mom", input="Short-lived.")
    with sqlite3.connect(responder.workdir / "data" / "mom.db") as db:
        db.execute("UPDATE mom_responses SET expires_ms = 1 WHERE id = ?", (created.id,))
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)
    error = error_of(post(responder, {"model": "mom", "input": "And?", "previous_response_id": created.id}), 404)
    assert error["code"] == "previous_response_not_found"


# ------------------------------------------------------------------------------------------------- errors

REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, body fields, param, code)
    ("web-search-tool", {"tools": [WEATHER, {"type": "web_search"}]}, "tools[1].type", "unsupported_tool_type"),
    ("mcp-tool", {"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type", "unsupported_tool_type"),
    (
        "orphan-call-output",
        {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
        "input[0].call_id",
        "invalid_tool_message",
    ),
    (
        "call-without-id",
        {"input": [{"role": "user", "content": "x"}, {"type": "function_call", "name": "f", "arguments": "{}"}]},
        "input[1].call_id",
        "missing_required_parameter",
    ),
    (
        "item-reference",
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        "input[0].type",
        "unsupported_item_type",
    ),
    (
        "file-image",
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
        "input[0].content[0].file_id",
        "unsupported_value",
    ),
    ("background", {"background": True}, "background", "unsupported_parameter"),
    ("conversation", {"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ("include", {"include": ["file_search_call.results"]}, "include[0]", "unsupported_parameter"),
    ("metadata", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
    ("temperature-type", {"temperature": "hot"}, "temperature", "invalid_type"),
    (
        "bad-schema",
        {"text": {"format": {"type": "json_schema", "name": "X", "schema": {"type": "nope"}}}},
        "text.format.schema",
        "invalid_value",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("fields", "param", "code"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_before_any_call(
    responder: Service, fake: FakeUpstream, fields: dict[str, Any], param: str, code: str, stream: bool
) -> None:
    error = error_of(post(responder, {"model": "mom", "input": "x", "stream": stream} | fields), 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert fake.log() == []


def test_unknown_model_and_wrong_token(responder: Service, fake: FakeUpstream) -> None:
    error = error_of(post(responder, {"model": "nope", "input": "x", "stream": True}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert (
        error_of(post(responder, {"model": "mom", "input": "x"}, "wrong-token"), 401)["type"] == "authentication_error"
    )
    with pytest.raises(openai.AuthenticationError):
        client(responder, "wrong-token").responses.retrieve("resp_1")


def test_a_failure_during_the_stream_is_response_failed(responder: Service, fake: FakeUpstream) -> None:
    fake.configure({"judge": {"status": 500}})
    events = stream_events(responder, {"model": "mom-think", "input": "Fail late.", "stream": True})
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["id"] == events[0]["response"]["id"] and failed["error"]["message"]
    assert [i["type"] for i in failed["output"]] == ["reasoning"]  # the members' answers came before
    # the same failure before any byte (no thinking context): an HTTP error in OpenAI's shape
    error = error_of(post(responder, {"model": "mom", "input": "Fail early.", "stream": True}), 502)
    assert error["code"] == "concluding_failed"


def test_metrics_and_usage_records_carry_the_surface(responder: Service, fake: FakeUpstream) -> None:
    def answered() -> float:
        return scrape(responder).value("mom_requests_total", model="mom", surface="responses", outcome="ok")

    before = answered()
    client(responder).responses.create(model="mom", input="Count me.")
    wait_until(lambda: answered() == before + 1)

    def by_surface() -> dict[str, int]:
        report = httpx.get(
            f"{responder.base_url}/metrics/usage", headers=responder.headers(), params={"group_by": "surface"}
        ).json()
        return {g["key"]: g["requests"] for g in report["groups"]}

    wait_until(lambda: by_surface().get("responses", 0) >= 1)


@pytest.fixture(scope="module")
def cached(fake_server: FakeUpstream, start_service: StartService) -> Service:
    return start_service(responses_config(fake_server), {"MOM_CACHE_ENABLED": "true", "REDIS_URL": ""})


def test_the_cache_is_shared_with_chat_completions(cached: Service, fake: FakeUpstream) -> None:
    chat = cached.chat("mom", [{"role": "user", "content": "Shared question?"}], max_tokens=50)
    assert chat.status_code == 200 and chat.json()["mom"]["cache"] == "miss"
    response = post(cached, {"model": "mom", "input": "Shared question?", "max_output_tokens": 50})
    body = response.json()
    assert (
        body["mom"]["cache"] == "hit"
        and body["output"][0]["content"][0]["text"] == chat.json()["choices"][0]["message"]["content"]
    )
    assert len([e for e in fake.log() if e["model"] == "judge"]) == 1
