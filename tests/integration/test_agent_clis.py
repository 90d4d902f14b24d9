"""The real coding agents against the live service, offline: Claude Code in headless mode (`claude -p`, Anthropic
Messages) and Codex (`codex exec`, Responses), each set up exactly as docs/anthropic.md and docs/responses.md tell a
user, each completing a task that needs one tool call.

The CLIs are the versions pinned in tests/agents/package-lock.json, which `make test-deps` installs with `npm ci`
(tests/agents/node_modules is git-ignored). Where node, npm or that install is missing these tests skip, saying why,
and fail when CI=true.

The MoM model's members and concluding LLM are fake upstream models. The members propose the call and the concluding
LLM makes it (the `synthesize` strategy); the CLI runs it (a shell command writing a marker file in its working
directory) and comes back with its result, which goes to the concluding LLM alone (the `relay` continuation), whose
final text the CLI prints. Each CLI runs in a temporary working directory, with a HOME (and CODEX_HOME) of its own and
an environment made from scratch: nothing of the machine's own set-up reaches it. A third test gives Codex an MCP
server (tests/agents/mcp_marker.py), whose tools Codex sends as a `namespace` tool, and has the MoM model call one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_docs import DOCUMENTED_URL, scan
from tests.conftest import ROOT, TOKEN, Service, StartService, llm
from tests.fake_upstream import FakeUpstream, LogEntry

pytestmark = pytest.mark.slow

AGENTS = ROOT / "tests" / "agents"
ANTHROPIC_DOC = ROOT / "docs" / "anthropic.md"
RESPONSES_DOC = ROOT / "docs" / "responses.md"
MODEL = "mom-agent"  # the MoM model the docs' set-up names
MARKER = "agent-tool-ran"
COMMAND = f"echo {MARKER} > marker.txt && cat marker.txt"
FINAL_TEXT = "All done: the marker file is written."
CLI_TIMEOUT_S = 90.0


def agents_config(fake: FakeUpstream) -> dict[str, Any]:
    """One MoM model, named as the docs name it: two members and a concluding LLM, all fake."""
    return {
        "llm_definitions": [llm(name, fake, retries=0) for name in ("ag-a", "ag-b", "ag-judge")],
        "models": [{"name": MODEL, "llms_to_query": ["ag-a", "ag-b"], "concluding_llm": "ag-judge"}],
    }


@pytest.fixture(scope="module")
def gateway(fake_server: FakeUpstream, start_service: StartService) -> Service:
    return start_service(agents_config(fake_server))


def installed_cli(package: str, binary: str) -> Path:
    """The pinned CLI `binary` of the npm package `package`, as installed in tests/agents; the test is skipped
    without it (and fails when CI=true)."""
    path = AGENTS / "node_modules" / ".bin" / binary
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed: the agent CLIs (tests/agents) cannot be installed"
    elif not path.exists():
        reason = f"{path.relative_to(ROOT)} is missing: `make test-deps` installs the CLIs (npm ci in tests/agents)"
    else:
        pinned = json.loads((AGENTS / "package-lock.json").read_text())["packages"][f"node_modules/{package}"]
        manifest = AGENTS / "node_modules" / package / "package.json"
        installed = json.loads(manifest.read_text())["version"]
        assert installed == pinned["version"], (
            f"{package} {installed} installed, not {pinned['version']}: make test-deps"
        )
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires the agent CLIs: {reason}")
    pytest.skip(reason)


def documented_block(doc: Path, needle: str) -> str:
    """The one fenced code block of `doc` that contains `needle`: the set-up a user copies."""
    found = [block.code for block in scan(doc)[0] if needle in block.code]
    assert len(found) == 1, f"{doc.relative_to(ROOT)} has {len(found)} code blocks with {needle!r}, expected 1"
    return found[0]


def clean_environment(home: Path) -> dict[str, str]:
    """An environment made from scratch: the machine's PATH, a HOME of the test's own, nothing else."""
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}


def run_cli(command: list[str], workdir: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return done, time.monotonic() - started


def script_one_tool_call(fake: FakeUpstream, name: str, arguments: dict[str, Any]) -> None:
    """The members propose the call, the concluding LLM makes it, and answers FINAL_TEXT once the result is back."""
    call = {"name": name, "arguments": arguments}
    fake.configure(
        {
            "ag-a": {"tool_calls": [call]},
            "ag-b": {"tool_calls": [call]},
            "ag-judge": {"tool_calls": [call], "after_tool_text": FINAL_TEXT},
        }
    )


def assert_one_tool_round_trip(fake: FakeUpstream, tool: str, report: str) -> None:
    """The fake's log: the first turn asked the panel with the CLI's tools, the second the concluding LLM alone,
    with the call it made and the CLI's result of it at the end of the conversation."""
    log: list[LogEntry] = fake.log()
    assert Counter(entry["model"] for entry in log) == {"ag-a": 1, "ag-b": 1, "ag-judge": 2}, report
    assert all(entry["outcome"] == "ok" for entry in log), report
    first, second = (entry for entry in log if entry["model"] == "ag-judge")
    for entry in (*(e for e in log if e["model"] != "ag-judge"), first, second):
        assert tool in (entry["tools"] or []), (entry["model"], entry["tools"])
    assert not [m for m in first["body"]["messages"] if m["role"] == "tool"], "a tool result in the first turn"
    *_, proposed, result = second["body"]["messages"]
    (call,) = proposed["tool_calls"]
    assert (proposed["role"], call["function"]["name"]) == ("assistant", tool)
    assert MARKER in call["function"]["arguments"]
    assert (result["role"], result["tool_call_id"]) == ("tool", call["id"])
    content = result["content"] if isinstance(result["content"], str) else json.dumps(result["content"])
    assert MARKER in content, result


def answered(gateway: Service, since: int, count: int) -> list[tuple[str, str]]:
    """The path and status of each request the service logged after `since` characters of its log (waiting a few
    seconds for `count` of them: a request's line is written as its answer ends)."""
    deadline = time.monotonic() + 5
    while True:
        logged: list[tuple[str, str]] = re.findall(r"method=\S+ path=(\S+) status=(\d+)", gateway.log()[since:])
        if len(logged) >= count or time.monotonic() > deadline:
            return logged
        time.sleep(0.05)


def assert_marker_written(workdir: Path, report: str) -> None:
    marker = workdir / "marker.txt"
    assert marker.exists(), f"the tool call did not run: no {marker}\n{report}"
    assert marker.read_text() == f"{MARKER}\n"


def describe(done: subprocess.CompletedProcess[str], gateway: Service) -> str:
    return (
        f"exit {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}"
        f"\n--- service log\n{gateway.log()[-4000:]}"
    )


@pytest.fixture(scope="module")
def claude() -> Path:
    return installed_cli("@anthropic-ai/claude-code", "claude")


@pytest.fixture(scope="module")
def codex() -> Path:
    return installed_cli("@openai/codex", "codex")


def test_claude_code_runs_one_tool_call_through_the_service(
    claude: Path, gateway: Service, fake: FakeUpstream, tmp_path: Path
) -> None:
    env = clean_environment(tmp_path / "home")
    for line in documented_block(ANTHROPIC_DOC, "ANTHROPIC_BASE_URL").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            name, _, value = words[1].partition("=")
            env[name] = value.replace("$API_TOKEN", TOKEN).replace(DOCUMENTED_URL, gateway.url)
    assert env.get("ANTHROPIC_BASE_URL") == gateway.url and env.get("ANTHROPIC_MODEL") == MODEL, env
    env.update(
        {
            "IS_SANDBOX": "1",  # --dangerously-skip-permissions is refused to root without it
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # no telemetry, update checks or /api/hello
        }
    )
    (tmp_path / "home").mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    script_one_tool_call(fake, "Bash", {"command": COMMAND, "description": "Write the marker file"})

    prompt = "Use the Bash tool to write the marker file, then say what happened."
    command = [str(claude), "-p", prompt, "--output-format", "json", "--dangerously-skip-permissions"]
    since = len(gateway.log())
    done, took = run_cli(command, workdir, env)
    report = describe(done, gateway) + f"\n--- took {took:.1f} s"
    assert done.returncode == 0, report
    # every request answered: Claude Code retries some refusals without what was refused, and says nothing
    assert answered(gateway, since, 2) == [("/v1/messages", "200")] * 2, report
    assert_marker_written(workdir, report)
    result = json.loads(done.stdout)
    assert (result["is_error"], result["result"], result["num_turns"]) == (False, FINAL_TEXT, 2), report
    assert_one_tool_round_trip(fake, "Bash", report)
    print(f"claude -p: {took:.1f} s")


def run_codex(
    codex: Path, gateway: Service, tmp_path: Path, prompt: str, more_config: str = ""
) -> tuple[Path, subprocess.CompletedProcess[str], str]:
    """`codex exec` in a working directory of its own, with the documented config.toml (and `more_config`): the
    working directory, what it did, and a report of it for failures."""
    config = documented_block(RESPONSES_DOC, "[model_providers.mom]").replace(DOCUMENTED_URL, gateway.url)
    settings = tomllib.loads(config)
    provider = settings["model_providers"][settings["model_provider"]]
    assert (settings["model"], provider["base_url"], provider["wire_api"]) == (MODEL, gateway.base_url, "responses")
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(config + more_config)
    env = clean_environment(codex_home) | {"CODEX_HOME": str(codex_home), provider["env_key"]: TOKEN}
    workdir = tmp_path / "work"
    workdir.mkdir()
    command = [
        str(codex),
        "exec",
        "--strict-config",  # every key of the documented config.toml is one this Codex knows
        "--skip-git-repo-check",  # the working directory is no git repository
        "--dangerously-bypass-approvals-and-sandbox",  # (its sandbox needs what a test machine may lack)
        "--ephemeral",
        prompt,
    ]
    since = len(gateway.log())
    done, took = run_cli(command, workdir, env)
    print(f"codex exec: {took:.1f} s")
    report = describe(done, gateway) + f"\n--- took {took:.1f} s"
    assert answered(gateway, since, 2) == [("/v1/responses", "200")] * 2, report
    return workdir, done, report


def test_codex_runs_one_tool_call_through_the_service(
    codex: Path, gateway: Service, fake: FakeUpstream, tmp_path: Path
) -> None:
    script_one_tool_call(fake, "exec_command", {"cmd": COMMAND})
    prompt = "Run a shell command that writes the marker file, then say what happened."
    workdir, done, report = run_codex(codex, gateway, tmp_path, prompt)
    assert done.returncode == 0, report
    assert_marker_written(workdir, report)
    assert FINAL_TEXT in done.stdout, report
    assert_one_tool_round_trip(fake, "exec_command", report)


def test_codex_calls_an_mcp_servers_tool_through_the_service(
    codex: Path, gateway: Service, fake: FakeUpstream, tmp_path: Path
) -> None:
    """Codex sends an MCP server's tools as a `namespace` tool: the call of one comes back with its namespace and
    name, Codex routes it to the server (tests/agents/mcp_marker.py), which writes the marker file."""
    script_one_tool_call(fake, "mcp__marker__write_marker", {"text": MARKER})
    server = [str(AGENTS / "mcp_marker.py"), str(tmp_path / "work" / "marker.txt")]
    more = f"\n[mcp_servers.marker]\ncommand = {json.dumps(sys.executable)}\nargs = {json.dumps(server)}\n"
    workdir, done, report = run_codex(codex, gateway, tmp_path, "Write the marker file with the MCP tool.", more)
    assert done.returncode == 0, report
    assert_marker_written(workdir, report)
    assert FINAL_TEXT in done.stdout, report
    assert_one_tool_round_trip(fake, "mcp__marker__write_marker", report)
