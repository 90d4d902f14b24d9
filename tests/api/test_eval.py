"""`mom-service eval` as a user runs it (its own process, a config.yaml in its working directory) against the fake
upstream, with answers right or wrong by design: the exact-match scores, the pairwise judging in both orders, the
cost stop, the resume, the JSON report, the PNG plot, the usage records."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
import yaml

from tests.conftest import FAKE_KEY, llm
from tests.fake_upstream import FakeUpstream

CHEAP = {"input_per_million": "1", "output_per_million": "2"}
# the cost stop's LLM: input free, $1 an output token, at most 5 of them: each answer ("4", one token) costs $1 and
# may cost $5
METERED = {"input_per_million": "0", "output_per_million": "1000000"}

# Each item's question ends with the answer the echoing panel will give: right or wrong by design. `solo` always
# answers "Answer: 4".
EXACT = [
    {"id": "sum", "question": "What is 2+2?\nAnswer: 4", "answer": "4"},  # mom right, solo right
    {"id": "sum6", "question": "What is 3+3?\nAnswer: 6.0", "answer": "6"},  # mom right (a number), solo wrong
    {"id": "big", "question": "Ten hundreds?\nAnswer: 1,000", "answer": "1000"},  # mom right, solo wrong
    {"id": "off", "question": "What is 5-1?\nAnswer: 5", "answer": "4"},  # mom wrong, solo right
]


def _config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "llm_definitions": [
            llm("echo", fake, pricing=CHEAP),
            llm("closer", fake, pricing=CHEAP),
            llm("solo", fake, pricing=CHEAP),
            llm("referee", fake, pricing=CHEAP),
            llm("meter", fake, pricing=METERED, params={"max_tokens": 5}),
        ],
        "models": [{"name": "mom", "llms_to_query": ["echo"], "concluding_llm": "closer"}],
    }


@pytest.fixture
def workdir(tmp_path: Path, fake: FakeUpstream) -> Path:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_config(fake)))
    # the member echoes the question; the concluding LLM echoes what it reads (the panel's answers, the last
    # "Answer: X" line among them); solo answers 4 whatever it is asked
    fake.configure({"echo": {"text": "{last_user}"}, "closer": {"text": "{last_user}"}, "solo": {"text": "Answer: 4"}})
    fake.configure({"meter": {"text": "4"}})
    return tmp_path


def _dataset(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def run_eval(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_TOKEN", "MOM_", "LITELLM_", "OPENAI_"))}
    env.update({"FAKE_KEY": FAKE_KEY, "PYTHONUNBUFFERED": "1", "MOM_CIRCUIT_FAILURES": "0"})
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT on a hang: every thread's stack on stderr
    command = [sys.executable, "-m", "mom_service.cli", "eval", *args]
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=PIPE, stderr=PIPE, text=True)
    try:
        out, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        out, err = process.communicate()
        pytest.fail(f"mom-service eval did not end:\n{out}\n{err[-8000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in report["targets"]}


def _asked(fake: FakeUpstream, model: str) -> list[dict[str, Any]]:
    return [entry for entry in fake.log() if entry["model"] == model]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_exact_match_scores(workdir: Path, fake: FakeUpstream) -> None:
    data = _dataset(workdir / "exact.jsonl", EXACT)
    out = _ok(run_eval(workdir, str(data), "--targets", "mom,solo", "--out", "report", "--concurrency", "3"))
    report = json.loads((workdir / "report" / "exact.json").read_text())
    targets = _targets(report)
    mom, solo = targets["mom"], targets["solo"]
    assert (mom["kind"], mom["correct"], mom["answered"], mom["errors"], mom["missing"]) == ("mom", 3, 4, 0, 0)
    assert mom["score"]["value"] == 0.75 and mom["quality"] == 0.75
    assert (mom["score"]["low"], mom["score"]["high"]) == (
        pytest.approx(0.3006, abs=1e-4),
        pytest.approx(0.9544, abs=1e-4),
    )
    assert (solo["kind"], solo["correct"], solo["score"]["value"]) == ("llm", 2, 0.5)
    assert mom["cost_total_usd"] > 0 and solo["cost_total_usd"] > 0
    assert mom["latency_p50_ms"] is not None and mom["latency_p95_ms"] >= mom["latency_p50_ms"]
    assert report["stopped"] is False and report["baseline"] is None
    assert "mom (mom)" in out and "75.0% [30.1%, 95.4%]" in out and "50.0% [15.0%, 85.0%]" in out
    # each item asked of each target once: the member and the concluding LLM for mom, solo directly
    assert [len(_asked(fake, m)) for m in ("echo", "closer", "solo")] == [4, 4, 4]
    solo_questions = sorted(e["body"]["messages"][-1]["content"] for e in _asked(fake, "solo"))
    assert solo_questions == sorted(item["question"] for item in EXACT)
    # the results file: one line per (item, target)
    lines = _lines(workdir / "exact.results.jsonl")
    assert sorted((line["item"], line["target"], line["correct"]) for line in lines) == [
        ("big", "mom", True),
        ("big", "solo", False),
        ("off", "mom", False),
        ("off", "solo", True),
        ("sum", "mom", True),
        ("sum", "solo", True),
        ("sum6", "mom", True),
        ("sum6", "solo", False),
    ]
    # the same usage records as `serve`: every request, surface eval
    with sqlite3.connect(workdir / "data" / "mom.db") as db:
        rows = db.execute("SELECT mom_model, surface, status FROM mom_requests").fetchall()
    assert sorted(rows) == sorted([("mom", "eval", "ok")] * 4 + [("solo", "eval", "ok")] * 4)
    png = workdir / "report" / "exact.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"Plot: {Path('report') / 'exact.png'}" in out
    else:
        assert not png.exists() and "No plot: matplotlib is not installed" in out


def test_pairwise_judging_in_both_orders(workdir: Path, fake: FakeUpstream) -> None:
    items = [{"id": "q1", "question": "Describe the sea."}, {"id": "q2", "question": "Describe the sky."}]
    data = _dataset(workdir / "open.jsonl", items)
    # one at a time, the judge is asked q1 (mom as A, then as B), then q2 likewise: q1 mom chosen both times (a win),
    # q2 position A both times (the orders disagree: a tie)
    fake.configure({"referee": {"texts": ["A is better. [[A]]", "B is better. [[B]]", "[[A]]", "[[A]]"]}})
    args = ("--targets", "mom", "--baseline", "solo", "--judge", "referee", "--concurrency", "1", "--out", "r.json")
    _ok(run_eval(workdir, str(data), *args))
    report = json.loads((workdir / "r.json").read_text())
    assert (report["baseline"], report["judge"]) == ("solo", "referee")
    mom = _targets(report)["mom"]
    assert (mom["wins"], mom["ties"], mom["losses"]) == (1, 1, 0)
    assert mom["win_rate"]["value"] == 0.75 and mom["win_rate"]["n"] == 2 and mom["score"] is None
    assert _targets(report)["solo"]["win_rate"] is None  # the baseline is not judged against itself
    judged = [e["body"]["messages"][-1]["content"] for e in _asked(fake, "referee")]
    assert len(judged) == 4
    mom_answer = _lines(workdir / "open.results.jsonl")[0]["text"]
    for question, first, second in (("sea", judged[0], judged[1]), ("sky", judged[2], judged[3])):
        assert f"Describe the {question}." in first and f"Describe the {question}." in second
        assert first.index("<answer_a>") < first.index("Describe the", first.index("<answer_a>"))
        assert "<answer_b>\nAnswer: 4\n</answer_b>" in first  # mom as A, the baseline as B
        assert "<answer_a>\nAnswer: 4\n</answer_a>" in second  # then the other way round
    assert mom_answer.strip() and mom_answer in judged[0]
    verdicts = [(j["item"], j["order"], j["verdict"]) for j in _lines(workdir / "open.results.jsonl")[4:]]
    assert verdicts == [("q1", "AB", "A"), ("q1", "BA", "B"), ("q2", "AB", "A"), ("q2", "BA", "A")]


def test_the_cost_stop_and_the_resume(workdir: Path, fake: FakeUpstream) -> None:
    items = [{"id": f"i{n}", "question": f"Question {n}?", "answer": "4"} for n in range(1, 7)]
    data = _dataset(workdir / "six.jsonl", items)
    # one at a time, each answer costs $1 and may cost $5: with $7, the third starts ($2 spent + $5), not the fourth
    args = ("--targets", "meter", "--concurrency", "1", "--results", "runs/six.jsonl", "--out", "out")
    out = _ok(run_eval(workdir, str(data), *args, "--max-cost-usd", "7"))
    results = workdir / "runs" / "six.jsonl"
    assert [line["item"] for line in _lines(results)] == ["i1", "i2", "i3"]
    assert {line["cost_usd"] for line in _lines(results)} == {1.0}
    assert "STOPPED at the spending limit of $7" in out
    report = json.loads((workdir / "out" / "six.json").read_text())
    assert report["stopped"] is True and report["spent_usd"] == 3.0
    meter = _targets(report)["meter"]
    assert (meter["answered"], meter["missing"], meter["correct"]) == (3, 3, 3)
    assert len(_asked(fake, "meter")) == 3
    # the rerun with the same results file asks only the three missing items
    fake.clear_log()
    out = _ok(run_eval(workdir, str(data), *args))
    assert sorted(e["body"]["messages"][-1]["content"] for e in _asked(fake, "meter")) == [
        "Question 4?",
        "Question 5?",
        "Question 6?",
    ]
    assert [line["item"] for line in _lines(results)] == [f"i{n}" for n in range(1, 7)]
    report = json.loads((workdir / "out" / "six.json").read_text())
    meter = _targets(report)["meter"]
    assert report["stopped"] is False and "STOPPED" not in out
    assert (meter["answered"], meter["missing"], meter["correct"], meter["cost_total_usd"]) == (6, 0, 6, 6.0)
    # and a third run asks nothing
    fake.clear_log()
    _ok(run_eval(workdir, str(data), *args))
    assert _asked(fake, "meter") == []


def test_wrong_input_is_one_message(workdir: Path) -> None:
    result = run_eval(workdir, "basic", "--targets", "nobody")
    assert result.returncode == 1
    assert "mom-service eval: Unknown target 'nobody'" in result.stderr
    data = _dataset(workdir / "open.jsonl", [{"question": "Why?"}])
    result = run_eval(workdir, str(data), "--targets", "mom,solo")
    assert result.returncode == 1 and "needs --judge LLM" in result.stderr
