"""The local demo's config (panel.yaml beside this module), pointed at the llama.cpp server's URL."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml


def demo_config(api_base: str) -> dict[str, Any]:
    """The demo's config as a YAML mapping, every LLM served at `api_base` (e.g. http://127.0.0.1:8080/v1)."""
    raw: dict[str, Any] = yaml.safe_load(resources.files("mom_service.local_demo").joinpath("panel.yaml").read_text())
    for llm in raw["llm_definitions"]:
        llm["api_base"] = api_base
    return raw


def write_demo_config(path: Path, api_base: str) -> Path:
    path.write_text(yaml.safe_dump(demo_config(api_base), sort_keys=False))
    return path
