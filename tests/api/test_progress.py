"""The progress stream (GET /v1/progress/{id}, docs/progress.md): the chat request issued by the official clients
(`with_raw_response`, for its X-MoM-* headers), the stream read as raw SSE with httpx. Event order for a normal
run, a failing member, a member cut by a quorum and strategies with stages; late subscribers (after the run, and
mid-run while a member is held at the fake's gate); the link token and the bearer token; expiry; the caps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.conftest import TOKEN, Service, StartService, llm, sse_frames, wait_until
from tests.fake_upstream import FakeUpstream

MEMBERS = ["pg-one", "pg-two", "pg-three"]
JUDGE = "pg-judge"
TEXTS = {"pg-one": "One says 4.", "pg-two": "Two says 4.", "pg-three": "Three says 4."}
ANSWER = "The panel agrees: 4, in a few pieces."
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
OTHER_TOKEN = "another-callers-token-987654"
GATE = "pg-held"
ORIGIN = "https://ui.example"


@pytest.fixture(scope="module")
def progressive(fake_server: FakeUpstream, start_service: StartService) -> Service:
    env = {"MOM_PROGRESS_MAX_SUBSCRIBERS": "2", "ALLOWED_CORS_ORIGINS": ORIGIN}
    return start_service(config(fake_server), env, token=f"{TOKEN},{OTHER_TOKEN}")


def config(fake: FakeUpstream) -> dict[str, Any]:
    panel = {"llms_to_query": MEMBERS, "concluding_llm": JUDGE}
    return {
        "llm_definitions": [llm(name, fake, retries=0, timeout=20) for name in [*MEMBERS, JUDGE]],
        "models": [
            {"name": "prog", **panel},
            {"name": "prog-think", **panel, "include_thinking_context": True},
            {"name": "prog-quorum", **panel, "quorum": 2},
            {"name": "prog-partial", **panel, "quorum": 2, "partial_answers": True},
            {"name": "prog-rank", **panel, "strategy": "rank"},
            {"name": "prog-best", **panel, "strategy": "best_of"},
            {"name": "prog-layers", **panel, "strategy": "layers"},
        ],
    }


def configure(fake: FakeUpstream, **extra: dict[str, Any]) -> None:
    """Members answer their text (and rank, when asked: A, B, C); the judge answers ANSWER (and picks B)."""
    fake.reset()
    behaviours: dict[str, dict[str, Any]] = {
        name: {"text": TEXTS[name], "ranking": ["A", "B", "C"]} for name in MEMBERS
    }
    behaviours[JUDGE] = {"text": ANSWER, "pick": "B"}
    for name, changes in extra.items():
        behaviours[name.replace("_", "-")] = behaviours[name.replace("_", "-")] | changes
    fake.configure(behaviours)


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]


def client(service: Service, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url, api_key=token, max_retries=0, timeout=30)


@contextmanager
def progress(service: Service, path: str, **headers: str) -> Iterator[Iterator[Event]]:
    """The progress stream at `path` (with its query), opened; its events as they arrive."""
    with httpx.stream("GET", service.url + path, headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield events(response)


def events(response: httpx.Response) -> Iterator[Event]:
    for frame in sse_frames(response):
        if frame.startswith(":"):  # a heartbeat
            continue
        fields = dict(line.split(": ", 1) for line in frame.split("\n"))
        yield Event(int(fields["id"]), fields["event"], orjson.loads(fields["data"]))


def read_all(service: Service, path: str, **headers: str) -> list[Event]:
    with progress(service, path, **headers) as stream:
        got = list(stream)  # the stream ends after its final event
    assert got and got[-1].kind in ("run_done", "run_failed")
    assert [e.id for e in got] == list(range(got[0].id, got[0].id + len(got)))  # numbered, none missing
    return got


def kinds(got: list[Event]) -> list[str]:
    return [e.kind for e in got]


def lifecycle(got: list[Event]) -> list[str]:
    """The kinds of a run's events but the members' deltas (members stream: how many pieces is the fake's affair)."""
    return [e.kind for e in got if e.kind != "member_delta"]


def of(got: list[Event], kind: str) -> list[Event]:
    return [e for e in got if e.kind == kind]


def ask(service: Service, model: str = "prog", **extra: Any) -> tuple[str, str, dict[str, Any], str]:
    """A whole chat answer: (its run id, its progress URL, its `mom`, its content)."""
    raw = client(service).chat.completions.with_raw_response.create(model=model, messages=QUESTION, **extra)
    completion = raw.parse()
    assert completion.model_extra is not None
    return (
        raw.headers["x-mom-request-id"],
        raw.headers["x-mom-progress-url"],
        completion.model_extra["mom"],
        completion.choices[0].message.content or "",
    )


def assert_panel(got: list[Event], stage: str = "answer") -> None:
    """Every member started before any settled, each once, with the text it answered."""
    started = [e for e in got if e.kind == "member_started" and e.data["stage"] == stage]
    done = [e for e in got if e.kind == "member_done" and e.data["stage"] == stage]
    assert sorted(e.data["name"] for e in started) == sorted(MEMBERS)
    assert sorted(e.data["name"] for e in done) == sorted(MEMBERS)
    assert max(e.id for e in started) < min(e.id for e in done)


def assert_answered(got: list[Event], mom: dict[str, Any], content: str) -> None:
    (done,) = of(got, "run_done")
    assert done.data["mom"] == mom  # the same breakdown as the answer's `mom`
    assert done.data["content"] == content == "".join(e.data["text"] for e in of(got, "concluding_delta"))
    assert kinds(got)[-1] == "run_done" and got.index(done) == len(got) - 1


# ------------------------------------------------------------------------------------------------ event order


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_normal_run_in_order(progressive: Service, fake_server: FakeUpstream, stream: bool) -> None:
    configure(fake_server)
    raw = client(progressive).chat.completions.with_raw_response.create(
        model="prog",
        messages=QUESTION,
        stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    run_id, url = raw.headers["x-mom-request-id"], raw.headers["x-mom-progress-url"]
    assert url.startswith(f"/v1/progress/{run_id}?token=")
    if stream:
        chunks = list(raw.parse())
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].model_extra is not None
        mom = chunks[-1].model_extra["mom"]
    else:
        completion = raw.parse()
        assert completion.model_extra is not None
        content, mom = completion.choices[0].message.content or "", completion.model_extra["mom"]
    assert content == ANSWER

    got = read_all(progressive, url)  # a late subscriber: the run is over, all of it comes
    order = lifecycle(got)  # the members' deltas are checked below
    assert order[:7] == ["run_started", *["member_started"] * 3, *["member_done"] * 3]
    assert order[7] == "concluding_started" and set(order[8:-1]) == {"concluding_delta"}
    assert got[0].id == 1
    for name in MEMBERS:  # each member's text as it wrote it, between its start and its end
        own = [e.kind for e in got if e.data.get("name") == name]
        assert own[0] == "member_started" and own[-1] == "member_done" and "member_delta" in own
        pieces = [e.data["text"] for e in got if e.kind == "member_delta" and e.data["name"] == name]
        assert "".join(pieces) == TEXTS[name]
    started = got[0].data
    assert started["request_id"] == run_id and started["model"] == "prog" and started["stream"] is stream
    assert started["strategy"] == "synthesize" and started["surface"] == "chat"
    assert [(m["name"], m["status"]) for m in started["members"]] == [(name, "pending") for name in MEMBERS]
    assert started["concluding"]["name"] == JUDGE
    assert_panel(got)
    for done in of(got, "member_done"):
        assert done.data["status"] == "ok" and done.data["text"] == TEXTS[done.data["name"]]
        assert done.data["usage"]["completion_tokens"] > 0 and done.data["latency_ms"] > 0
    assert of(got, "concluding_started")[0].data["concluding"]["name"] == JUDGE
    assert_answered(got, mom, content)


def test_a_failing_member_and_a_failing_panel(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server, pg_two={"status": 500})
    _, url, mom, content = ask(progressive)
    got = read_all(progressive, url)
    assert_panel(got)
    (failed,) = [e for e in of(got, "member_done") if e.data["name"] == "pg-two"]
    assert failed.data["status"] == "error" and failed.data["reason"] and failed.data["text"] == ""
    assert_answered(got, mom, content)
    assert mom["degraded"] is True

    configure(fake_server, **{name.replace("-", "_"): {"status": 500} for name in MEMBERS})
    with pytest.raises(openai.APIStatusError) as refused:
        client(progressive).chat.completions.create(model="prog", messages=QUESTION)
    assert refused.value.status_code == 502
    headers = refused.value.response.headers  # an error after the run began: it has a progress stream too
    got = read_all(progressive, headers["x-mom-progress-url"])
    assert got[0].data["request_id"] == headers["x-mom-request-id"]
    assert [e.data["status"] for e in of(got, "member_done")] == ["error"] * 3
    assert kinds(got)[-1] == "run_failed" and of(got, "run_done") == []
    error = got[-1].data["error"]
    assert error["type"] == "upstream_error" and error["code"] == "members_failed"
    assert error["message"] == refused.value.response.json()["error"]["message"]
    assert got[-1].data["mom"]["answered"] == 0


def test_a_member_cut_by_the_quorum(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server, pg_three={"gate": GATE})  # held until cut: the gate never opens
    _, url, mom, content = ask(progressive, "prog-quorum")
    got = read_all(progressive, url)
    assert_panel(got)
    done = of(got, "member_done")
    assert done[-1].data["name"] == "pg-three"  # settled when the quorum cut it, after the two it waited for
    assert done[-1].data["status"] == "cancelled" and "quorum of 2" in done[-1].data["error"]
    assert done[-1].id < of(got, "concluding_started")[0].id
    assert_answered(got, mom, content)


def test_a_cut_member_with_a_partial_answer(progressive: Service, fake_server: FakeUpstream) -> None:
    # pg-three writes a sentence at once, then would take a minute for the rest; the two others answer after 300 ms:
    # the quorum cuts pg-three, and with partial_answers what it wrote is its (partial) answer
    pieces = [{"text": "Partly written.", "delay_ms": 0}, {"text": " The rest, much later.", "delay_ms": 60_000}]
    configure(fake_server, pg_one={"ttft_ms": 300}, pg_two={"ttft_ms": 300})
    fake_server.configure({"pg-three": {"pieces": pieces}})
    _, url, mom, content = ask(progressive, "prog-partial")
    got = read_all(progressive, url)
    assert_panel(got)
    deltas = [e.data["text"] for e in of(got, "member_delta") if e.data["name"] == "pg-three"]
    assert "".join(deltas) == "Partly written."
    (cut,) = [e for e in of(got, "member_done") if e.data["name"] == "pg-three"]
    assert (cut.data["status"], cut.data["partial"], cut.data["text"]) == ("cancelled", True, "Partly written.")
    assert "quorum of 2" in cut.data["error"] and cut.data["usage"]["completion_tokens"] > 0
    assert cut.id < of(got, "concluding_started")[0].id
    (member,) = [m for m in mom["members"] if m["name"] == "pg-three"]
    assert member["partial"] is True
    concluding = next(e for e in fake_server.log() if e["model"] == JUDGE)
    assert 'partial="true"' in concluding["body"]["messages"][-1]["content"]
    assert_answered(got, mom, content)


def test_strategies_announce_their_stages(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server)
    _, url, mom, content = ask(progressive, "prog-rank")
    got = read_all(progressive, url)
    assert_panel(got)
    seen = [e for e in got if e.kind != "member_delta"]
    assert lifecycle(got)[7:10] == ["stage_started", "stage_done", "concluding_started"]
    assert seen[7].data == {"stage": "rank"} and seen[8].data["stage"] == "rank"
    assert "Borda count" in seen[8].data["summary"]
    assert seen[9].data["concluding"]["name"] == JUDGE and mom["ranking"]
    assert_answered(got, mom, content)

    _, url, mom, content = ask(progressive, "prog-best")  # a member's answer, verbatim: no concluding call
    got = read_all(progressive, url)
    seen = [e for e in got if e.kind != "member_delta"]
    assert lifecycle(got)[7:10] == ["stage_started", "stage_done", "concluding_started"]
    assert seen[7].data == {"stage": "judge"}
    assert seen[9].data == {"strategy": "best_of", "concluding": None, "selected": mom["selected"]}
    assert content == TEXTS[mom["selected"]]
    assert_answered(got, mom, content)

    _, url, mom, content = ask(progressive, "prog-layers")
    got = read_all(progressive, url)
    assert_panel(got, "answer")
    assert_panel(got, "round-2")
    (round_two,) = of(got, "stage_started")
    assert round_two.data == {"stage": "round-2"}
    by_stage = {e.data["stage"]: e.id for e in got if e.kind == "member_done"}
    assert max(e.id for e in got if e.kind == "member_done" and e.data["stage"] == "answer") < round_two.id
    assert round_two.id < min(e.id for e in got if e.kind == "member_started" and e.data["stage"] == "round-2")
    assert by_stage["round-2"] < of(got, "concluding_started")[0].id
    assert_answered(got, mom, content)


# ----------------------------------------------------------------------------------------- late subscribers


def test_a_subscriber_mid_run_gets_the_past_then_the_rest_live(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server, pg_three={"gate": GATE})
    # with the thinking context, the stream (and its headers) begins with the first member's answer
    raw = client(progressive).chat.completions.with_raw_response.create(
        model="prog-think", messages=QUESTION, stream=True
    )
    try:
        with progress(progressive, raw.headers["x-mom-progress-url"]) as stream:
            seen: list[Event] = []
            while len(of(seen, "member_done")) < 2:
                seen.append(next(stream))
            assert kinds(seen)[:4] == ["run_started", *["member_started"] * 3]
            assert sorted(e.data["name"] for e in of(seen, "member_done")) == ["pg-one", "pg-two"]
            # pg-three is still held at the gate: the run is going on
            (held,) = [e for e in fake_server.log() if e["model"] == "pg-three"]
            assert held["finished_at"] is None
            fake_server.open_gate(GATE)
            seen += list(stream)
        assert_panel(seen)
        assert of(seen, "member_done")[-1].data["name"] == "pg-three" and kinds(seen)[-1] == "run_done"
        content = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert ANSWER in content and seen[-1].data["content"] == ANSWER
        assert read_all(progressive, raw.headers["x-mom-progress-url"]) == seen  # and again, after the end
    finally:
        fake_server.open_gate(GATE)


def test_resuming_after_the_last_event_seen(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server)
    _, url, _, _ = ask(progressive)
    whole = read_all(progressive, url)
    rest = read_all(progressive, url, **{"Last-Event-ID": str(whole[4].id)})
    assert rest == whole[5:]
    # the run had ended there: 204 tells an EventSource to stop reconnecting
    over = httpx.get(progressive.url + url, headers={"Last-Event-ID": str(whole[-1].id)}, timeout=10)
    assert over.status_code == 204 and over.content == b""


def test_a_client_leaving_ends_the_run_as_cancelled(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server, pg_three={"gate": GATE})
    raw = client(progressive).chat.completions.with_raw_response.create(
        model="prog-think", messages=QUESTION, stream=True
    )
    with progress(progressive, raw.headers["x-mom-progress-url"]) as stream:
        assert next(stream).kind == "run_started"
        raw.http_response.close()  # the client leaves mid-run
        rest = list(stream)
    assert rest[-1].kind == "run_failed"
    assert rest[-1].data["error"]["code"] == "cancelled" and rest[-1].data["mom"] is None


# -------------------------------------------------------------------------------------------------- surfaces


def test_every_surface_answers_with_its_progress(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server)
    messages = anthropic.Anthropic(base_url=progressive.url, api_key=TOKEN, max_retries=0, timeout=30)
    whole = messages.messages.with_raw_response.create(model="prog", max_tokens=100, messages=QUESTION)  # type: ignore[arg-type]
    streamed = messages.messages.with_raw_response.create(
        model="prog",
        max_tokens=100,
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
    )
    assert "".join(e.delta.text for e in streamed.parse() if e.type == "content_block_delta") == ANSWER  # type: ignore[union-attr]
    responses = client(progressive).responses.with_raw_response.create(model="prog", input="What is 2 + 2?")
    runs = [
        (whole.headers, "messages", False),
        (streamed.headers, "messages", True),
        (responses.headers, "responses", False),
    ]
    for headers, surface, stream in runs:
        got = read_all(progressive, headers["x-mom-progress-url"])
        assert got[0].data["request_id"] == headers["x-mom-request-id"]
        assert (got[0].data["surface"], got[0].data["stream"]) == (surface, stream)
        assert_panel(got)
        assert got[-1].kind == "run_done" and got[-1].data["content"] == ANSWER


def test_a_request_refused_before_its_run_has_no_progress(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server)
    with pytest.raises(openai.NotFoundError) as unknown:
        client(progressive).chat.completions.create(model="no-such-model", messages=QUESTION)
    refused = [
        unknown.value.response,
        httpx.post(f"{progressive.base_url}/chat/completions", headers=progressive.headers(), content=b"{", timeout=10),
        httpx.post(f"{progressive.base_url}/chat/completions", json={"model": "prog"}, timeout=10),  # no token
    ]
    for response in refused:
        assert response.status_code in (400, 401, 404)
        assert "x-mom-progress-url" not in response.headers and "x-mom-request-id" not in response.headers
        assert response.headers["x-request-id"]


def test_a_browser_of_an_allowed_origin_reads_the_headers_and_the_stream(
    progressive: Service, fake_server: FakeUpstream
) -> None:
    configure(fake_server)
    answer = httpx.post(
        f"{progressive.base_url}/chat/completions",
        headers={**progressive.headers(), "Origin": ORIGIN},
        json={"model": "prog", "messages": QUESTION},
        timeout=30,
    )
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {"x-mom-request-id", "x-mom-progress-url"} <= exposed
    with httpx.stream(
        "GET", progressive.url + answer.headers["x-mom-progress-url"], headers={"Origin": ORIGIN}, timeout=30
    ) as stream:
        assert stream.status_code == 200 and stream.headers["access-control-allow-origin"] == ORIGIN


# ------------------------------------------------------------------------------------------------------ auth


def test_a_link_token_opens_its_run_only(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server)
    first_id, first_url, _, _ = ask(progressive)
    second_id, second_url, _, _ = ask(progressive)
    assert read_all(progressive, first_url)[0].data["request_id"] == first_id
    first_token = first_url.split("?token=")[1]
    wrong = [
        f"/v1/progress/{second_id}?token={first_token}",  # another run's token
        f"/v1/progress/{first_id}?token={first_token[:-2]}xx",  # tampered
    ]
    for path in wrong:
        response = httpx.get(progressive.url + path, timeout=10)
        assert response.status_code == 401
        assert response.json() == {
            "error": {
                "message": "This link token is not valid for this run.",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_link_token",
            }
        }
    assert read_all(progressive, second_url)[0].data["request_id"] == second_id


def test_the_bearer_token_opens_its_callers_runs(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server)
    run_id, _, mom, content = ask(progressive)
    path = f"/v1/progress/{run_id}"
    got = read_all(progressive, path, Authorization=f"Bearer {TOKEN}")
    assert got[0].data["request_id"] == run_id
    assert_answered(got, mom, content)
    missing = httpx.get(progressive.url + path, timeout=10)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.get(progressive.url + path, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    for token, unknown in ((OTHER_TOKEN, path), (TOKEN, "/v1/progress/00000000-0000-4000-8000-000000000000")):
        response = httpx.get(progressive.url + unknown, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 404  # another caller's run is not found, as an unknown one
        assert response.json()["error"]["code"] == "run_not_found"


# ---------------------------------------------------------------------------------------------------- limits


def test_subscribers_per_run_are_capped(progressive: Service, fake_server: FakeUpstream) -> None:
    configure(fake_server, pg_three={"gate": GATE})
    raw = client(progressive).chat.completions.with_raw_response.create(
        model="prog-think", messages=QUESTION, stream=True
    )
    url = progressive.url + raw.headers["x-mom-progress-url"]
    try:
        with progress(progressive, raw.headers["x-mom-progress-url"]) as first:
            assert next(first).kind == "run_started"
            with progress(progressive, raw.headers["x-mom-progress-url"]) as second:
                assert next(second).kind == "run_started"
                full = httpx.get(url, timeout=10)  # MOM_PROGRESS_MAX_SUBSCRIBERS=2
                assert full.status_code == 429 and full.headers["retry-after"] == "5"
                assert full.json()["error"]["code"] == "too_many_subscribers"
            # one left: a place again (once the service has noticed)
            wait_until(lambda: _opens(url))
        fake_server.open_gate(GATE)
        assert raw.parse().response.status_code == 200
    finally:
        fake_server.open_gate(GATE)


def _opens(url: str) -> bool:
    with httpx.stream("GET", url, timeout=10) as response:
        return response.status_code == 200


def test_a_run_is_forgotten_after_the_ttl(fake_server: FakeUpstream, start_service: StartService) -> None:
    service = start_service(config(fake_server), {"MOM_PROGRESS_TTL_SECONDS": "4"})
    configure(fake_server)
    _, url, _, _ = ask(service)
    assert read_all(service, url)[-1].kind == "run_done"
    wait_until(lambda: httpx.get(service.url + url, timeout=10).status_code == 404, timeout=20)
    gone = httpx.get(service.url + url, timeout=10).json()
    assert gone["error"]["code"] == "run_not_found" and "4 s" in gone["error"]["message"]


def test_health_shows_the_hub(progressive: Service) -> None:
    report = httpx.get(f"{progressive.url}/health/detailed", headers=progressive.headers(), timeout=10).json()
    hub = report["components"]["progress"]
    assert hub["status"] == "ok" and hub["backend"] == "memory" and hub["max_runs"] == 1000
    assert isinstance(hub["runs"], int)
