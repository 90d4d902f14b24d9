"""config.yaml validation: every problem names its file, entry and field; settings; which config runs; the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mom_service.cli import main
from mom_service.config import demo_config, load_config, parse_config, resolve_config
from mom_service.errors import ConfigError
from mom_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    """A valid config: two LLMs (gpt, claude), one prompt, one MoM model."""
    return {
        "llm_definitions": [
            {"name": "gpt", "model": "openai/gpt-4o", "api_key_env": "OPENAI_API_KEY"},
            {"name": "claude", "model": "anthropic/claude-sonnet", "api_key_env": "ANTHROPIC_API_KEY"},
        ],
        "prompt_definitions": [{"name": "synth", "content": "Combine the answers."}],
        "models": [
            {"name": "mom", "llms_to_query": ["gpt", "claude"], "concluding_llm": "gpt", "concluding_prompt": "synth"}
        ],
    }


def write(tmp_path: Path, raw: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def problem(tmp_path: Path, change: Callable[[dict[str, Any]], Any]) -> tuple[Path, str]:
    """Write the base config with `change` applied; return its path and load_config's error message."""
    raw = base()
    change(raw)
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, str(info.value)


def claude(raw: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = raw["llm_definitions"][1]
    return entry


def mom(raw: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = raw["models"][0]
    return entry


# ------------------------------------------------------------------------------------------------ valid files


def test_base_config_is_valid(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, base()))
    assert [d.name for d in config.llm_definitions] == ["gpt", "claude"]
    model = config.mom_model("mom")
    assert model is not None
    assert config.concluding_prompt(model) == "Combine the answers."
    assert config.mom_model("nope") is None


# ------------------------------------------------------------------------------------- file and YAML problems


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: file not found"


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("llm_definitions:\n  - name: gpt\n   model: openai/gpt-4o\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid YAML at line 3, column ")
    assert "\n" not in message


@pytest.mark.parametrize("document", ["- just\n- a list\n", "a plain string\n", ""], ids=["list", "scalar", "empty"])
def test_top_level_must_be_a_mapping(tmp_path: Path, document: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(document, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (
        str(info.value) == f"{path}: the file must be a YAML mapping with llm_definitions, prompt_definitions, models"
    )


def test_parse_config_uses_the_source_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(["not", "a", "mapping"], "my.yaml")
    assert str(info.value).startswith("my.yaml: the file must be a YAML mapping")


# ---------------------------------------------------------------------------------------------- field problems


def test_missing_model(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).pop("model"))
    assert message == f"{path}: llm_definitions[1] (name 'claude'): field 'model': Field required"


def test_missing_llms_to_query(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: mom(raw).pop("llms_to_query"))
    assert message == f"{path}: models[0] (name 'mom'): field 'llms_to_query': Field required"


def test_missing_concluding_llm(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: mom(raw).pop("concluding_llm"))
    assert message == f"{path}: models[0] (name 'mom'): field 'concluding_llm': Field required"


def test_missing_sections(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: (raw.pop("llm_definitions"), raw.pop("models")))
    assert message.splitlines() == [
        f"{path}: field 'llm_definitions': Field required",
        f"{path}: field 'models': Field required",
    ]


def test_wrong_type_timeout(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).update(timeout="abc"))
    assert message.startswith(f"{path}: llm_definitions[1] (name 'claude'): field 'timeout': ")
    assert "valid number" in message


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).update(timeout=0))
    assert message.startswith(f"{path}: llm_definitions[1] (name 'claude'): field 'timeout': ")
    assert "greater than 0" in message


def test_negative_pricing(tmp_path: Path) -> None:
    path, message = problem(
        tmp_path, lambda raw: claude(raw).update(pricing={"input_per_million": -1, "output_per_million": 2})
    )
    assert message.startswith(f"{path}: llm_definitions[1] (name 'claude'): field 'pricing.input_per_million': ")
    assert "greater than or equal to 0" in message


def test_unknown_field_typo(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).update(tempreature=0.2))
    assert message == f"{path}: llm_definitions[1] (name 'claude'): field 'tempreature': unknown field"


def test_unknown_top_level_section(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: raw.update(modles=[]))
    assert message == f"{path}: field 'modles': unknown field"


def test_empty_llms_to_query(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: mom(raw).update(llms_to_query=[]))
    assert message.startswith(f"{path}: models[0] (name 'mom'): field 'llms_to_query': ")
    assert "at least 1 item" in message


@pytest.mark.parametrize("key", ["api_key", "stream", "api_base", "timeout", "messages"])
def test_reserved_params(tmp_path: Path, key: str) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).update(params={"temperature": 0.1, key: "x"}))
    assert message.startswith(f"{path}: llm_definitions[1] (name 'claude'): field 'params': ")
    assert f"may not set {key} " in message
    assert "\n" not in message


def test_api_key_in_params_is_rejected_and_not_echoed(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).update(params={"api_key": "sk-secret-value-12345"}))
    assert message.startswith(f"{path}: llm_definitions[1] (name 'claude'): field 'params': ")
    assert "api_key_env" in message
    assert "sk-secret-value-12345" not in message


@pytest.mark.parametrize("url", ["ftp://example.com/v1", "localhost:8080/v1", "file:///tmp/x"])
def test_api_base_must_be_http(tmp_path: Path, url: str) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).update(api_base=url))
    assert message.startswith(f"{path}: llm_definitions[1] (name 'claude'): field 'api_base': ")
    assert "http:// or https:// URL" in message


def test_api_base_http_and_https_accepted(tmp_path: Path) -> None:
    raw = base()
    raw["llm_definitions"][0]["api_base"] = "http://127.0.0.1:4000/v1"
    raw["llm_definitions"][1]["api_base"] = "https://api.example.com/v1"
    config = load_config(write(tmp_path, raw))
    assert config.llm("claude").api_base == "https://api.example.com/v1"


# ----------------------------------------------------------------------------------- names and cross-references


def test_duplicate_llm_name(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: raw["llm_definitions"].append({"name": "claude", "model": "x/y"}))
    assert message == f"{path}: llm_definitions[2] (name 'claude'): field 'name': duplicate name 'claude'"


def test_duplicate_prompt_name(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: raw["prompt_definitions"].append({"name": "synth", "content": "y"}))
    assert message == f"{path}: prompt_definitions[1] (name 'synth'): field 'name': duplicate name 'synth'"


def test_duplicate_model_name(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: raw["models"].append(dict(mom(raw))))
    assert message == f"{path}: models[1] (name 'mom'): field 'name': duplicate name 'mom'"


def test_unknown_llm_in_llms_to_query(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: mom(raw).update(llms_to_query=["gpt", "gemini"]))
    assert message == (
        f"{path}: models[0] (name 'mom'): field 'llms_to_query': unknown LLM 'gemini' (not in llm_definitions)"
    )


def test_unknown_concluding_llm(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: mom(raw).update(concluding_llm="judge"))
    assert message == (
        f"{path}: models[0] (name 'mom'): field 'concluding_llm': unknown LLM 'judge' (not in llm_definitions)"
    )


def test_unknown_concluding_prompt(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: mom(raw).update(concluding_prompt="nope"))
    assert message == (
        f"{path}: models[0] (name 'mom'): field 'concluding_prompt': unknown prompt 'nope' (not in prompt_definitions)"
    )


def test_llm_listed_twice(tmp_path: Path) -> None:
    path, message = problem(tmp_path, lambda raw: mom(raw).update(llms_to_query=["gpt", "claude", "gpt"]))
    assert message == f"{path}: models[0] (name 'mom'): field 'llms_to_query': an LLM is listed twice"


# ------------------------------------------------------------------------------------------ several problems


def test_several_field_problems_reported_at_once(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        claude(raw)["timeout"] = "abc"
        raw["llm_definitions"][0]["tempreature"] = 1
        mom(raw).pop("concluding_llm")

    path, message = problem(tmp_path, change)
    lines = message.splitlines()
    assert len(lines) == 3
    assert f"{path}: llm_definitions[0] (name 'gpt'): field 'tempreature': unknown field" in lines
    assert any(line.startswith(f"{path}: llm_definitions[1] (name 'claude'): field 'timeout': ") for line in lines)
    assert f"{path}: models[0] (name 'mom'): field 'concluding_llm': Field required" in lines


def test_several_reference_problems_reported_at_once(tmp_path: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["llm_definitions"].append({"name": "gpt", "model": "openai/gpt-4.1"})
        mom(raw).update(llms_to_query=["gpt", "mistral"], concluding_llm="judge", concluding_prompt="nope")

    path, message = problem(tmp_path, change)
    assert message.splitlines() == [
        f"{path}: llm_definitions[2] (name 'gpt'): field 'name': duplicate name 'gpt'",
        f"{path}: models[0] (name 'mom'): field 'llms_to_query': unknown LLM 'mistral' (not in llm_definitions)",
        f"{path}: models[0] (name 'mom'): field 'concluding_llm': unknown LLM 'judge' (not in llm_definitions)",
        f"{path}: models[0] (name 'mom'): field 'concluding_prompt': unknown prompt 'nope' (not in prompt_definitions)",
    ]


# ------------------------------------------------------------------------------------------------ demo config


def test_demo_config_is_valid_and_offline() -> None:
    config = demo_config()
    assert [m.name for m in config.models] == ["mom", "mom-thinking"]
    for definition in config.llm_definitions:
        assert "mock_response" in definition.params
        assert definition.api_key_env is None
        assert definition.api_base is None
    thinking = config.mom_model("mom-thinking")
    assert thinking is not None
    assert thinking.include_thinking_context is True
    plain = config.mom_model("mom")
    assert plain is not None
    assert plain.include_thinking_context is False
    for name in plain.llms_to_query:
        config.llm(name)  # every member is defined
    config.llm(plain.concluding_llm)


def test_config_template_loads() -> None:
    template = ROOT / "config.yaml_template"
    if not template.is_file():
        pytest.skip(f"{template} is absent")
    config = load_config(template)
    assert config.models


# ---------------------------------------------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MOM_CONFIG / API_TOKEN / ALLOWED_CORS_ORIGINS from the outside, and an empty working directory."""
    for name in ("MOM_CONFIG", "API_TOKEN", "ALLOWED_CORS_ORIGINS"):
        monkeypatch.delenv(name, raising=False)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def test_api_tokens_split_and_strip(clean_env: Path) -> None:
    settings = Settings(api_token=" tok-one , ,tok-two,, ", _env_file=None)
    assert settings.api_tokens == (b"tok-one", b"tok-two")


def test_api_tokens_empty_when_unset(clean_env: Path) -> None:
    assert Settings(_env_file=None).api_tokens == ()
    assert Settings(api_token=" , ", _env_file=None).api_tokens == ()


def test_api_token_from_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "a,b")
    assert Settings(_env_file=None).api_tokens == (b"a", b"b")


def test_cors_origins_split_and_strip(clean_env: Path) -> None:
    settings = Settings(allowed_cors_origins=" https://a.example , ,http://b.example:3000,", _env_file=None)
    assert settings.cors_origins == ["https://a.example", "http://b.example:3000"]
    assert Settings(_env_file=None).cors_origins == []


# ----------------------------------------------------------------------------------------- which config runs


def test_resolve_prefers_mom_config(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = base()
    chosen["models"][0]["name"] = "chosen"
    explicit = write(tmp_path, chosen, "explicit.yaml")
    write(clean_env, base())  # ./config.yaml exists too, but MOM_CONFIG wins
    monkeypatch.setenv("MOM_CONFIG", str(explicit))
    config, path = resolve_config(Settings(_env_file=None))
    assert path == str(explicit)
    assert [m.name for m in config.models] == ["chosen"]


def test_resolve_uses_config_yaml_in_cwd(clean_env: Path) -> None:
    write(clean_env, base())
    config, path = resolve_config(Settings(_env_file=None))
    assert path == "config.yaml"
    assert [m.name for m in config.models] == ["mom"]


def test_resolve_falls_back_to_demo(clean_env: Path) -> None:
    config, path = resolve_config(Settings(_env_file=None))
    assert path is None
    assert [m.name for m in config.models] == ["mom", "mom-thinking"]


def test_missing_mom_config_is_an_error_not_the_demo(clean_env: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as info:
        resolve_config(Settings(mom_config=str(missing), _env_file=None))
    assert str(info.value) == f"{missing}: file not found"


def test_invalid_config_yaml_in_cwd_is_an_error(clean_env: Path) -> None:
    raw = base()
    mom(raw).pop("concluding_llm")
    write(clean_env, raw)
    with pytest.raises(ConfigError) as info:
        resolve_config(Settings(_env_file=None))
    assert str(info.value) == "config.yaml: models[0] (name 'mom'): field 'concluding_llm': Field required"


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_check_config_bad_file(clean_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = base()
    claude(raw)["tempreature"] = 0.3
    path = write(tmp_path, raw)
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: llm_definitions[1] (name 'claude'): field 'tempreature': unknown field" in err.splitlines()


def test_cli_check_config_missing_file(clean_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.yaml"
    assert main(["check-config", str(path)]) == 1
    assert f"{path}: file not found" in capsys.readouterr().err


def test_cli_check_config_good_file(clean_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, base())
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.strip() == f"{path}: OK: 1 MoM model(s) (mom), 2 LLM(s)"


def test_cli_check_config_without_path_uses_demo(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the built-in demo config (no config.yaml found): OK: 2 MoM model(s) (mom, mom-thinking)")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"quorum": 4}, "field 'quorum': 4 is more than the 3 LLMs to query"),
        ({"min_successful": 5}, "field 'min_successful': 5 is more than the 3 LLMs to query"),
        ({"quorum": 1, "min_successful": 2}, "field 'quorum': 1 is less than min_successful"),
        ({"member_deadline_ms": 0}, "field 'member_deadline_ms'"),
        ({"min_successful": 0}, "field 'min_successful'"),
        ({"concluding_fallbacks": ["zz"]}, "field 'concluding_fallbacks': unknown LLM 'zz'"),
        ({"concluding_fallbacks": ["a"]}, "field 'concluding_fallbacks': an LLM is listed twice"),
        ({"concluding_fallbacks": ["b", "b"]}, "field 'concluding_fallbacks': an LLM is listed twice"),
    ],
)
def test_panel_rules_are_checked(rules: dict[str, Any], message: str) -> None:
    raw = {
        "llm_definitions": [{"name": n, "model": f"openai/{n}"} for n in ("a", "b", "c")],
        "models": [{"name": "mom", "llms_to_query": ["a", "b", "c"], "concluding_llm": "a", **rules}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "config.yaml")
    assert f"config.yaml: models[0] (name 'mom'): {message}" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("local", "sometimes", "valid boolean"),
        ("system_prompt", "", "at least 1 character"),
        ("system_prompt", ["a"], "valid string"),
    ],
)
def test_local_and_system_prompt_are_checked(tmp_path: Path, field: str, value: Any, says: str) -> None:
    path, message = problem(tmp_path, lambda raw: claude(raw).update({field: value}))
    assert message.startswith(f"{path}: llm_definitions[1] (name 'claude'): field '{field}': ")
    assert says in message


def test_local_and_system_prompt_load(tmp_path: Path) -> None:
    raw = base()
    claude(raw).update(local=True, system_prompt="You are the skeptic.")
    config = load_config(write(tmp_path, raw))
    claude_llm, gpt = config.llm("claude"), config.llm("gpt")
    assert (claude_llm.is_local, claude_llm.system_prompt) == (True, "You are the skeptic.")
    assert (gpt.is_local, gpt.local, gpt.system_prompt) == (False, None, None)


def test_config_templates_local_examples_load_and_are_local() -> None:
    """The template's commented llama.cpp, Ollama and vLLM entries, uncommented, are valid and local."""
    template = ROOT / "config.yaml_template"
    if not template.is_file():
        pytest.skip(f"{template} is absent")
    text = template.read_text(encoding="utf-8")
    section = text[text.index("# --- Local models") : text.index("prompts\n# Optional section")]
    entries = [line[4:] for line in section.splitlines() if line.startswith(("  # - ", "  #   "))]
    raw = base()
    raw["llm_definitions"] += yaml.safe_load("\n".join(entries))
    config = parse_config(raw, "template")
    local = {d.name: d for d in config.llm_definitions if d.is_local}
    assert sorted(local) == ["llama-cpp", "llama-ollama", "vllm-qwen"]
    assert local["llama-cpp"].system_prompt and local["vllm-qwen"].pricing is not None
    assert not config.llm("compatible").is_local
