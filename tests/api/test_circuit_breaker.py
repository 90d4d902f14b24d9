"""Circuit breakers through the live service: after N consecutive transient failures an LLM is skipped (members
`skipped`/`circuit_open`, the concluding LLM replaced by its fallback) until the cool-down has passed and one probe
call succeeds. Attempts are read from the fake's log; the state from /health/detailed and /metrics.

The circuit state lives in each service process, so every test uses LLM names of its own (prefix `cb-`), and the
services here are this module's own: the shared ones run with the breakers off (see tests/conftest.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.api.test_metrics import Scrape, scrape
from tests.conftest import FAKE_KEY, TOKEN, CallPath, Service, StartService, answer_of, llm, wait_until
from tests.fake_upstream import FakeUpstream
from tests.openai_schema import validate

QUESTION = [{"role": "user", "content": "Is anyone listening?"}]
SDK_QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Is anyone listening?"}]
THRESHOLD = 2
LONG_COOLDOWN_S = 120  # never passes while this module runs: an open circuit stays open
SHORT_COOLDOWN_S = 3  # passes within a test: half_open, then the probe decides

TRANSIENT: dict[str, dict[str, object]] = {
    "cb-t500": {"status": 500},
    "cb-t503": {"status": 503},
    "cb-t429": {"status": 429},
    "cb-t408": {"status": 408},
    "cb-treset": {"reset_connection": True},
}
CLIENT_ERRORS = (400, 401, 404, 422)


def panel(name: str, members: list[str], concluding: str = "cb-judge", **rules: Any) -> dict[str, Any]:
    return {"name": name, "llms_to_query": members, "concluding_llm": concluding, **rules}


def circuit_env(failures: int, cooldown_s: float) -> dict[str, str]:
    return {"MOM_CIRCUIT_FAILURES": str(failures), "MOM_CIRCUIT_COOLDOWN_SECONDS": str(cooldown_s)}


@pytest.fixture(scope="module")
def tripping(fake_server: FakeUpstream, start_service: StartService, call_path: CallPath) -> Service:
    """Threshold 2, a cool-down longer than the module: once open, a circuit stays open."""
    members: dict[str, dict[str, Any]] = {  # each the member of a panel of its own beside cb-ok; how it differs
        "cb-down": {},
        "cb-stream": {},
        "cb-hang": {"timeout": 1},
        "cb-retried": {"retries": 1},
        "cb-recover": {"retries": 1},
        **{name: {} for name in TRANSIENT},
        **{f"cb-c{status}": {} for status in CLIENT_ERRORS},
    }
    others = ["cb-ok", "cb-judge", "cb-min", "cb-cj", "cb-cf", "cb-lone", "cb-lone-stream"]
    definitions = [llm(name, fake_server, **({"retries": 0, "timeout": 10} | extra)) for name, extra in members.items()]
    definitions += [llm(name, fake_server, retries=0, timeout=10) for name in others]
    models = [panel(f"{name}-panel", ["cb-ok", name]) for name in members]
    models += [
        panel("cb-min-panel", ["cb-ok", "cb-min"], min_successful=2),
        panel("cb-fallback-panel", ["cb-ok"], "cb-cj", concluding_fallbacks=["cb-cf"]),
        panel("cb-lone-panel", ["cb-ok"], "cb-lone"),
        panel("cb-lone-stream-panel", ["cb-ok"], "cb-lone-stream"),
    ]
    return start_service(
        {"llm_definitions": definitions, "models": models}, circuit_env(THRESHOLD, LONG_COOLDOWN_S) | call_path.env
    )


@pytest.fixture(scope="module")
def cycling(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """Threshold 2, a 3 s cool-down: circuits go open -> half_open -> closed (or open again) within a test."""
    names = ["cb-cycle", "cb-reopen", "cb-probe", "cb-cut", "cb-quick"]
    definitions = [llm(name, fake_server, retries=0, timeout=10) for name in ["cb-ok", "cb-judge", *names]]
    models = [panel(f"{name}-panel", ["cb-ok", name]) for name in names[:3]]
    models.append(panel("cb-quorum-panel", ["cb-quick", "cb-cut"], quorum=1))
    return start_service({"llm_definitions": definitions, "models": models}, circuit_env(THRESHOLD, SHORT_COOLDOWN_S))


@pytest.fixture(scope="module")
def defaults(fake_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """No MOM_CIRCUIT_* setting at all (start_service would turn the breakers off): the defaults, 5 and 30 s."""
    config = {
        "llm_definitions": [llm(name, fake_server, retries=0, timeout=10) for name in ("cb-ok", "cb-judge", "cb-five")],
        "models": [panel("cb-five-panel", ["cb-ok", "cb-five"])],
    }
    workdir: Path = tmp_path_factory.mktemp("service")
    service = Service(workdir, config, {"FAKE_KEY": FAKE_KEY, "API_TOKEN": TOKEN})
    assert not any(key.startswith("MOM_CIRCUIT") for key in service.env)
    service.start()
    yield service
    service.stop()


# ------------------------------------------------------------------------------------------------- helpers


def attempts(fake: FakeUpstream, model: str) -> int:
    """Upstream requests the fake has seen for `model` since this test's reset."""
    return len([e for e in fake.log() if e["model"] == model])


def member(body: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in body["mom"]["members"] if m["name"] == name)
    return found


def circuit(service: Service, name: str) -> dict[str, Any]:
    """The LLM's component in /health/detailed: its status and its `circuit`."""
    response = httpx.get(f"{service.url}/health/detailed", headers=service.headers(), timeout=30)
    assert response.status_code == 200, response.text
    component: dict[str, Any] = response.json()["components"][f"llm:{name}"]
    return component


def state(service: Service, name: str) -> str:
    found: str = circuit(service, name)["circuit"]["state"]
    return found


def gauges(scraped: Scrape, name: str) -> dict[str, float]:
    return {s: scraped.value("mom_circuit_state", llm=name, state=s) for s in ("closed", "open", "half_open")}


def opened_total(service: Service, name: str) -> float:
    return scrape(service).value("mom_circuit_opened_total", llm=name)


def ok_chat(service: Service, model: str, **extra: Any) -> dict[str, Any]:
    response = service.chat(model, messages=QUESTION, **extra)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_skipped(body: dict[str, Any], name: str) -> None:
    """`name` was not asked because its circuit is open: skipped, but counted, so the answer is degraded."""
    skipped = member(body, name)
    assert skipped["status"] == "skipped" and skipped["reason"] == "circuit_open"
    assert f"circuit open after {THRESHOLD} consecutive failures" in skipped["error"]
    assert skipped["usage"] is None and skipped["latency_ms"] is None
    mom = body["mom"]
    assert mom["asked"] == len(mom["members"]) and mom["answered"] == mom["asked"] - 1
    assert mom["degraded"] is True


def trip(service: Service, fake: FakeUpstream, model: str, name: str, behaviour: dict[str, object]) -> None:
    """Make `name` fail THRESHOLD times in a row, each failure one upstream attempt; its circuit is then open."""
    fake.configure({name: behaviour})
    for count in range(1, THRESHOLD + 1):
        body = ok_chat(service, model)
        assert member(body, name)["status"] == "error"
        assert attempts(fake, name) == count
    assert state(service, name) in ("open", "half_open")


# ---------------------------------------------------------------------------------------- opening the circuit


def test_consecutive_failures_open_the_circuit_and_the_member_is_skipped(
    tripping: Service, fake: FakeUpstream, call_path: CallPath
) -> None:
    client = openai.OpenAI(base_url=tripping.base_url, api_key=TOKEN, max_retries=0)
    fake.configure({"cb-down": {"status": 503, "error_message": "cb-down is overloaded"}})
    component = circuit(tripping, "cb-down")
    assert {k: v for k, v in component.items() if k != "latency_ms"} == {
        "status": "ok",
        "configured": "openai/cb-down",
        "client": call_path.name,
        "key": "present",
        "checked": False,
        "circuit": {"state": "closed", "consecutive_failures": 0},
    }

    first = client.chat.completions.create(model="cb-down-panel", messages=SDK_QUESTION)
    assert first.model_extra is not None
    assert member(first.model_extra, "cb-down")["status"] == "error"
    assert first.choices[0].message.content == "Answer from cb-judge."
    component = circuit(tripping, "cb-down")
    assert component["status"] == "ok"  # one failure: still closed, counting
    assert component["circuit"] == {"state": "closed", "consecutive_failures": 1}
    before = scrape(tripping)
    assert gauges(before, "cb-down") == {"closed": 1.0, "open": 0.0, "half_open": 0.0}
    assert before.value("mom_circuit_opened_total", llm="cb-down") == 0

    second = client.chat.completions.create(model="cb-down-panel", messages=SDK_QUESTION)
    assert second.model_extra is not None
    assert "cb-down is overloaded" in member(second.model_extra, "cb-down")["error"]
    assert attempts(fake, "cb-down") == THRESHOLD

    # open: three more requests, no attempt at all, each answered by the rest of the panel
    for _ in range(3):
        completion = client.chat.completions.create(model="cb-down-panel", messages=SDK_QUESTION)
        assert completion.choices[0].message.content == "Answer from cb-judge."
        assert completion.model_extra is not None
        assert_skipped(completion.model_extra, "cb-down")
    assert attempts(fake, "cb-down") == THRESHOLD
    assert attempts(fake, "cb-ok") == THRESHOLD + 3

    # the raw body is still a valid OpenAI chat completion
    response = tripping.chat("cb-down-panel", messages=QUESTION)
    body = response.json()
    validate(body, "CreateChatCompletionResponse")
    assert_skipped(body, "cb-down")
    assert "next try in" in member(body, "cb-down")["error"]
    assert attempts(fake, "cb-down") == THRESHOLD
    # the concluding LLM sees only the answers in hand: a skipped member is left out of its prompt
    judge = [e for e in fake.log() if e["model"] == "cb-judge"][-1]
    synthesis = judge["body"]["messages"][-1]["content"]
    assert 'name="cb-ok" status="ok"' in synthesis and "cb-down" not in synthesis

    component = circuit(tripping, "cb-down")
    assert component["status"] == "degraded"
    assert component["circuit"]["state"] == "open"
    assert component["circuit"]["consecutive_failures"] == THRESHOLD
    assert LONG_COOLDOWN_S - 60 < component["circuit"]["retry_in_s"] <= LONG_COOLDOWN_S
    assert circuit(tripping, "cb-ok")["status"] == "ok"
    after = scrape(tripping)
    assert after.types["mom_circuit_state"] == "gauge" and after.types["mom_circuit_opened"] == "counter"
    assert gauges(after, "cb-down") == {"closed": 0.0, "open": 1.0, "half_open": 0.0}
    assert after.value("mom_circuit_opened_total", llm="cb-down") == 1
    assert gauges(after, "cb-ok") == {"closed": 1.0, "open": 0.0, "half_open": 0.0}


@pytest.mark.parametrize("name", list(TRANSIENT))
def test_every_transient_failure_kind_counts(tripping: Service, fake: FakeUpstream, name: str) -> None:
    trip(tripping, fake, f"{name}-panel", name, TRANSIENT[name])
    assert_skipped(ok_chat(tripping, f"{name}-panel"), name)
    assert attempts(fake, name) == THRESHOLD
    assert state(tripping, name) == "open"


def test_a_skipped_member_in_a_stream(tripping: Service, fake: FakeUpstream) -> None:
    trip(tripping, fake, "cb-stream-panel", "cb-stream", {"status": 500})
    response = tripping.chat("cb-stream-panel", messages=QUESTION, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == (
        "Answer from cb-judge."
    )
    assert_skipped(chunks[-1], "cb-stream")
    assert attempts(fake, "cb-stream") == THRESHOLD


def test_a_call_counts_once_after_its_own_retries(tripping: Service, fake: FakeUpstream) -> None:
    fake.configure({"cb-retried": {"status": 502}})
    ok_chat(tripping, "cb-retried-panel")
    assert attempts(fake, "cb-retried") == 2  # retries: 1
    assert circuit(tripping, "cb-retried")["circuit"] == {"state": "closed", "consecutive_failures": 1}
    ok_chat(tripping, "cb-retried-panel")
    assert attempts(fake, "cb-retried") == 4
    assert state(tripping, "cb-retried") == "open"
    assert_skipped(ok_chat(tripping, "cb-retried-panel"), "cb-retried")
    assert attempts(fake, "cb-retried") == 4


def test_a_retry_that_succeeds_is_a_success(tripping: Service, fake: FakeUpstream) -> None:
    # every call fails once, then its retry answers: the circuit never counts a failure
    for count in range(1, THRESHOLD + 3):
        fake.configure({"cb-recover": {"status": 500, "fail_times": 1}})
        assert member(ok_chat(tripping, "cb-recover-panel"), "cb-recover")["status"] == "ok"
        assert attempts(fake, "cb-recover") == 2 * count
    assert circuit(tripping, "cb-recover")["circuit"] == {"state": "closed", "consecutive_failures": 0}


@pytest.mark.parametrize("status", CLIENT_ERRORS)
def test_client_errors_never_open_it(tripping: Service, fake: FakeUpstream, status: int, call_path: CallPath) -> None:
    name = f"cb-c{status}"
    fake.configure({name: {"status": status}})
    for _ in range(THRESHOLD + 3):
        assert member(ok_chat(tripping, f"{name}-panel"), name)["status"] == "error"
    # every request reached it (LiteLLM itself sends a 422'd request once more, without the parameters it names;
    # the lean path does not)
    twice = status == 422 and call_path.litellm
    assert attempts(fake, name) == (THRESHOLD + 3) * (2 if twice else 1)
    component = circuit(tripping, name)
    assert component["status"] == "ok"
    assert component["circuit"] == {"state": "closed", "consecutive_failures": 0}
    assert opened_total(tripping, name) == 0


def test_hangs_cut_by_the_timeout_count(tripping: Service, fake: FakeUpstream) -> None:
    fake.configure({"cb-hang": {"hang": True}})  # its timeout is 1 s
    for count in range(1, THRESHOLD + 1):
        body = ok_chat(tripping, "cb-hang-panel")
        assert member(body, "cb-hang")["reason"] == "timeout"
        assert attempts(fake, "cb-hang") == count
    assert state(tripping, "cb-hang") == "open"
    assert_skipped(ok_chat(tripping, "cb-hang-panel"), "cb-hang")  # not waiting for its timeout any more
    assert attempts(fake, "cb-hang") == THRESHOLD


def test_too_few_members_left_is_a_502_naming_the_open_circuit(tripping: Service, fake: FakeUpstream) -> None:
    fake.configure({"cb-min": {"status": 500, "error_message": "cb-min is down"}})
    for _ in range(THRESHOLD):
        response = tripping.chat("cb-min-panel", messages=QUESTION)
        assert response.status_code == 502
        assert "cb-min is down" in response.json()["error"]["message"]
    client = openai.OpenAI(base_url=tripping.base_url, api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="cb-min-panel", messages=SDK_QUESTION)
    assert info.value.status_code == 502
    assert info.value.code == "members_failed"
    body = info.value.response.json()
    validate(body, "ErrorResponse")
    message = body["error"]["message"]
    assert "1 of 2 panel members answered, 2 needed" in message
    assert f"cb-min: circuit open after {THRESHOLD} consecutive failures" in message
    assert attempts(fake, "cb-min") == THRESHOLD
    assert not [e for e in fake.log() if e["model"] == "cb-judge"]


# ------------------------------------------------------------------------------------------ the concluding LLM


def test_an_open_concluding_llm_is_skipped_for_its_fallback(tripping: Service, fake: FakeUpstream) -> None:
    fake.configure({"cb-cj": {"status": 503}, "cb-cf": {"text": "Concluded by the fallback."}})
    for _ in range(THRESHOLD):
        body = ok_chat(tripping, "cb-fallback-panel")
        (failed,) = body["mom"]["concluding_fallbacks"]
        assert failed["name"] == "cb-cj" and failed["status"] == "error"
    assert attempts(fake, "cb-cj") == THRESHOLD
    assert state(tripping, "cb-cj") == "open"

    for stream in (False, True):
        response = tripping.chat(
            "cb-fallback-panel", messages=QUESTION, stream=stream, stream_options={"include_usage": True}
        )
        assert response.status_code == 200
        body, content = answer_of(response, stream)
        if not stream:
            validate(body, "CreateChatCompletionResponse")
        assert content == "Concluded by the fallback."
        mom = body["mom"]
        assert mom["concluding"]["name"] == "cb-cf" and mom["concluding"]["status"] == "ok"
        (skipped,) = mom["concluding_fallbacks"]
        assert skipped["name"] == "cb-cj"
        assert skipped["status"] == "skipped" and skipped["reason"] == "circuit_open"
        assert "circuit open" in skipped["error"]
    assert attempts(fake, "cb-cj") == THRESHOLD  # never asked while open
    assert attempts(fake, "cb-cf") == THRESHOLD + 2


@pytest.mark.parametrize(("name", "stream"), [("cb-lone", False), ("cb-lone-stream", True)])
def test_an_open_concluding_llm_without_fallback_is_a_502(
    tripping: Service, fake: FakeUpstream, name: str, stream: bool
) -> None:
    fake.configure({name: {"status": 500, "error_message": f"{name} crashed"}})
    for _ in range(THRESHOLD):
        response = tripping.chat(f"{name}-panel", messages=QUESTION, stream=stream)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "concluding_failed"
        assert f"{name} crashed" in response.json()["error"]["message"]
    assert attempts(fake, name) == THRESHOLD
    assert state(tripping, name) == "open"
    fake.clear_log()
    response = tripping.chat(f"{name}-panel", messages=QUESTION, stream=stream)
    assert response.status_code == 502
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == "concluding_failed"
    assert f"The concluding LLM '{name}' was not asked: circuit open" in body["error"]["message"]
    assert attempts(fake, name) == 0
    assert attempts(fake, "cb-ok") == 1  # the panel was asked


# ---------------------------------------------------------------------------------- half-open and the probe


def test_open_then_half_open_then_a_probe_success_closes_it(cycling: Service, fake: FakeUpstream) -> None:
    trip(cycling, fake, "cb-cycle-panel", "cb-cycle", {"status": 500})
    component = circuit(cycling, "cb-cycle")
    assert component["status"] == "degraded"
    assert component["circuit"]["state"] == "open"  # (the cool-down has barely begun)
    assert 0 < component["circuit"]["retry_in_s"] <= SHORT_COOLDOWN_S
    assert gauges(scrape(cycling), "cb-cycle") == {"closed": 0.0, "open": 1.0, "half_open": 0.0}
    assert_skipped(ok_chat(cycling, "cb-cycle-panel"), "cb-cycle")
    assert attempts(fake, "cb-cycle") == THRESHOLD

    wait_until(lambda: state(cycling, "cb-cycle") == "half_open", timeout=SHORT_COOLDOWN_S + 10)
    component = circuit(cycling, "cb-cycle")
    assert component["status"] == "degraded"
    assert component["circuit"] == {"state": "half_open", "consecutive_failures": THRESHOLD, "retry_in_s": 0.0}
    assert gauges(scrape(cycling), "cb-cycle") == {"closed": 0.0, "open": 0.0, "half_open": 1.0}
    assert attempts(fake, "cb-cycle") == THRESHOLD  # half-open by itself calls nothing

    fake.configure({"cb-cycle": {"text": "Back again."}})
    body = ok_chat(cycling, "cb-cycle-panel")  # the probe
    assert member(body, "cb-cycle")["status"] == "ok"
    assert body["mom"]["degraded"] is False
    assert attempts(fake, "cb-cycle") == THRESHOLD + 1  # one probe
    component = circuit(cycling, "cb-cycle")
    assert component["status"] == "ok"
    assert component["circuit"] == {"state": "closed", "consecutive_failures": 0}
    scraped = scrape(cycling)
    assert gauges(scraped, "cb-cycle") == {"closed": 1.0, "open": 0.0, "half_open": 0.0}
    assert scraped.value("mom_circuit_opened_total", llm="cb-cycle") == 1
    for count in (2, 3):  # closed: every request asks it again
        assert member(ok_chat(cycling, "cb-cycle-panel"), "cb-cycle")["status"] == "ok"
        assert attempts(fake, "cb-cycle") == THRESHOLD + count


def test_a_probe_failure_reopens_it_for_another_cool_down(cycling: Service, fake: FakeUpstream) -> None:
    trip(cycling, fake, "cb-reopen-panel", "cb-reopen", {"status": 503})
    assert opened_total(cycling, "cb-reopen") == 1
    wait_until(lambda: state(cycling, "cb-reopen") == "half_open", timeout=SHORT_COOLDOWN_S + 10)

    body = ok_chat(cycling, "cb-reopen-panel")  # the probe, still failing
    assert member(body, "cb-reopen")["status"] == "error"
    assert attempts(fake, "cb-reopen") == THRESHOLD + 1
    assert opened_total(cycling, "cb-reopen") == 2
    component = circuit(cycling, "cb-reopen")
    assert component["status"] == "degraded"
    assert component["circuit"]["state"] == "open"
    assert component["circuit"]["retry_in_s"] > 0
    assert_skipped(ok_chat(cycling, "cb-reopen-panel"), "cb-reopen")  # skipped again
    assert attempts(fake, "cb-reopen") == THRESHOLD + 1

    wait_until(lambda: state(cycling, "cb-reopen") == "half_open", timeout=SHORT_COOLDOWN_S + 10)
    fake.configure({"cb-reopen": {}})
    assert member(ok_chat(cycling, "cb-reopen-panel"), "cb-reopen")["status"] == "ok"
    assert attempts(fake, "cb-reopen") == THRESHOLD + 2
    assert state(cycling, "cb-reopen") == "closed"
    assert opened_total(cycling, "cb-reopen") == 2


def test_other_requests_skip_it_while_the_one_probe_runs(cycling: Service, fake: FakeUpstream) -> None:
    trip(cycling, fake, "cb-probe-panel", "cb-probe", {"status": 500})
    wait_until(lambda: state(cycling, "cb-probe") == "half_open", timeout=SHORT_COOLDOWN_S + 10)
    fake.configure({"cb-probe": {"ttft_ms": 3000, "text": "Slow but fine."}})
    probe: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: probe.update(ok_chat(cycling, "cb-probe-panel")))
    thread.start()
    try:
        fake.wait_for(lambda log: len([e for e in log if e["model"] == "cb-probe"]) > THRESHOLD)  # the probe is in
        others = [ok_chat(cycling, "cb-probe-panel") for _ in range(2)]  # while the probe is running
        assert attempts(fake, "cb-probe") == THRESHOLD + 1
        for body in others:
            assert_skipped(body, "cb-probe")
            assert "a probe call is running" in member(body, "cb-probe")["error"]
        if thread.is_alive():
            assert state(cycling, "cb-probe") == "half_open"
    finally:
        thread.join(30)
    assert member(probe, "cb-probe")["status"] == "ok"
    assert state(cycling, "cb-probe") == "closed"
    fake.configure({"cb-probe": {}})
    assert member(ok_chat(cycling, "cb-probe-panel"), "cb-probe")["status"] == "ok"
    assert attempts(fake, "cb-probe") == THRESHOLD + 2


def test_a_probe_cut_off_by_the_quorum_decides_nothing(cycling: Service, fake: FakeUpstream) -> None:
    # cb-cut fails at once, before cb-quick answers and meets the quorum of 1: its failures count
    fake.configure({"cb-quick": {"ttft_ms": 800}})
    trip(cycling, fake, "cb-quorum-panel", "cb-cut", {"status": 500})
    wait_until(lambda: state(cycling, "cb-cut") == "half_open", timeout=SHORT_COOLDOWN_S + 10)

    fake.configure({"cb-cut": {"hang": True}, "cb-quick": {}})
    body = ok_chat(cycling, "cb-quorum-panel")  # the probe hangs, cb-quick answers: the probe is cut off
    assert member(body, "cb-cut")["status"] == "cancelled"
    assert "quorum of 1" in member(body, "cb-cut")["error"]
    fake.wait_for(lambda log: any(e["model"] == "cb-cut" and e["outcome"] == "disconnected" for e in log))
    assert state(cycling, "cb-cut") == "half_open"  # neither closed nor opened again
    assert opened_total(cycling, "cb-cut") == 1

    fake.configure({"cb-cut": {"text": "Fine now."}, "cb-quick": {"ttft_ms": 800}})
    body = ok_chat(cycling, "cb-quorum-panel")  # the next request probes again
    assert member(body, "cb-cut")["status"] == "ok"
    assert attempts(fake, "cb-cut") == THRESHOLD + 2  # the failures, the probe cut off, this probe
    assert state(cycling, "cb-cut") == "closed"


# ------------------------------------------------------------------------------------------------ defaults


def test_the_default_threshold_is_five_and_the_cool_down_thirty_seconds(defaults: Service, fake: FakeUpstream) -> None:
    fake.configure({"cb-five": {"status": 500}})
    for count in range(1, 5):
        assert member(ok_chat(defaults, "cb-five-panel"), "cb-five")["status"] == "error"
        component = circuit(defaults, "cb-five")
        assert component["status"] == "ok"
        assert component["circuit"] == {"state": "closed", "consecutive_failures": count}
    assert member(ok_chat(defaults, "cb-five-panel"), "cb-five")["status"] == "error"
    assert attempts(fake, "cb-five") == 5
    component = circuit(defaults, "cb-five")
    assert component["status"] == "degraded"
    assert component["circuit"]["state"] == "open" and component["circuit"]["consecutive_failures"] == 5
    assert 20 < component["circuit"]["retry_in_s"] <= 30
    for _ in range(3):
        skipped = member(ok_chat(defaults, "cb-five-panel"), "cb-five")
        assert skipped["status"] == "skipped" and skipped["reason"] == "circuit_open"
        assert "circuit open after 5 consecutive failures" in skipped["error"]
    assert attempts(fake, "cb-five") == 5
    assert opened_total(defaults, "cb-five") == 1


def test_zero_failures_turns_the_breakers_off(service: Service, fake: FakeUpstream) -> None:
    # the shared standard-panel service runs with MOM_CIRCUIT_FAILURES=0 (tests/conftest.py)
    fake.configure({"beta": {"status": 503}})
    for count in range(1, 7):
        body = ok_chat(service, "mom")
        assert member(body, "beta")["status"] == "error" and member(body, "beta")["reason"] != "circuit_open"
        assert attempts(fake, "beta") == 2 * count  # its `retries: 1`: every request still reaches it
    component = circuit(service, "beta")
    assert component["status"] == "ok" and "circuit" not in component
