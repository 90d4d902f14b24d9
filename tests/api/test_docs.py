"""The documentation's examples, run against the live service, so that README.md and docs/ cannot drift from it.

Every curl or OpenAI-SDK code block in README.md and docs/*.md is marked by an HTML comment on the line before its
opening fence (docs/development.md, "Runnable examples in the docs"):

    <!-- test: run expect="..." [expect='...' ...] -->    run it; it must exit 0 and print every `expect`
    <!-- test: skip reason="..." -->                      deliberately not run, and why

A runnable block is run as a reader runs it, against the service started as users start it (`mom-service serve`
with the built-in offline demo config, the response cache and circuit breakers on as by default): shell blocks in
bash, with curl failing on an HTTP error status; Python blocks with this virtualenv's Python. The documented
address (http://127.0.0.1:8000) becomes the live service's, and `API_TOKEN` and `ADMIN_TOKEN` are set in their
environment.

docs/configuration.md is also checked against the code: every environment setting and every config.yaml field is
in it, and no `MOM_*` variable the code does not read is named anywhere in the docs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

from mom_service import config as config_models
from mom_service.settings import Settings
from tests.conftest import ROOT, TOKEN, Service, StartService

DOCUMENTED_URL = "http://127.0.0.1:8000"
ADMIN_TOKEN = "docs-admin-token-123456"  # the demo service's and the reader's, for the admin API's examples
DOC_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")))
RUNNABLE_LANGUAGES = {"sh": "bash", "bash": "bash", "shell": "bash", "python": "python", "py": "python"}
EXAMPLE_TIMEOUT_S = 90
# a console command that runs without the HTTP service, against the demo config of the example's working directory
OFFLINE_COMMAND = re.compile(r"^mom-service (eval|check-config)\b", re.MULTILINE)

_MARKER = re.compile(r"^<!--\s*test:\s*(?P<body>.*?)\s*-->$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_ATTRIBUTE = re.compile(r"""(?P<name>[a-z_]+)=(?:"(?P<double>[^"]*)"|'(?P<single>[^']*)')""")
# What makes a block an example a reader may run: a curl command, or the OpenAI SDK.
_EXAMPLE = re.compile(r"(^|[\s;|&(])curl\s|\bfrom openai import\b|\bimport openai\b|\bOpenAI\(")


@dataclass(frozen=True)
class Marker:
    action: str  # run | skip
    attributes: tuple[tuple[str, str], ...]
    leftover: str  # text that is neither the action nor an attribute (a malformed marker)

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.attributes if key == name]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: Marker | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def example(self) -> bool:
        return _EXAMPLE.search(self.code) is not None


def parse_marker(body: str) -> Marker:
    action, _, rest = body.partition(" ")
    attributes = tuple(
        (m["name"], m["double"] if m["double"] is not None else m["single"]) for m in _ATTRIBUTE.finditer(rest)
    )
    return Marker(action, attributes, _ATTRIBUTE.sub("", rest).strip())


def scan(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of a Markdown file with their markers, and the markers that precede no block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    stray: list[str] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            marker = _MARKER.match(lines[index].strip())
            if marker is not None and (index + 1 == len(lines) or _FENCE.match(lines[index + 1]) is None):
                stray.append(f"{path.relative_to(ROOT)}:{index + 1}: a test marker not followed by a code block")
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        end = index + 1
        while end < len(lines) and closing.match(lines[end]) is None:
            text = lines[end]
            body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
            end += 1
        previous = _MARKER.match(lines[index - 1].strip()) if index else None
        blocks.append(
            Block(
                path=path,
                line=index + 1,
                language=opening["info"].split()[0].lower() if opening["info"].split() else "",
                code="\n".join(body) + "\n",
                marker=parse_marker(previous["body"]) if previous is not None else None,
            )
        )
        index = end + 1
    return blocks, stray


def all_blocks() -> Iterator[Block]:
    for path in DOC_FILES:
        yield from scan(path)[0]


def marker_problems(block: Block) -> list[str]:
    """What is wrong with a block's marking (nothing for an unmarked block that is no example)."""
    marker = block.marker
    if marker is None:
        if block.example:
            return [
                f'{block.where}: a curl or OpenAI-SDK example with neither <!-- test: run expect="..." --> '
                'nor <!-- test: skip reason="..." -->'
            ]
        return []
    problems = []
    if marker.leftover:
        problems.append(f"{block.where}: unreadable marker text {marker.leftover!r}")
    names = {name for name, _ in marker.attributes}
    if marker.action == "run":
        if block.language not in RUNNABLE_LANGUAGES:
            problems.append(f"{block.where}: a runnable block must be sh, bash or python, not {block.language!r}")
        if names != {"expect"} or not all(marker.values("expect")):
            problems.append(f"{block.where}: a runnable block needs one or more non-empty expect=, and nothing else")
        if DOCUMENTED_URL not in block.code and not OFFLINE_COMMAND.search(block.code):
            problems.append(
                f"{block.where}: a runnable block talks to {DOCUMENTED_URL}, the documented address (or runs a "
                "`mom-service` command that needs no service, against the demo config)"
            )
    elif marker.action == "skip":
        if names != {"reason"} or not marker.values("reason")[0].strip():
            problems.append(f'{block.where}: a skipped block needs reason="..." (why it is not run)')
    else:
        problems.append(f"{block.where}: unknown marker action {marker.action!r} (run or skip)")
    return problems


RUNNABLE = [block for block in all_blocks() if block.marker is not None and block.marker.action == "run"]


def test_every_example_is_marked() -> None:
    problems = [problem for path in DOC_FILES for problem in scan(path)[1]]
    problems += [problem for block in all_blocks() for problem in marker_problems(block)]
    assert not problems, "\n".join(problems)


def test_the_readme_examples_are_run() -> None:
    """The README's curl and SDK examples are among the runnable blocks (so the scan sees the marks at all)."""
    languages = {RUNNABLE_LANGUAGES[b.language] for b in RUNNABLE if b.path.name == "README.md"}
    assert languages == {"bash", "python"}, [b.where for b in RUNNABLE]


@pytest.fixture(scope="module")
def demo(start_service: StartService) -> Service:
    """The service as a user first starts it: the built-in demo config, every setting at its default."""
    defaults = Settings.model_fields
    env = {
        # (the shared start_service turns these two off for the other tests; a reader has them on)
        "MOM_CACHE_ENABLED": str(defaults["mom_cache_enabled"].default).lower(),
        "MOM_CIRCUIT_FAILURES": str(defaults["mom_circuit_failures"].default),
        "ADMIN_TOKEN": ADMIN_TOKEN,  # the admin API's examples (docs/keys.md)
    }
    return start_service(None, env)


def example_environment(home: Path) -> dict[str, str]:
    """The reader's environment: the token exported, curl failing on an HTTP error status, no proxy for us, the
    virtualenv's commands on the PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_", "OPENAI_", "CURL_"))}
    (home / ".curlrc").write_text("fail-with-body\nmax-time = 60\n")
    env.update(
        {
            "API_TOKEN": TOKEN,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "CURL_HOME": str(home),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
            # the service's virtualenv activated, as the reader's is: `mom-service` on the PATH
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    return env


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_runnable_example(block: Block, demo: Service, tmp_path: Path) -> None:
    code = block.code.replace(DOCUMENTED_URL, demo.url)
    if RUNNABLE_LANGUAGES[block.language] == "bash":
        command = ["bash", "-c", "set -euo pipefail\n" + code]
    else:
        script = tmp_path / "example.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=example_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )
    report = f"{block.where}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"exit {done.returncode}: {report}\n--- service log\n{demo.log()[-3000:]}"
    assert block.marker is not None
    missing = [expected for expected in block.marker.values("expect") if expected not in done.stdout]
    assert not missing, f"not in the output: {missing}\n{report}"


# ------------------------------------------------------------------------------------- configuration reference

CONFIGURATION = ROOT / "docs" / "configuration.md"
# every section of config.yaml: each model the config module defines (a new one is checked without a change here)
CONFIG_MODELS: tuple[type[BaseModel], ...] = tuple(
    model
    for model in vars(config_models).values()
    if isinstance(model, type)
    and issubclass(model, BaseModel)
    and model.__module__ == config_models.__name__
    and not model.__name__.startswith("_")
)


def test_the_config_sections_are_found() -> None:
    assert {config_models.MoMModelConfig, config_models.ToolsConfig, config_models.Capabilities} <= set(CONFIG_MODELS)


def test_every_setting_and_config_field_is_documented() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    missing = [f"`{name.upper()}`" for name in Settings.model_fields if f"`{name.upper()}`" not in text]
    missing += [
        f"{model.__name__}.{name}" for model in CONFIG_MODELS for name in model.model_fields if f"`{name}`" not in text
    ]
    assert not missing, f"not in {CONFIGURATION.relative_to(ROOT)}: {missing}"


def test_no_invented_variables() -> None:
    """Every MOM_* variable the docs name is one the service reads."""
    known = {name.upper() for name in Settings.model_fields}
    named = {
        (path.relative_to(ROOT).as_posix(), variable)
        for path in DOC_FILES
        for variable in re.findall(r"\bMOM_[A-Z0-9_]+\b", path.read_text(encoding="utf-8"))
    }
    invented = sorted((where, variable) for where, variable in named if variable not in known)
    assert not invented, invented
