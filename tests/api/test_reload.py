"""Config reload without a restart, through the live service: `POST /admin/reload` (behind ADMIN_TOKEN), SIGHUP sent
to the `mom-service serve` process, and a change of the file with MOM_CONFIG_WATCH=true. The config file is the one
`start_service` wrote in the service's working directory (`config.yaml`), rewritten here.

The reloadable service runs circuit breakers that open on one failure and stay open (a long cool-down); the LLMs of
the breaker test are its own (`rl-x`, `rl-y`), so no other test sees their circuits.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
import yaml
from openai import OpenAI

from tests.api.test_metrics import scrape
from tests.conftest import TOKEN, Service, StartService, answer_of, llm, wait_until
from tests.fake_upstream import FakeUpstream

ADMIN = "admin-token-0123456789abcdef"
LLMS = ("rl-a", "rl-b", "rl-c", "rl-x", "rl-y", "rl-judge")


def config(fake: FakeUpstream, models: dict[str, list[str]], **changed: dict[str, Any]) -> dict[str, Any]:
    """The test LLMs (`changed`: extra fields of a definition), the MoM models `name: members`, judged by rl-judge."""
    return {
        "llm_definitions": [llm(name, fake, retries=0, **changed.get(name, {})) for name in LLMS],
        "models": [
            {"name": name, "llms_to_query": members, "concluding_llm": "rl-judge"} for name, members in models.items()
        ],
    }


V1 = {"rl-mom": ["rl-a", "rl-b"]}


@pytest.fixture(scope="module")
def reloadable(fake_server: FakeUpstream, start_service: StartService) -> Service:
    env = {"ADMIN_TOKEN": ADMIN, "MOM_CIRCUIT_FAILURES": "1", "MOM_CIRCUIT_COOLDOWN_SECONDS": "600"}
    return start_service(config(fake_server, V1), env)


def write(service: Service, content: dict[str, Any] | str) -> None:
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    (service.workdir / "config.yaml").write_text(text)


def reload(service: Service, token: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{service.url}/admin/reload", headers=headers, timeout=30)


def reloaded(service: Service, content: dict[str, Any]) -> dict[str, Any]:
    """Write the config and reload it through the admin API: its 200 body."""
    write(service, content)
    response = reload(service)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def model_ids(service: Service) -> list[str]:
    with OpenAI(base_url=service.base_url, api_key=TOKEN, max_retries=0) as client:
        return [model.id for model in client.models.list()]


def config_health(service: Service) -> dict[str, Any]:
    response = httpx.get(f"{service.url}/health/detailed", headers=service.headers(), timeout=30)
    assert response.status_code in (200, 503), response.text
    component: dict[str, Any] = response.json()["components"]["config"]
    return component


def members(body: dict[str, Any]) -> list[str]:
    return sorted(m["name"] for m in body["mom"]["members"])


def asked(fake: FakeUpstream, marker: str) -> list[str]:
    """The LLMs the fake was asked, for the requests whose messages hold `marker`."""
    return sorted(e["model"] for e in fake.log() if marker in orjson.dumps(e["body"]).decode())


def audit_rows(service: Service) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{service.workdir / 'data' / 'mom.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT actor, action, details FROM mom_audit ORDER BY created_ms").fetchall()
    return [{"who": who, "action": action, **orjson.loads(detail)} for who, action, detail in rows]


# ---------------------------------------------------------------------------------------------- the admin API


def test_admin_reload_needs_the_admin_token(reloadable: Service, fake: FakeUpstream) -> None:
    for token in (None, TOKEN, "wrong-admin-token"):  # none, the API token (not an admin token), a wrong one
        response = reload(reloadable, token)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
    write(reloadable, config(fake, V1))
    response = reload(reloadable)
    assert response.status_code == 200, response.text
    assert response.json()["status"] in ("reloaded", "unchanged")
    rows = audit_rows(reloadable)
    assert rows and rows[-1]["action"] == "config.reload" and rows[-1]["source"] == "admin"
    assert rows[-1]["who"].startswith("admin:") and ADMIN not in str(rows)  # who, never the token


def test_new_model_served_after_admin_reload(reloadable: Service, fake: FakeUpstream) -> None:
    reloaded(reloadable, config(fake, V1))
    assert "rl-new" not in model_ids(reloadable)
    before = config_health(reloadable)
    metrics_before = scrape(reloadable).value("mom_config_reloads_total", result="reloaded")

    body = reloaded(reloadable, config(fake, V1 | {"rl-new": ["rl-c"]}))
    assert body["status"] == "reloaded" and body["file"] == "config.yaml"
    assert body["models"] == {"added": ["rl-new"], "removed": [], "changed": []}
    assert body["llms"] == {"added": [], "removed": [], "changed": []}
    assert body["previous_hash"] == before["hash"] and body["hash"] != before["hash"]
    assert "rl-new" in model_ids(reloadable)
    answer = reloadable.chat("rl-new", [{"role": "user", "content": "Q-NEW-MODEL"}])
    assert answer.status_code == 200, answer.text
    assert members(answer.json()) == ["rl-c"] and asked(fake, "Q-NEW-MODEL") == ["rl-c", "rl-judge"]

    after = config_health(reloadable)
    assert after["file"] == "config.yaml" and after["hash"] == body["hash"] and after["last_error"] is None
    assert after["loaded_at"] == body["loaded_at"] != before["loaded_at"]
    assert after["reloads"] == before["reloads"] + 1 and "rl-new" in after["mom_models"]
    assert scrape(reloadable).value("mom_config_reloads_total", result="reloaded") == metrics_before + 1

    again = reload(reloadable).json()  # the same bytes: nothing to do
    assert again["status"] == "unchanged" and again["hash"] == body["hash"]
    assert config_health(reloadable)["loaded_at"] == after["loaded_at"]


def test_invalid_file_refused_and_old_config_kept(reloadable: Service, fake: FakeUpstream) -> None:
    served = reloaded(reloadable, config(fake, V1 | {"rl-kept": ["rl-a"]}))
    broken = config(fake, V1 | {"rl-broken": ["nope"]})
    for content, problem in ((broken, "unknown LLM 'nope'"), ("models: [oops", "invalid YAML at line")):
        write(reloadable, content)
        response = reload(reloadable)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_config" and error["type"] == "invalid_request_error"
        assert "running config is kept" in error["message"] and problem in error["message"]
        assert "config.yaml" in error["message"]
    ids = model_ids(reloadable)
    assert "rl-kept" in ids and "rl-broken" not in ids
    answer = reloadable.chat("rl-kept", [{"role": "user", "content": "Q-KEPT"}])
    assert answer.status_code == 200 and members(answer.json()) == ["rl-a"]
    health = config_health(reloadable)
    assert health["hash"] == served["hash"] and health["status"] == "degraded"
    assert "invalid YAML" in health["last_error"]
    refused = audit_rows(reloadable)[-1]
    assert refused["status"] == "refused" and "invalid YAML" in refused["error"]
    assert scrape(reloadable).value("mom_config_reloads_total", result="refused") >= 2

    write(reloadable, config(fake, V1 | {"rl-kept": ["rl-a"]}))  # the file holds what runs again
    assert reload(reloadable).json()["status"] == "unchanged"
    assert config_health(reloadable)["last_error"] is None


def test_sighup_reloads_and_refuses_an_invalid_file(reloadable: Service, fake: FakeUpstream) -> None:
    assert reloadable.process is not None
    write(reloadable, config(fake, V1 | {"rl-hup": ["rl-b"]}))
    reloadable.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "rl-hup" in model_ids(reloadable))
    wait_until(lambda: any(r["who"] == "signal:SIGHUP" for r in audit_rows(reloadable)))

    write(reloadable, "llm_definitions: []\nmodels: []\n")
    refusals = reloadable.log().count("Config reload (sighup) refused")
    reloadable.process.send_signal(signal.SIGHUP)
    wait_until(lambda: reloadable.log().count("Config reload (sighup) refused") > refusals)
    assert reloadable.process.poll() is None  # SIGHUP reloads: it does not end the process
    assert "llm_definitions" in reloadable.log().rsplit("Config reload (sighup) refused", 1)[1]  # the problem, named
    assert "rl-hup" in model_ids(reloadable)
    assert reloadable.chat("rl-hup").status_code == 200


# ------------------------------------------------------------------------------------- requests in flight


def stream_answer(service: Service, model: str, question: str) -> dict[str, Any]:
    """A streamed chat answer read to its end: its last chunk (the `mom` breakdown) with the joined content."""
    body = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},  # the last chunk carries the breakdown
        "messages": [{"role": "user", "content": question}],
    }
    response = httpx.post(f"{service.base_url}/chat/completions", headers=service.headers(), json=body, timeout=60)
    assert response.status_code == 200, response.text
    last, content = answer_of(response, stream=True)
    return last | {"content": content}


def test_stream_started_before_reload_finishes_on_the_old_panel(reloadable: Service, fake: FakeUpstream) -> None:
    reloaded(reloadable, config(fake, V1))
    fake.configure({"rl-a": {"gate": "old-panel"}})  # rl-a holds the stream in flight until the gate opens
    with ThreadPoolExecutor(1) as pool:
        old = pool.submit(stream_answer, reloadable, "rl-mom", "Q-BEFORE-RELOAD")
        fake.wait_for(lambda log: sum("Q-BEFORE-RELOAD" in orjson.dumps(e["body"]).decode() for e in log) == 2)

        body = reloaded(reloadable, config(fake, {"rl-mom": ["rl-c"]}))
        assert body["models"]["changed"] == ["rl-mom"]
        new = reloadable.chat("rl-mom", [{"role": "user", "content": "Q-AFTER-RELOAD"}])
        assert new.status_code == 200 and members(new.json()) == ["rl-c"]
        assert not old.done()  # still held by rl-a

        fake.open_gate("old-panel")
        finished = old.result(timeout=60)
    assert members(finished) == ["rl-a", "rl-b"] and finished["content"]
    assert asked(fake, "Q-BEFORE-RELOAD") == ["rl-a", "rl-b", "rl-judge"]
    assert asked(fake, "Q-AFTER-RELOAD") == ["rl-c", "rl-judge"]


def test_changed_llm_circuit_reset_unchanged_kept(reloadable: Service, fake: FakeUpstream) -> None:
    panel = {"rl-cb": ["rl-a", "rl-x", "rl-y"]}
    reloaded(reloadable, config(fake, panel, **{"rl-x": {"timeout": 60}}))
    fake.configure({"rl-x": {"status": 500}, "rl-y": {"status": 500}})
    assert reloadable.chat("rl-cb").status_code == 200  # rl-a answers; one failure opens rl-x's and rl-y's circuits
    health = httpx.get(f"{reloadable.url}/health/detailed", headers=reloadable.headers(), timeout=30).json()
    assert [health["components"][f"llm:{n}"]["circuit"]["state"] for n in ("rl-x", "rl-y")] == ["open", "open"]

    body = reloaded(reloadable, config(fake, panel, **{"rl-x": {"timeout": 30}}))  # rl-x's definition changed
    assert body["llms"]["changed"] == ["rl-x"] and body["models"]["changed"] == ["rl-cb"]
    components = httpx.get(f"{reloadable.url}/health/detailed", headers=reloadable.headers()).json()["components"]
    assert components["llm:rl-x"]["circuit"]["state"] == "closed"
    assert components["llm:rl-y"]["circuit"]["state"] == "open"

    fake.configure({"rl-x": {}, "rl-y": {}})  # both answer now: only rl-x is asked
    answer = reloadable.chat("rl-cb", [{"role": "user", "content": "Q-CIRCUITS"}])
    assert answer.status_code == 200, answer.text
    status = {m["name"]: (m["status"], m.get("reason")) for m in answer.json()["mom"]["members"]}
    assert status["rl-x"] == ("ok", None) and status["rl-y"] == ("skipped", "circuit_open")
    assert asked(fake, "Q-CIRCUITS") == ["rl-a", "rl-judge", "rl-x"]


def test_reload_under_load_loses_no_request(reloadable: Service, fake: FakeUpstream) -> None:
    panels = [{"rl-mom": ["rl-a", "rl-b"]}, {"rl-mom": ["rl-b", "rl-c"]}]
    reloaded(reloadable, config(fake, panels[0]))
    fake.configure({name: {"ttft_ms": 150, "token_delay_ms": 5} for name in ("rl-a", "rl-b", "rl-c")})
    rounds, per_round = 6, 8
    lock = threading.Lock()
    statuses: list[int] = []

    def ask(number: int) -> frozenset[str]:
        question = [{"role": "user", "content": f"Q-LOAD-{number}"}]
        if number % 2:
            body = stream_answer(reloadable, "rl-mom", f"Q-LOAD-{number}")
            status = 200
        else:
            response = reloadable.chat("rl-mom", question)
            status, body = response.status_code, response.json()
        with lock:
            statuses.append(status)
        return frozenset(members(body))

    with ThreadPoolExecutor(per_round) as pool:
        answers: list[Future[frozenset[str]]] = []
        for round_number in range(rounds):
            seen = len(fake.log())
            answers += [pool.submit(ask, round_number * per_round + i) for i in range(per_round)]
            fake.wait_for(lambda log, seen=seen: len(log) > seen)  # this round's requests have reached the panel
            body = reloaded(reloadable, config(fake, panels[(round_number + 1) % 2]))
            assert body["status"] == "reloaded"
        results = [answer.result(timeout=60) for answer in answers]
    assert statuses == [200] * rounds * per_round
    assert set(results) <= {frozenset(panel["rl-mom"]) for panel in panels}  # one config each, never a mix


# ------------------------------------------------------------------------------------------ the file watch


@pytest.fixture(scope="module")
def watched(start_service: StartService) -> Service:
    """MOM_CONFIG_WATCH=true, no ADMIN_TOKEN (the admin API is off), and no config.yaml yet: the demo config runs,
    and the watch waits for ./config.yaml."""
    return start_service(None, {"MOM_CONFIG_WATCH": "true"})


def test_admin_api_off_without_admin_token(watched: Service) -> None:
    for token in (None, TOKEN, ADMIN):
        response = reload(watched, token)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "admin_disabled"


def test_file_change_reloads_when_watched(watched: Service, fake: FakeUpstream) -> None:
    before = config_health(watched)
    assert before["demo"] is True and before["file"] is None and before["hash"] is None
    write(watched, config(fake, V1 | {"rl-watched": ["rl-a"]}))  # the file appears: it replaces the demo
    wait_until(lambda: "rl-watched" in model_ids(watched))
    after = config_health(watched)
    assert after["demo"] is False and after["file"] == "config.yaml" and after["hash"] is not None
    assert after["reloads"] == before["reloads"] + 1 and after["loaded_at"] != before["loaded_at"]
    assert "mom" not in model_ids(watched)  # the demo's models are gone

    write(watched, "models:\n  - name: rl-half-writ")  # caught half written: refused, the running config kept
    wait_until(lambda: "Config reload (watch) refused" in watched.log())
    assert config_health(watched)["hash"] == after["hash"]
    assert watched.chat("rl-watched").status_code == 200

    write(watched, config(fake, V1 | {"rl-watched": ["rl-a"], "rl-watched-too": ["rl-b"]}))  # the next change
    wait_until(lambda: "rl-watched-too" in model_ids(watched))
    assert config_health(watched)["last_error"] is None
