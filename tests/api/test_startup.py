"""Starting the service as users do: the demo config, a wrong config, `check-config`, plain uvicorn."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import ROOT, TOKEN, StartService, free_port

BAD_CONFIG = """
llm_definitions:
  - name: good
    model: openai/gpt-4o-mini
  - name: broken
    model: openai/gpt-4o-mini
    timeout: soon
models:
  - name: mom
    llms_to_query: [good, missing-llm]
    concluding_llm: good
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_", "OPENAI_"))}
    env.update(extra)
    return env


def test_demo_config_runs_offline_and_says_so_first(start_service: StartService) -> None:
    service = start_service(None)  # no config.yaml in its working directory
    first_lines = service.log().splitlines()[:2]
    assert "DEMO config" in first_lines[0]
    assert "config.yaml_template" in first_lines[0]
    client = openai.OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list()] == ["mom", "mom-thinking"]
    completion = client.chat.completions.create(model="mom", messages=[{"role": "user", "content": "hello"}])
    assert "demo synthesis" in (completion.choices[0].message.content or "")
    streamed = client.chat.completions.create(
        model="mom-thinking", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text.startswith("<think>\nModel: demo-") and "</think>\n\n" in text


def test_wrong_config_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(BAD_CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "mom_service.cli", "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=_clean_env(API_TOKEN=TOKEN),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "config.yaml: llm_definitions[1] (name 'broken'): field 'timeout'" in output
    assert "Traceback" not in output


def test_wrong_config_stops_plain_uvicorn_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "mom.yaml"
    config.write_text(BAD_CONFIG.replace("timeout: soon", "timeout: 5"))
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "mom_service.main:app", "--port", str(free_port())],
        cwd=tmp_path,
        env=_clean_env(API_TOKEN=TOKEN, MOM_CONFIG=str(config), PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "models[0] (name 'mom'): field 'llms_to_query': unknown LLM 'missing-llm'" in output
    assert "Traceback" not in output


def test_plain_uvicorn_serves_the_app(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "mom_service.main:app", "--port", str(port)],
        cwd=tmp_path,
        env=_clean_env(API_TOKEN=TOKEN, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2)
        for _ in range(300):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "uvicorn exited"
            time.sleep(0.1)
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert [m["id"] for m in response.json()["data"]] == ["mom", "mom-thinking"]
    finally:
        process.terminate()
        process.wait(10)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mom_service.cli", "check-config", str(path)],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    result = _check_config(bad)
    assert result.returncode == 1
    assert f"{bad}: llm_definitions[1] (name 'broken'): field 'timeout'" in result.stderr
    bad.write_text(BAD_CONFIG.replace("timeout: soon", "timeout: 5"))
    result = _check_config(bad)
    assert result.returncode == 1
    assert f"{bad}: models[0] (name 'mom'): field 'llms_to_query': unknown LLM 'missing-llm'" in result.stderr
    good = _check_config(ROOT / "config.yaml_template")
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
