"""The PNG plot: each target's quality (score or win rate, with its 95% interval) against its mean cost per item.
matplotlib is optional (requirements-bench.txt): without it there is no plot, and the report says how to get one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mom_service.evaluation.report import Report

NO_MATPLOTLIB = (
    "No plot: matplotlib is not installed. Install it (pip install matplotlib, or pip install -r "
    "requirements-bench.txt in a checkout) and rerun: the finished results are reused, nothing is asked again."
)


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot(report: Report, path: Path) -> bool:
    """The plot written to `path`; False when no target has both a quality and a known cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        (t.target, t.cost_mean_usd, t.quality)
        for t in report.targets
        if t.cost_mean_usd is not None and t.quality is not None
    ]
    if not points:
        return False
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, cost, quality in points:
        assert cost is not None and quality is not None
        below, above = quality.value - quality.low, quality.high - quality.value
        axes.errorbar([cost], [quality.value], yerr=[[below], [above]], fmt="o", capsize=4)
        axes.annotate(name, (cost, quality.value), textcoords="offset points", xytext=(6, 6))
    judged = all(t.score is None for t in report.targets)
    axes.set_ylabel("win rate against " + str(report.baseline) if judged else "exact-match score")
    axes.set_xlabel("mean cost per item (USD)")
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlim(left=0)  # costs from nothing, so that their ratios show
    axes.set_title(f"{Path(report.dataset).stem}: quality against cost (95% intervals)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return True
