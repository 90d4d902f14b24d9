"""The pieces of a config reload without a service: what a new config changes, the next engine (what it shares with
the one before, which circuits it keeps), the redactor learning a new key, the file's hash, and the audit table."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from mom_service.config import load_config, parse_config
from mom_service.config_changes import config_changes
from mom_service.engine.assembly import EngineOptions, build_engine, successor
from mom_service.observability.redaction import Redactor
from mom_service.providers.circuit_breaker import CircuitBreakers, Permit
from mom_service.usage.database import UsageDatabase
from mom_service.usage.schema import audit_table

KEY = "sk-reloaded-key-0123456789"


def raw(models: dict[str, list[str]], **changed: dict[str, Any]) -> dict[str, Any]:
    names = ("a", "b", "c", "judge")
    return {
        "llm_definitions": [
            {"name": n, "model": f"openai/{n}", "api_base": "http://127.0.0.1:9/v1"} | changed.get(n, {}) for n in names
        ],
        "prompt_definitions": [{"name": "p", "content": "Combine."}],
        "models": [{"name": m, "llms_to_query": ms, "concluding_llm": "judge"} for m, ms in models.items()],
    }


def test_changes_name_what_was_added_removed_and_changed() -> None:
    old = parse_config(raw({"keep": ["a"], "gone": ["b"], "via-llm": ["c"]}), "old")
    new = parse_config(raw({"keep": ["a"], "new": ["b"], "via-llm": ["c"]}, c={"timeout": 5}), "new")
    changes = config_changes(old, new)
    assert changes.models.as_dict() == {"added": ["new"], "removed": ["gone"], "changed": ["via-llm"]}
    assert changes.llms.as_dict() == {"added": [], "removed": [], "changed": ["c"]}
    assert not config_changes(old, parse_config(raw({"keep": ["a"], "gone": ["b"], "via-llm": ["c"]}), "same")).models


def test_a_changed_prompt_text_changes_its_model() -> None:
    old_raw = raw({"m": ["a"]})
    old_raw["models"][0]["concluding_prompt"] = "p"
    new_raw = yaml.safe_load(yaml.safe_dump(old_raw))
    new_raw["prompt_definitions"][0]["content"] = "Combine, briefly."
    changes = config_changes(parse_config(old_raw, "old"), parse_config(new_raw, "new"))
    assert changes.models.changed == ["m"] and not changes.llms


def test_successor_keeps_unchanged_circuits_and_shares_what_outlives_a_config() -> None:
    options = EngineOptions(env={"NEW_KEY": KEY}, redactor=Redactor(), circuit_failures=1, circuit_cooldown_s=600)
    old_config = parse_config(raw({"m": ["a", "b"]}), "old")
    first = build_engine(old_config, options)
    for name in ("a", "b"):
        first.breakers.record(Permit(name), "failure")
    new_config = parse_config(raw({"m": ["a", "b"]}, a={"timeout": 7}, b={"api_key_env": "NEW_KEY"}), "new")
    changes = config_changes(old_config, new_config)
    assert changes.llms.changed == ["a", "b"]
    second = successor(first, new_config, options, changes)
    assert second.config is new_config and first.config is old_config  # the old engine is left as it was
    assert second.breakers.view("a").state == "closed" and first.breakers.view("a").state == "open"
    assert second.active is first.active and second.flights is first.flights
    assert second.caller.pool is first.caller.pool and second.calls.background is first.calls.background
    assert options.redactor(f"failed with {KEY}") == "failed with ***"  # the new LLM's key is redacted from now on

    same = parse_config(raw({"m": ["a", "b"]}, a={"timeout": 7}, b={"api_key_env": "NEW_KEY"}), "same")
    third = successor(second, same, options, config_changes(new_config, same))
    third.breakers.record(Permit("c"), "failure")
    assert second.breakers.view("c").state == "open"  # unchanged: one circuit, shared by both engines


def test_carry_over_shares_only_the_named_circuits() -> None:
    before = CircuitBreakers(["x", "y"], failures=1)
    before.record(Permit("x"), "failure")
    before.record(Permit("y"), "failure")
    after = CircuitBreakers(["x", "y", "z"], failures=1)
    after.carry_over(before, ["x", "z"])
    assert [after.view(n).state for n in ("x", "y", "z")] == ["open", "closed", "closed"]


def test_redactor_learns_more_secrets() -> None:
    redact = Redactor(["first-secret"])
    redact.add(["second-secret", "abc"])  # too short to be a secret: never masked
    assert redact("first-secret second-secret abc") == "*** *** abc"


def test_a_config_file_carries_the_hash_of_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw({"m": ["a"]})))
    assert load_config(path).digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert parse_config(raw({"m": ["a"]}), "inline").digest is None
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(Exception, match="not UTF-8 text"):
        load_config(path)


async def test_audit_rows_and_a_database_that_does_not_answer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mom_service")
    usage = UsageDatabase(f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}")
    try:
        assert await usage.audit("admin:0123", "config.reload", {"status": "unchanged"}) is False  # no table yet
        assert "audit record of config.reload by admin:0123 not written" in caplog.text
        await usage.migrate()
        assert await usage.audit("admin:0123", "config.reload", {"status": "reloaded", "hash": "abc"}) is True
        async with usage.engine.connect() as conn:
            columns = (audit_table.c.actor, audit_table.c.action, audit_table.c.target, audit_table.c.details)
            rows = (await conn.execute(select(*columns))).all()
    finally:
        await usage.dispose()
    assert [tuple(r) for r in rows] == [("admin:0123", "config.reload", None, '{"status":"reloaded","hash":"abc"}')]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("audit: config.reload by admin:0123" in line for line in logged)
