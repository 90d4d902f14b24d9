"""The MCP server (docs/mcp.md) through the official `mcp` client: over streamable HTTP at /mcp (the tools and
their input schemas, `list_models`, `consult` with and without controls and its progress notifications, `usage`,
the token refused, off by default) and over stdio (`mom-service mcp`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import httpx2
import orjson
import pytest
import yaml
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import FAKE_KEY, TOKEN, Service, StartService, llm
from tests.fake_upstream import FakeUpstream

OTHER_TOKEN = "another-teams-token-654321"
PRICE = {"input_per_million": "2", "output_per_million": "8"}
MEMBERS = ["ma", "mb", "mc"]
QUESTION = "What is 2 + 2?"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}
ORIGIN = "https://agent.example"


def mcp_config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "llm_definitions": [llm(name, fake, retries=0, timeout=10, pricing=PRICE) for name in [*MEMBERS, "mj"]],
        "models": [
            {"name": "panel", "description": "Three members", "llms_to_query": MEMBERS, "concluding_llm": "mj"},
            {"name": "duo", "llms_to_query": ["ma", "mb"], "concluding_llm": "mj"},
        ],
    }


@pytest.fixture(scope="module")
def served(fake_server: FakeUpstream, start_service: StartService) -> Service:
    return start_service(mcp_config(fake_server), {"MOM_MCP_ENABLED": "true", "ALLOWED_CORS_ORIGINS": ORIGIN})


@asynccontextmanager
async def session_of(service: Service, headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session with the service's /mcp (with the test token unless `headers` is given)."""
    async with (
        httpx2.AsyncClient(headers=service.headers() if headers is None else headers, timeout=60) as http,
        streamable_http_client(f"{service.url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


@dataclass
class Progress:
    """A progress callback that keeps every notification: (progress, total, message)."""

    seen: list[tuple[float, float | None, str | None]] = field(default_factory=list)

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.seen.append((progress, total, message))


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a (nested) exception group."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


def asked(fake: FakeUpstream) -> list[str]:
    return sorted(entry["model"] for entry in fake.log())


async def test_lists_the_three_tools_with_their_input_schemas(served: Service) -> None:
    async with session_of(served) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == {"consult", "list_models", "usage"}
    consult = tools["consult"].input_schema
    assert consult["required"] == ["question"]
    assert set(consult["properties"]) == {"question", "model", "controls"}
    assert {"type": "object", "additionalProperties": True} in consult["properties"]["controls"]["anyOf"]
    assert "only" in consult["properties"]["controls"]["description"]
    assert set(tools["usage"].input_schema["properties"]) == {"start", "end", "model", "llm", "group_by"}
    assert tools["list_models"].input_schema["properties"] == {}
    assert tools["consult"].output_schema is not None
    assert set(tools["consult"].output_schema["properties"]) >= {"answer", "members", "cost", "notices"}


@pytest.mark.parametrize(
    ("strategy", "total", "stage"), [("rank", 5, "rank: done"), ("layers", 7, None)], ids=["rank", "layers"]
)
async def test_consult_progress_counts_a_strategys_steps(
    served: Service, fake: FakeUpstream, strategy: str, total: int, stage: str | None
) -> None:
    # rank: 3 members, the rankings, the answer; layers (2 rounds): 3 members twice, the answer
    fake.configure({name: {"ranking": ["A", "B", "C"]} for name in MEMBERS})
    progress = Progress()
    async with session_of(served) as session:
        result = await session.call_tool(
            "consult", {"question": QUESTION, "controls": {"strategy": strategy}}, progress_callback=progress
        )
    assert not result.is_error, result.content
    steps = [p for p, _, _ in progress.seen]
    assert {t for _, t, _ in progress.seen} == {total}
    assert steps == sorted(steps) and steps[-1] == total and steps[-2] == total - 1
    settled = [m for _, _, m in progress.seen if m and m.split(": ")[0] in MEMBERS]
    assert len(settled) == total - 1 - (stage is not None)  # each member's call in each round
    if stage is not None:
        assert stage in [m for _, _, m in progress.seen]


async def test_list_models_names_each_panel(served: Service, fake: FakeUpstream) -> None:
    async with session_of(served) as session:
        result = await session.call_tool("list_models", {})
    assert not result.is_error
    assert result.structured_content == {
        "models": [
            {"name": "panel", "description": "Three members", "members": MEMBERS, "concluding": "mj"},
            {"name": "duo", "description": None, "members": ["ma", "mb"], "concluding": "mj"},
        ]
    }
    assert fake.log() == []


async def test_consult_answers_with_each_member_and_the_cost(served: Service, fake: FakeUpstream) -> None:
    fake.configure({"mc": {"status": 500}, "mj": {"text": "The panel says 4."}})
    progress = Progress()
    async with session_of(served) as session:
        result = await session.call_tool("consult", {"question": QUESTION}, progress_callback=progress)
    assert not result.is_error, result.content
    body = result.structured_content
    assert body is not None
    assert body["answer"] == "The panel says 4."
    assert body["model"] == "panel"  # the first MoM model, without `model`
    members = {m["name"]: m for m in body["members"]}
    assert {name: m["status"] for name, m in members.items()} == {"ma": "ok", "mb": "ok", "mc": "error"}
    assert members["mc"]["reason"] == "http_error" and members["mc"]["cost"] == 0
    assert body["concluding"]["name"] == "mj" and body["concluding"]["status"] == "ok"
    assert (body["answered"], body["asked"], body["degraded"], body["notices"]) == (2, 3, True, [])
    costs = [Decimal(str(m["cost"])) for m in body["members"]] + [Decimal(str(body["concluding"]["cost"]))]
    assert Decimal(str(body["cost"])) == sum(costs) and members["ma"]["cost"] > 0
    # every member got the question, then the concluding LLM
    log = fake.log()
    assert sorted(e["model"] for e in log) == ["ma", "mb", "mc", "mj"]
    for entry in log:
        if entry["model"] != "mj":
            assert entry["body"]["messages"] == [{"role": "user", "content": QUESTION}]
    # progress: each member as it settled, of 3 members + the concluding call; the concluding LLM's start and end
    assert [(p, t) for p, t, _ in progress.seen] == [(1, 4), (2, 4), (3, 4), (3, 4), (4, 4)]
    assert sorted(m for _, _, m in progress.seen[:3] if m) == ["ma: ok", "mb: ok", "mc: error (http_error)"]
    assert [m for _, _, m in progress.seen[3:]] == ["mj: concluding from the panel's answers", "mj: ok"]


async def test_consult_costs_what_the_same_chat_request_costs(served: Service, fake: FakeUpstream) -> None:
    async with session_of(served) as session:
        result = await session.call_tool("consult", {"question": QUESTION, "model": "duo"})
    chat = served.chat("duo", messages=[{"role": "user", "content": QUESTION}]).json()["mom"]
    assert result.structured_content is not None
    consulted = {m["name"]: m["cost"] for m in result.structured_content["members"]}
    assert consulted == {m["name"]: m["cost"] for m in chat["members"]}
    assert result.structured_content["cost"] == chat["cost"] and chat["cost"] > 0


async def test_consult_with_controls_reaches_the_chosen_model(served: Service, fake: FakeUpstream) -> None:
    fake.configure({"mj": {"text": "Two said so."}})
    controls = {"cache": "off", "member_deadline_ms": 5000}
    async with session_of(served) as session:
        result = await session.call_tool("consult", {"question": QUESTION, "model": "duo", "controls": controls})
        assert not result.is_error, result.content
        assert result.structured_content is not None
        assert result.structured_content["answer"] == "Two said so."
        assert asked(fake) == ["ma", "mb", "mj"]
        # controls that are not a JSON object, an empty question: refused by the tool's schema, before any upstream call
        fake.clear_log()
        wrong = await session.call_tool("consult", {"question": QUESTION, "controls": "only ma"})
        empty = await session.call_tool("consult", {"question": ""})
    assert wrong.is_error and "controls" in wrong.content[0].text  # type: ignore[union-attr]
    assert empty.is_error and "question" in empty.content[0].text  # type: ignore[union-attr]
    assert fake.log() == []


async def test_consult_passes_controls(served: Service, fake: FakeUpstream) -> None:
    async with session_of(served) as session:
        controls = {"only": ["ma"], "exclude": ["mab"]}
        result = await session.call_tool("consult", {"question": QUESTION, "controls": controls})
    assert not result.is_error, result.content
    assert asked(fake) == ["ma", "mj"]
    assert result.structured_content is not None
    assert result.structured_content["notices"] == ["mom.exclude: 'mab' is not asked; ignored. Did you mean 'ma'?"]


async def test_consult_errors_are_tool_errors(served: Service, fake: FakeUpstream) -> None:
    async with session_of(served) as session:
        unknown = await session.call_tool("consult", {"question": QUESTION, "model": "no-such-panel"})
        assert unknown.is_error
        assert "The model 'no-such-panel' does not exist. (model_not_found)" in unknown.content[0].text  # type: ignore[union-attr]
        assert fake.log() == []
        fake.configure({"ma": {"status": 500}, "mb": {"status": 500}})
        failed = await session.call_tool("consult", {"question": QUESTION, "model": "duo"})
    assert failed.is_error
    text = failed.content[0].text  # type: ignore[union-attr]
    assert "(members_failed)" in text and "ma: error (http_error), mb: error (http_error)" in text
    assert asked(fake) == ["ma", "mb"]


async def test_usage_reports_the_consult(served: Service, fake: FakeUpstream) -> None:
    async with session_of(served) as session:

        async def consulted() -> int:
            result = await session.call_tool("usage", {"group_by": "surface"})
            assert not result.is_error and result.structured_content is not None
            groups = {g["key"]: g["requests"] for g in result.structured_content["groups"]}
            return groups.get("mcp", 0)

        before = await consulted()
        assert not (await session.call_tool("consult", {"question": QUESTION, "model": "duo"})).is_error

        async def counted() -> bool:
            return await consulted() == before + 1

        await eventually(counted)
        bad = await session.call_tool("usage", {"group_by": "weekday"})
    assert bad.is_error and "use one of model, llm, surface, key, day, hour" in bad.content[0].text  # type: ignore[union-attr]
    with sqlite3.connect(served.workdir / "data" / "mom.db") as db:
        surfaces = {row[0] for row in db.execute("SELECT surface FROM mom_requests WHERE mom_model = 'duo'")}
    assert "mcp" in surfaces


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}], ids=["none", "wrong"])
async def test_refused_without_the_token(served: Service, fake: FakeUpstream, headers: dict[str, str]) -> None:
    raw = httpx.post(f"{served.url}/mcp", json=INITIALIZE, headers={**MCP_HEADERS, **headers})
    assert raw.status_code == 401
    assert raw.headers["www-authenticate"] == "Bearer"
    error = raw.json()["error"]  # a JSON-RPC error, which MCP's clients read, with ours as its data
    assert raw.json()["jsonrpc"] == "2.0" and error["data"]["code"] == "invalid_api_key"
    with pytest.raises(ExceptionGroup) as refused:  # the official client fails with the service's message
        async with session_of(served, headers):
            pass
    errors = [e for e in leaves(refused.value) if isinstance(e, MCPError)]
    assert len(errors) == 1
    assert str(errors[0]) == error["message"]
    assert error["message"].startswith("Missing API token" if not headers else "Incorrect API token")
    assert fake.log() == []


def test_request_id_and_cors_as_on_every_endpoint(served: Service) -> None:
    answered = httpx.post(
        f"{served.url}/mcp",
        json=INITIALIZE,
        headers={**served.headers(), **MCP_HEADERS, "X-Request-ID": "agent-42", "Origin": ORIGIN},
    )
    assert answered.status_code == 200 and answered.headers["content-type"].startswith("text/event-stream")
    assert answered.headers["x-request-id"] == "agent-42"
    assert answered.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.post(f"{served.url}/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert refused.headers["x-request-id"]
    preflight = httpx.options(
        f"{served.url}/mcp",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "mcp-protocol-version" in preflight.headers["access-control-allow-headers"].lower()


async def test_x_api_key_is_accepted(served: Service) -> None:
    async with session_of(served, {"x-api-key": TOKEN}) as session:
        assert len((await session.list_tools()).tools) == 3


async def test_the_rate_limit_counts_consults(
    fake_server: FakeUpstream, start_service: StartService, fake: FakeUpstream
) -> None:
    limited = start_service(mcp_config(fake_server), {"MOM_MCP_ENABLED": "true", "MOM_RATE_LIMIT_RPM": "1"})
    async with session_of(limited) as session:
        assert not (await session.call_tool("consult", {"question": QUESTION, "model": "duo"})).is_error
        assert len((await session.list_tools()).tools) == 3  # other messages are not counted
        again = await session.call_tool("consult", {"question": QUESTION, "model": "duo"})
    assert again.is_error and "1 requests per minute" in again.content[0].text  # type: ignore[union-attr]
    assert asked(fake) == ["ma", "mb", "mj"]


def test_off_unless_enabled(fake_server: FakeUpstream, start_service: StartService, tmp_path: Path) -> None:
    off = start_service(mcp_config(fake_server))
    response = httpx.post(f"{off.url}/mcp", json=INITIALIZE, headers={**off.headers(), **MCP_HEADERS})
    assert response.status_code == 404
    assert response.json()["error"]["data"]["code"] == "not_found"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(mcp_config(fake_server)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_"))}
    stdio = subprocess.run(
        [sys.executable, "-m", "mom_service.cli", "mcp"], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert stdio.returncode == 2
    assert b"The MCP server is off: set MOM_MCP_ENABLED=true" in stdio.stderr
    assert stdio.stdout == b""


async def test_over_stdio(fake: FakeUpstream, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(mcp_config(fake)))
    fake.configure({"mj": {"text": "Over stdio: 4."}})
    env = {"MOM_MCP_ENABLED": "true", "FAKE_KEY": FAKE_KEY, "MOM_CIRCUIT_FAILURES": "0", "MOM_CACHE_ENABLED": "false"}
    server = StdioServerParameters(command=sys.executable, args=["-m", "mom_service.cli", "mcp"], env=env, cwd=tmp_path)
    progress = Progress()
    with (tmp_path / "stderr.log").open("w") as errlog:
        async with stdio_client(server, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {tool.name for tool in (await session.list_tools()).tools}
            result = await session.call_tool("consult", {"question": QUESTION}, progress_callback=progress)
    assert tools == {"consult", "list_models", "usage"}
    assert not result.is_error, result.content
    assert result.structured_content is not None
    assert result.structured_content["answer"] == "Over stdio: 4."
    assert [m["status"] for m in result.structured_content["members"]] == ["ok", "ok", "ok"]
    assert asked(fake) == ["ma", "mb", "mc", "mj"]
    assert [(p, t) for p, t, _ in progress.seen] == [(1, 4), (2, 4), (3, 4), (3, 4), (4, 4)]
    # the records were written before the process ended: the consult, as the mcp surface
    with sqlite3.connect(tmp_path / "data" / "mom.db") as db:
        rows = db.execute("SELECT mom_model, surface, status FROM mom_requests").fetchall()
    assert rows == [("panel", "mcp", "ok")]


def test_stdio_ends_on_sigterm_with_its_records_written(fake: FakeUpstream, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(mcp_config(fake)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_"))} | {"MOM_MCP_ENABLED": "true"}
    with (tmp_path / "stderr.log").open("wb") as errlog:
        process = subprocess.Popen(
            [sys.executable, "-m", "mom_service.cli", "mcp"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(orjson.dumps(INITIALIZE) + b"\n")
        process.stdin.flush()
        answer = orjson.loads(process.stdout.readline())  # stdout carries MCP's messages, and nothing else
        assert answer["id"] == 1 and answer["result"]["serverInfo"]["name"] == "mom-service"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert "Usage records written: 0, dropped: 0" in (tmp_path / "stderr.log").read_text()


async def test_usage_is_the_callers_own(fake_server: FakeUpstream, start_service: StartService) -> None:
    """Two tokens: each one's `usage` counts its own requests (made on any surface), never the other's."""
    service = start_service(mcp_config(fake_server), {"MOM_MCP_ENABLED": "true", "API_TOKEN": f"{TOKEN},{OTHER_TOKEN}"})
    mine, theirs = service.headers(), service.headers(OTHER_TOKEN)
    for headers in (mine, theirs, theirs):  # one chat request of mine, two of theirs
        body = {"model": "duo", "messages": [{"role": "user", "content": QUESTION}]}
        assert httpx.post(f"{service.base_url}/chat/completions", headers=headers, json=body, timeout=30).is_success

    async def requests_of(headers: dict[str, str]) -> int:
        async with session_of(service, headers) as session:
            result = await session.call_tool("usage", {})
        assert not result.is_error and result.structured_content is not None
        count: int = result.structured_content["totals"]["requests"]
        return count

    async def recorded() -> bool:
        return (await requests_of(mine), await requests_of(theirs)) == (1, 2)

    await eventually(recorded)
    with sqlite3.connect(service.workdir / "data" / "mom.db") as db:
        callers = [row[0] for row in db.execute("SELECT caller FROM mom_requests")]
    assert len(set(callers)) == 2 and all(len(c) == 32 and TOKEN not in c and OTHER_TOKEN not in c for c in callers)
