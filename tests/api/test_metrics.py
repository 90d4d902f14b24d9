"""Prometheus metrics at `/metrics`: counters move by exactly what the requests did, labels stay bounded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from mom_service.config import parse_config
from mom_service.engine.events import Breakdown, CallReport, RequestOutcome, Usage
from mom_service.observability.metrics import Metrics
from tests.api.test_images import image_question
from tests.conftest import Service, StartService, panel_config, wait_until
from tests.fake_upstream import FakeUpstream

QUESTION = [{"role": "user", "content": "How many legs does a spider have?"}]
MEMBERS = ("alpha", "beta", "gamma")
LLMS = (*MEMBERS, "judge")
TOKEN_KINDS = {"prompt": "prompt_tokens", "completion": "completion_tokens"}

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One scrape of `/metrics`: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; a series not exposed yet counts as 0."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def label_values(self) -> set[str]:
        return {value for _, labels in self.samples for _, value in labels}


def scrape(service: Service, headers: dict[str, str] | None = None) -> Scrape:
    response = httpx.get(f"{service.url}/metrics", headers=service.headers() if headers is None else headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return Scrape(response.text)


def grew(before: Scrape, after: Scrape) -> Callable[..., float]:
    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    return delta


@pytest.fixture(scope="module")
def metered(fake_server: FakeUpstream, start_service: StartService) -> Service:
    """A service of its own: no other test's requests move its counters."""
    return start_service(panel_config(fake_server))


def test_counters_move_by_exactly_what_the_requests_did(metered: Service, fake: FakeUpstream) -> None:
    fake.configure({"alpha": {"reasoning_tokens": 7, "cached_tokens": 3, "prompt_tokens": 40}})
    before = scrape(metered)
    answers = []
    for i in range(3):
        response = metered.chat(messages=[{"role": "user", "content": f"Question number {i}?"}])
        assert response.status_code == 200
        answers.append(response.json())
    streamed = httpx.post(
        f"{metered.base_url}/chat/completions",
        headers=metered.headers(),
        json={"model": "mom", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}},
        timeout=30,
    )
    assert streamed.status_code == 200
    usage_chunk = [f for f in streamed.text.split("\n\n") if '"mom"' in f][-1]
    answers.append(httpx.Response(200, content=usage_chunk.removeprefix("data: ")).json())
    ok = len(answers)
    fake.configure({name: {"status": 500} for name in MEMBERS})
    failed = metered.chat(messages=QUESTION)
    assert failed.status_code == 502
    after = scrape(metered)
    delta = grew(before, after)

    assert delta("mom_requests_total", model="mom", surface="chat", outcome="ok") == ok
    assert delta("mom_requests_total", model="mom", surface="chat", outcome="error") == 1
    assert delta("mom_requests_total", model="mom", surface="chat", outcome="cancelled") == 0
    assert delta("mom_request_duration_seconds_count", model="mom") == ok + 1
    assert delta("mom_time_to_first_token_seconds_count", model="mom") == ok  # the 502 never had a first token
    assert delta("mom_cache_total", result="miss") == ok + 1
    assert delta("mom_cache_total", result="hit") == 0
    for name in MEMBERS:
        assert delta("mom_upstream_calls_total", llm=name, role="member", stage="answer", status="ok") == ok
        assert delta("mom_upstream_calls_total", llm=name, role="member", stage="answer", status="error") == 1
        assert delta("mom_upstream_call_duration_seconds_count", llm=name, role="member") == ok + 1
    assert delta("mom_upstream_calls_total", llm="judge", role="concluding", stage="conclude", status="ok") == ok
    assert delta("mom_upstream_calls_total", llm="judge", role="concluding", stage="conclude", status="skipped") == 1
    assert delta("mom_upstream_call_duration_seconds_count", llm="judge", role="concluding") == ok

    def reports(llm: str) -> list[dict[str, Any]]:
        found = []
        for answer in answers:
            calls = [*answer["mom"]["members"], answer["mom"]["concluding"]]
            found += [c for c in calls if c["name"] == llm]
        return found

    for llm in LLMS:
        calls = reports(llm)
        assert len(calls) == ok
        for kind, field in TOKEN_KINDS.items():
            assert delta("mom_tokens_total", llm=llm, kind=kind) == sum(c["usage"][field] for c in calls)
        reasoning = sum(c["usage"]["completion_tokens_details"]["reasoning_tokens"] for c in calls)
        cached = sum(c["usage"]["prompt_tokens_details"]["cached_tokens"] for c in calls)
        assert delta("mom_tokens_total", llm=llm, kind="reasoning") == reasoning
        assert delta("mom_tokens_total", llm=llm, kind="cached") == cached
        assert delta("mom_cost_usd_total", llm=llm) == pytest.approx(sum(c["cost"] for c in calls), abs=1e-12)
        assert delta("mom_unpriced_calls_total", llm=llm) == 0
    assert delta("mom_tokens_total", llm="alpha", kind="reasoning") == 7 * ok
    assert delta("mom_tokens_total", llm="alpha", kind="cached") == 3 * ok
    # the totals agree with what the answers said
    assert sum(delta("mom_tokens_total", llm=llm, kind="prompt") for llm in LLMS) == sum(
        a["usage"]["prompt_tokens"] for a in answers
    )
    assert sum(delta("mom_cost_usd_total", llm=llm) for llm in LLMS) == pytest.approx(
        sum(a["usage"]["cost"] for a in answers), abs=1e-12
    )


def test_skipped_members_are_counted_as_skipped(metered: Service, fake: FakeUpstream) -> None:
    before = scrape(metered)
    response = metered.chat(messages=image_question())
    assert response.status_code == 200
    delta = grew(before, scrape(metered))
    assert delta("mom_upstream_calls_total", llm="alpha", role="member", stage="answer", status="ok") == 1
    for name in ("beta", "gamma"):
        assert delta("mom_upstream_calls_total", llm=name, role="member", stage="answer", status="skipped") == 1
        assert delta("mom_upstream_calls_total", llm=name, role="member", stage="answer", status="ok") == 0
        assert delta("mom_upstream_call_duration_seconds_count", llm=name, role="member") == 0
        assert delta("mom_tokens_total", llm=name, kind="prompt") == 0


def test_unpriced_calls_are_counted_not_costed(metered: Service, fake: FakeUpstream) -> None:
    fake.configure({"sloth": {"text": "Slow but sure."}})
    before = scrape(metered)
    response = metered.chat(model="mom-slow-member", messages=QUESTION)
    assert response.status_code == 200
    assert "sloth" in response.json()["mom"]["unpriced"]
    delta = grew(before, scrape(metered))
    assert delta("mom_unpriced_calls_total", llm="sloth") == 1
    assert delta("mom_cost_usd_total", llm="sloth") == 0
    assert delta("mom_tokens_total", llm="sloth", kind="prompt") > 0
    assert delta("mom_requests_total", model="mom-slow-member", surface="chat", outcome="ok") == 1


def test_labels_are_only_configured_names(metered: Service, fake: FakeUpstream) -> None:
    response = metered.chat(model="no-such-model-xyz", messages=QUESTION)
    assert response.status_code == 404
    after = scrape(metered)
    assert "no-such-model-xyz" not in after.label_values()
    config = panel_config(fake)
    allowed = (
        {m["name"] for m in config["models"]}
        | {d["name"] for d in config["llm_definitions"]}
        | {"ok", "error", "cancelled", "skipped", "member", "concluding", "hit", "miss"}
        | {"answer", "conclude"}  # stages (the default strategy's)
        | {"prompt", "completion", "reasoning", "cached"}
        | {"closed", "open", "half_open"}  # circuit breaker states
        | {"chat", "messages", "responses", "mcp", "eval"}  # surfaces
        | {"reloaded", "unchanged", "refused"}  # config reloads' results
    )
    bucket_bounds = {value for (name, labels) in after.samples for key, value in labels if key == "le"}
    assert after.label_values() - bucket_bounds <= allowed
    # series exist from the start, at 0, for every configured model
    assert (
        "mom_requests_total",
        frozenset({("model", "mom-blind"), ("surface", "chat"), ("outcome", "ok")}),
    ) in after.samples


def test_histograms_and_types(metered: Service, fake: FakeUpstream) -> None:
    assert metered.chat(messages=QUESTION).status_code == 200
    after = scrape(metered)
    assert after.types["mom_requests"] == "counter"
    assert after.types["mom_request_duration_seconds"] == "histogram"
    assert after.types["mom_time_to_first_token_seconds"] == "histogram"
    assert after.types["mom_upstream_call_duration_seconds"] == "histogram"
    assert after.types["mom_requests_in_flight"] == "gauge"
    assert after.types["mom_usage_queue_depth"] == "gauge"
    assert after.types["mom_usage_records_dropped"] == "counter"
    count = after.value("mom_request_duration_seconds_count", model="mom")
    assert count >= 1
    assert after.value("mom_request_duration_seconds_bucket", model="mom", le="+Inf") == count
    assert after.value("mom_request_duration_seconds_sum", model="mom") > 0


def test_metrics_need_the_token(metered: Service) -> None:
    for headers in ({}, metered.headers("wrong-token-0000")):
        response = httpx.get(f"{metered.url}/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert "mom_requests_total" not in response.text


def test_metrics_public_needs_no_token(fake_server: FakeUpstream, start_service: StartService) -> None:
    public = start_service(panel_config(fake_server), {"METRICS_PUBLIC": "true"})
    assert scrape(public, headers={}).types["mom_requests_in_flight"] == "gauge"
    # the rest of the API stays closed
    assert httpx.get(f"{public.base_url}/models").status_code == 401


def _hold(service: Service, stream: bool, leave: threading.Event) -> None:
    """Send a chat request over a raw connection, keep it open until `leave` is set, then close it."""
    body = orjson.dumps({"model": "mom", "messages": QUESTION, "stream": stream})
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: {service.headers()['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(request)
        leave.wait(30)


def test_in_flight_gauge_follows_requests_being_answered(metered: Service, fake: FakeUpstream) -> None:
    fake.configure({name: {"hang": True} for name in MEMBERS})
    before = scrape(metered)
    assert before.value("mom_requests_in_flight") == 0
    leave = threading.Event()
    threads = [threading.Thread(target=_hold, args=(metered, stream, leave)) for stream in (False, True, False)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: scrape(metered).value("mom_requests_in_flight") == 3)
        fake.wait_for(lambda log: len(log) == 9)  # every member of the three requests is hanging
        assert scrape(metered).value("mom_requests_in_flight") == 3
    finally:
        leave.set()
        for thread in threads:
            thread.join(10)
    wait_until(lambda: scrape(metered).value("mom_requests_in_flight") == 0)
    delta = grew(before, scrape(metered))
    assert delta("mom_requests_total", model="mom", surface="chat", outcome="cancelled") == 3
    for name in MEMBERS:
        assert delta("mom_upstream_calls_total", llm=name, role="member", stage="answer", status="cancelled") == 3


def test_usage_queue_depth_and_drops_are_read_from_the_writer(
    fake: FakeUpstream, start_service: StartService, tmp_path: Path
) -> None:
    # a database that cannot open (its path is a folder): the service starts anyway and keeps the records queued;
    # one fits the queue
    (tmp_path / "folder").mkdir()
    unusable = f"sqlite+aiosqlite:///{tmp_path / 'folder'}"
    service = start_service(panel_config(fake), {"DATABASE_URL": unusable, "MOM_USAGE_QUEUE_SIZE": "1"})
    first = scrape(service)
    assert first.value("mom_usage_queue_depth") == 0
    assert first.value("mom_usage_records_dropped_total") == 0
    sent = 6
    threads = [threading.Thread(target=service.chat, kwargs={"messages": QUESTION}) for _ in range(sent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    after = scrape(service)
    depth = after.value("mom_usage_queue_depth")
    dropped = after.value("mom_usage_records_dropped_total")
    assert after.value("mom_requests_total", model="mom", surface="chat", outcome="ok") == sent
    assert depth >= 1 and dropped >= 1
    assert depth + dropped == sent  # every record is either still waiting or counted as dropped
    # the database becomes usable: the queue drains (and the service can shut down without waiting on it)
    (tmp_path / "folder").rmdir()
    wait_until(lambda: scrape(service).value("mom_usage_queue_depth") == 0, timeout=20)
    assert scrape(service).value("mom_usage_records_dropped_total") == dropped


# ------------------------------------------------------------------ the recorder itself, on outcomes made by hand


def _outcome(model: str, names: tuple[str, ...], *, cache: str = "miss") -> RequestOutcome:
    usage = Usage(prompt_tokens=10, completion_tokens=5, reasoning_tokens=2, cached_tokens=1)
    members = [
        CallReport(name=n, model=f"openai/{n}", usage=usage, cost=Decimal("0.001"), latency_ms=5.0, cached=True)
        for n in names
    ]
    concluding = CallReport(name="judge", model="openai/judge", role="concluding", usage=usage, latency_ms=5.0)
    breakdown = Breakdown(members=members, concluding=concluding, cache=cache)  # type: ignore[arg-type]
    return RequestOutcome(
        request_id="r1",
        mom_model=model,
        stream=False,
        status="ok",
        error_code=None,
        started_at=time.time(),
        latency_ms=12.0,
        ttft_ms=None,
        breakdown=breakdown,
    )


def test_a_cache_hit_counts_the_request_and_no_upstream_call(fake_server: FakeUpstream) -> None:
    metrics = Metrics(parse_config(panel_config(fake_server), "test"))
    metrics.record(_outcome("mom", MEMBERS, cache="hit"))
    scraped = Scrape(metrics.exposition().decode())
    assert scraped.value("mom_requests_total", model="mom", surface="chat", outcome="ok") == 1
    assert scraped.value("mom_cache_total", result="hit") == 1
    assert scraped.value("mom_time_to_first_token_seconds_count", model="mom") == 0
    for llm in LLMS:
        assert (
            sum(
                v
                for (name, labels), v in scraped.samples.items()
                if name == "mom_upstream_calls_total" and ("llm", llm) in labels
            )
            == 0
        )
        assert scraped.value("mom_tokens_total", llm=llm, kind="prompt") == 0


def test_names_outside_the_config_are_one_label(fake_server: FakeUpstream) -> None:
    metrics = Metrics(parse_config(panel_config(fake_server), "test"))
    metrics.record(_outcome("not-configured", ("rogue",)))
    scraped = Scrape(metrics.exposition().decode())
    assert scraped.value("mom_requests_total", model="other", surface="chat", outcome="ok") == 1
    member = {"llm": "other", "role": "member", "stage": "answer"}
    assert scraped.value("mom_upstream_calls_total", **member, status="ok") == 0  # cached
    assert scraped.value("mom_upstream_calls_total", llm="judge", role="concluding", stage="conclude", status="ok") == 1
    assert scraped.value("mom_unpriced_calls_total", llm="judge") == 1
    assert not {"not-configured", "rogue"} & scraped.label_values()


def test_each_app_has_its_own_registry(fake_server: FakeUpstream) -> None:
    config = parse_config(panel_config(fake_server), "test")
    first, second = Metrics(config), Metrics(config)
    first.record(_outcome("mom", MEMBERS))
    assert (
        Scrape(first.exposition().decode()).value("mom_requests_total", model="mom", surface="chat", outcome="ok") == 1
    )
    assert (
        Scrape(second.exposition().decode()).value("mom_requests_total", model="mom", surface="chat", outcome="ok") == 0
    )
