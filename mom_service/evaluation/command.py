"""`mom-service eval`: the options checked, the service's state opened as `serve` opens it (config, keys, usage
database, records), the run, then the report as a table, JSON and a PNG plot."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from rich.console import Console

from mom_service.config import MoMConfig
from mom_service.evaluation import dataset as datasets
from mom_service.evaluation import plot as plots
from mom_service.evaluation.budget import Budget
from mom_service.evaluation.errors import EvalError
from mom_service.evaluation.report import Report, judge_cost, target_report
from mom_service.evaluation.results import ResultsFile
from mom_service.evaluation.runner import Plan, Runner
from mom_service.evaluation.scoring import compile_pattern
from mom_service.evaluation.state import opened
from mom_service.evaluation.targets import Asker, Target, resolve_targets
from mom_service.evaluation.terminal import ProgressBar, summary, table
from mom_service.settings import Settings

WIDE = 160


@dataclass(frozen=True, slots=True)
class Options:
    dataset: str
    targets: str  # comma-separated
    judge: str | None = None
    baseline: str | None = None
    answer_pattern: str | None = None
    concurrency: int = 4
    max_cost_usd: str | None = None
    results: str | None = None
    out: str | None = None
    limit: int | None = None


def _limit(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        limit = Decimal(value)
    except InvalidOperation:
        raise EvalError(f"--max-cost-usd must be a number of USD, not {value!r}") from None
    if not limit.is_finite() or limit < 0:
        raise EvalError("--max-cost-usd must be a number of USD, 0 or more")
    return limit


def plan_of(options: Options, config: MoMConfig) -> tuple[Plan, Path]:
    """What the options ask for, checked before anything is opened or asked."""
    path = datasets.resolve(options.dataset)
    items = datasets.load(path, options.limit)
    names = [n.strip() for n in options.targets.split(",") if n.strip()]
    if not names:
        raise EvalError("--targets names no target")
    if options.baseline and options.baseline not in names:
        names.append(options.baseline)  # the baseline is asked too
    targets = resolve_targets(list(dict.fromkeys(names)), config)
    judged = any(item.answer is None for item in items)
    baseline: Target | None = None
    if judged:
        if options.judge is None:
            raise EvalError("Some items have no `answer`: they are judged pairwise, which needs --judge LLM.")
        if options.judge not in {d.name for d in config.llm_definitions}:
            raise EvalError(f"--judge {options.judge!r} is not an LLM of llm_definitions")
        baseline = next(t for t in targets if t.name == (options.baseline or targets[0].name))
        if len(targets) < 2:
            raise EvalError("Pairwise judging needs a target besides the baseline (--targets A,B --baseline B).")
    plan = Plan(items, targets, baseline, options.judge if judged else None, compile_pattern(options.answer_pattern))
    return plan, path


def _outputs(options: Options, stem: str) -> tuple[Path | None, Path | None]:
    """(the JSON file, the PNG file): `--out` a .json file (the PNG beside it), or a directory (both in it)."""
    if options.out is None:
        return None, None
    out = Path(options.out)
    if out.suffix.lower() == ".json":
        return out, out.with_suffix(".png")
    return out / f"{stem}.json", out / f"{stem}.png"


async def evaluate(settings: Settings, config: MoMConfig, config_path: str | None, options: Options) -> int:
    plan, path = plan_of(options, config)
    budget = Budget(_limit(options.max_cost_usd))
    results = ResultsFile(Path(options.results or f"{path.stem}.results.jsonl"))
    # wide enough for the table when the output is a file or a pipe (rich's default there is 80 columns)
    console, progress_console = Console(width=None if sys.stdout.isatty() else WIDE), Console(stderr=True)
    try:
        async with opened(settings, config, config_path) as state:
            logging.getLogger("mom_service").setLevel(logging.WARNING)  # the progress bar, not the service's lines
            runner = Runner(Asker(state.engine), results, budget, options.concurrency)
            with ProgressBar(progress_console) as progress:
                await runner.run(plan, progress)
    finally:
        results.close()
    report = Report(
        dataset=str(path),
        results_file=str(results.path),
        items=len(plan.items),
        baseline=plan.baseline.name if plan.baseline else None,
        judge=plan.judge,
        stopped=budget.stopped,
        spent_usd=float(budget.spent),
        max_cost_usd=float(budget.limit) if budget.limit is not None else None,
        judge_cost_usd=judge_cost(results),
        targets=[target_report(results, plan.items, t, plan.baseline, plan.pattern) for t in plan.targets],
    )
    console.print(table(report))
    for line in summary(report):
        console.print(line)
    _write(report, *_outputs(options, path.stem), console)
    return 0


def _write(report: Report, json_path: Path | None, png_path: Path | None, console: Console) -> None:
    if json_path is None or png_path is None:
        return
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
    console.print(f"JSON: {json_path}")
    if not plots.available():
        console.print(plots.NO_MATPLOTLIB)
    elif plots.plot(report, png_path):
        console.print(f"Plot: {png_path}")
    else:
        console.print("No plot: no target has both a quality and a known cost yet.")
