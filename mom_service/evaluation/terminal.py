"""What the terminal shows: a progress bar while the run goes, then the report as a table (rich, on stderr while
it runs and stdout for the table)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from mom_service.evaluation.report import Rate, Report


class ProgressBar:
    """The runner's progress: one bar per stage (answers, judging)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def stage(self, description: str, total: int) -> None:
        self._task = self._progress.add_task(description, total=total)

    def advance(self) -> None:
        if self._task is not None:
            self._progress.advance(self._task)


def _rate(rate: Rate | None) -> str:
    if rate is None:
        return "-"
    return f"{rate.value:.1%} [{rate.low:.1%}, {rate.high:.1%}]"


def _usd(value: float | None) -> str:
    return f"${value:.6f}".rstrip("0").rstrip(".") if value is not None else "unknown"


def _ms(value: float | None) -> str:
    return f"{value:.0f} ms" if value is not None else "-"


def table(report: Report) -> Table:
    judged = any(t.win_rate is not None for t in report.targets)
    title = f"{report.dataset}: {report.items} item(s)"
    if report.baseline and judged:
        title += f", judged by {report.judge} against {report.baseline}"
    out = Table(title=title)
    quality = ["score [95% CI]", *(["win rate [95% CI]"] if judged else [])]
    for column in ("target", "items", *quality, "cost total", "mean"):
        out.add_column(column)
    for column in ("p50", "p95", "errors", "missing"):
        out.add_column(column, justify="right")
    for t in report.targets:
        win = [_rate(t.win_rate) + (f" W/T/L {t.wins}/{t.ties}/{t.losses}" if t.win_rate else "")] if judged else []
        out.add_row(
            f"{t.target} ({t.kind})",
            str(t.answered),
            _rate(t.score),
            *win,
            _usd(t.cost_total_usd),
            _usd(t.cost_mean_usd),
            _ms(t.latency_p50_ms),
            _ms(t.latency_p95_ms),
            str(t.errors),
            str(t.missing),
        )
    return out


def summary(report: Report) -> list[str]:
    """The lines under the table: the spending, the stop, the judge's cost."""
    lines = [f"Spent by this run: {_usd(report.spent_usd)}"]
    if report.judge_cost_usd is not None and report.judge:
        lines.append(f"Judging ({report.judge}), all runs: {_usd(report.judge_cost_usd)}")
    if report.stopped:
        lines.append(
            f"STOPPED at the spending limit of {_usd(report.max_cost_usd)} (--max-cost-usd): the next piece of work "
            f"could have taken the run over it. Rerun with the same results file ({report.results_file}) to go on."
        )
    return lines
