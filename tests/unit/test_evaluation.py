"""The evaluation harness's pure logic: answers extracted and normalized, Wilson intervals, the judge's two orders,
datasets, the results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mom_service.evaluation.dataset import Item, built_in_names, load, resolve
from mom_service.evaluation.errors import EvalError
from mom_service.evaluation.judging import combine, in_order, judge_messages, parse_verdict
from mom_service.evaluation.results import AnswerRecord, JudgmentRecord, ResultsFile
from mom_service.evaluation.scoring import compile_pattern, exact_match, extract, normalize
from mom_service.evaluation.stats import percentile, wilson


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1,000", "1000"),
        ("1000.0", "1000"),
        ("1e3", "1000"),
        ("  Paris. ", "paris"),
        ("**Tokyo**", "tokyo"),
        ("New   York", "new york"),
        ("0.750", "0.75"),
        ("-0", "0"),
        ("12,5", "12,5"),  # not a grouped number: left as text
        ("$5", "$5"),
        ("nan", "nan"),
    ],
)
def test_normalize(answer: str, expected: str) -> None:
    assert normalize(answer) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Let me think.\n2 + 2 = 4\nAnswer: 4", "4"),
        ("Answer: 3\nOn reflection...\nFinal answer: 5\nThanks!", "5"),  # the last Answer line, not the last line
        ("**Answer:** Paris", "Paris"),
        ("The result is\n\n 42 \n\n", " 42 "),  # no Answer line: the last non-empty line
        ("", ""),
    ],
)
def test_extract_default(reply: str, expected: str) -> None:
    assert extract(reply) == expected


def test_extract_with_a_pattern() -> None:
    grouped = compile_pattern(r"####\s*(\S+)")
    assert extract("steps\n#### 12\nmore\n#### 1,024", grouped) == "1,024"
    assert extract("no marker here", grouped) == ""
    whole = compile_pattern(r"\d+")
    assert extract("between 3 and 7", whole) == "7"
    with pytest.raises(EvalError, match="answer-pattern"):
        compile_pattern("(")


def test_exact_match() -> None:
    assert exact_match("Work...\nAnswer: 1,000", "1000")
    assert exact_match("Answer: 6.0", "6")
    assert not exact_match("Answer: 5", "4")
    assert exact_match("so #### 7", "7", compile_pattern(r"####\s*(\d+)"))
    assert not exact_match("Answer: 7", "7", compile_pattern(r"####\s*(\d+)"))


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # known values: Wilson's score interval without continuity correction (as R's prop.test(correct=FALSE))
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (1, 1, 0.2065, 1.0),
        (0, 0, 0.0, 1.0),
    ],
)
def test_wilson(successes: int, n: int, low: float, high: float) -> None:
    got = wilson(successes, n)
    assert got == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([10.0], 95) == 10.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 95) == pytest.approx(95.05)


def test_verdicts_parsed() -> None:
    assert parse_verdict("A is better.\n[[A]]") == "A"
    assert parse_verdict("[[A]] at first, but on reflection [[ b ]]") == "B"
    assert parse_verdict("[[TIE]]") == "tie"
    assert parse_verdict("Answer A") is None


@pytest.mark.parametrize(
    ("ab", "ba", "outcome"),
    [
        ("A", "B", "win"),  # the target is A first, then B: chosen both times
        ("B", "A", "loss"),  # the baseline chosen in both orders
        ("A", "A", "tie"),  # position A chosen both times: the orders disagree on the answer
        ("B", "B", "tie"),
        ("tie", "tie", "tie"),
        ("A", "tie", "tie"),
        ("A", None, "tie"),  # no verdict in one order
    ],
)
def test_judging_both_orders(ab: str | None, ba: str | None, outcome: str) -> None:
    assert combine(ab, ba) == outcome  # type: ignore[arg-type]


def test_judge_messages_in_both_orders() -> None:
    conversation = [{"role": "user", "content": "Name a colour."}]
    first = judge_messages(conversation, *in_order("AB", "TARGET", "BASE"))[1]["content"]
    second = judge_messages(conversation, *in_order("BA", "TARGET", "BASE"))[1]["content"]
    assert "<answer_a>\nTARGET\n</answer_a>" in first and "<answer_b>\nBASE\n</answer_b>" in first
    assert "<answer_a>\nBASE\n</answer_a>" in second and "<answer_b>\nTARGET\n</answer_b>" in second
    assert "Name a colour." in first and "[[A]], [[B]] or [[tie]]" in first


def test_dataset_formats(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    lines = [
        {"question": "2+2?", "answer": 4},
        {},
        {"id": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]
    path.write_text("\n".join(json.dumps(line) if line else "" for line in lines) + "\n")
    items = load(path)
    assert items == [
        Item("1", [{"role": "user", "content": "2+2?"}], "4"),
        Item("chat", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    ]
    assert load(path, limit=1) == items[:1]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("not json", "not JSON"),
        ('{"answer": "4"}', "needs `messages` or a non-empty `question`"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "`messages` must be"),
        ('{"question": "q", "answer": true}', "`answer` must be"),
    ],
)
def test_dataset_errors_name_the_line(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "fine"}\n' + line + "\n")
    with pytest.raises(EvalError, match=error) as raised:
        load(path)
    assert str(raised.value).startswith(f"{path}:2: ")


def test_the_built_in_dataset() -> None:
    assert "basic" in built_in_names()
    items = load(resolve("basic"))
    assert 20 <= len(items) <= 30
    assert all(item.answer for item in items)
    assert len({item.id for item in items}) == len(items)
    with pytest.raises(EvalError, match="No dataset 'nope'"):
        resolve("nope")


def _answer(item: str, target: str, error: str | None = None) -> AnswerRecord:
    return AnswerRecord(item, target, f"text of {item}", 0.001, 12.0, error)


def test_the_results_file_resumes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "results.jsonl"
    first = ResultsFile(path)
    first.add(_answer("1", "mom"))
    first.add(_answer("2", "mom", error="timed out (timeout)"))
    first.add(JudgmentRecord("3", "mom", "solo", "AB", "A", "[[A]]", 0.0001, 5.0))
    first.close()
    again = ResultsFile(path)
    assert again.answered("1", "mom") == _answer("1", "mom")
    assert again.answered("2", "mom") is None  # failed: asked again
    assert again.answered("1", "solo") is None
    assert again.judged("3", "mom", "solo", "AB")
    assert not again.judged("3", "mom", "solo", "BA")
    again.add(_answer("2", "mom"))  # the retry's line wins
    again.close()
    assert ResultsFile(path).answered("2", "mom") == _answer("2", "mom")


def test_a_line_cut_short_is_done_again(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    ok = ResultsFile(path)
    ok.add(_answer("1", "mom"))
    ok.close()
    with path.open("a") as out:
        out.write('{"item": "2", "target": "mom", "te')  # a crash mid-write
    resumed = ResultsFile(path)
    assert resumed.answered("2", "mom") is None
    resumed.add(_answer("2", "mom"))
    resumed.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["item"] == "2"
    assert ResultsFile(path).answered("2", "mom") is not None


def test_a_broken_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('garbage\n{"kind": "answer"}\n')
    with pytest.raises(EvalError, match=r"results.jsonl:1: not a results line"):
        ResultsFile(path)


def test_without_matplotlib_the_report_says_how_to_get_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from mom_service.evaluation import command, plot
    from mom_service.evaluation.report import Report

    monkeypatch.setattr(plot, "available", lambda: False)
    report = Report("basic.jsonl", "r.jsonl", 0, None, None, False, 0.0, None, None)
    console = Console(record=True, width=200)
    command._write(report, tmp_path / "r.json", tmp_path / "r.png", console)
    assert json.loads((tmp_path / "r.json").read_text())["dataset"] == "basic.jsonl"
    assert not (tmp_path / "r.png").exists()
    assert "No plot: matplotlib is not installed. Install it (pip install matplotlib" in console.export_text()
