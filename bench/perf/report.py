"""Render a perf run's results as markdown (for the README) and a 2x2 PNG.

    .venv/bin/python -m bench.perf.report bench/results/perf-<date>.json [--out-dir DIR]

`render(results, out_dir)` writes `perf-<date>.md` and `perf-<date>.png` into out_dir (by default beside the JSON)
and returns both paths. The results dict is the runner's (see bench/perf/run.py); a target with `skipped` set, or a
concurrency level it has no figures for, is shown as "—" with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

ORDER = ("direct", "litellm-proxy", "mom-1", "mom-3", "mom-5")
MOM = ("mom-1", "mom-3", "mom-5")
DASH = "—"
# The targets.
TTFT_VS_DIRECT = 1.5
GAP_P99_MS = 1.0
STALL_LEVEL = 256
CPU_PER_CHUNK_US = 60.0
RSS_PER_INFLIGHT_KB = 100.0
CACHE_HIT_P99_MS = 5.0

Target = dict[str, Any]
Level = dict[str, Any]


def targets(results: dict[str, Any]) -> list[tuple[str, Target]]:
    """The targets in the usual order (unknown names last, as given)."""
    given: dict[str, Target] = results.get("targets", {})
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(given.items(), key=lambda item: rank.get(item[0], len(ORDER)))


def concurrencies(results: dict[str, Any]) -> list[int]:
    levels = {int(c) for _, t in targets(results) for c in (t.get("levels") or {})}
    return sorted(levels | {int(c) for c in results.get("config", {}).get("concurrency", [])})


def level(target: Target | None, c: int) -> Level | None:
    """The target's figures at concurrency c, or None when skipped or not run."""
    if target is None or target.get("skipped"):
        return None
    found: Level | None = (target.get("levels") or {}).get(str(c))
    return found


def num(value: Any, digits: int = 2) -> str:
    if value is None:
        return DASH
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def pct(block: dict[str, Any] | None, key: str) -> Any:
    return None if block is None else block.get(key)


def star(figure: str, lev: Level | None) -> str:
    """Mark a figure that comes from a level marked invalid."""
    return figure + "*" if lev is not None and not lev.get("valid", True) and figure != DASH else figure


# --- markdown ---------------------------------------------------------------------------------------------------


def header(results: dict[str, Any]) -> list[str]:
    machine = results.get("machine", {})
    config = results.get("config", {})
    verdict = "valid" if results.get("valid") else "**INVALID**: " + "; ".join(results.get("invalid_reasons") or ["?"])
    pinned = "pinned cores" if machine.get("pinned") else "unpinned"
    cells = ", ".join(f"c={c}: {n}" for c, n in (config.get("requests_per_cell") or {}).items())
    return [
        f"### Gateway overhead — {results.get('date', '?')}",
        "",
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, Python {machine.get('python', '?')}, {pinned}"
        f" · {config.get('rounds', '?')} rounds · requests per cell {cells or '?'} · run {verdict}",
        "",
    ]


def main_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "Added over the fake upstream, ms (`*`: level marked invalid).",
        "",
        "| target | c | TTFT p50 | p95 | p99 | e2e p50 | p99 | gap p99 | stalls | rps | CPU µs/req | valid |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, target in targets(results):
        if target.get("skipped"):
            lines.append(f"| {name} | {DASH} |" + f" {DASH} |" * 9 + f" skipped: {target['skipped']} |")
            continue
        for c in concurrencies(results):
            lev = level(target, c)
            if lev is None:
                lines.append(f"| {name} | {c} |" + f" {DASH} |" * 9 + " not run |")
                continue
            ttft, e2e, gap = lev.get("ttft_added_ms"), lev.get("e2e_added_ms"), lev.get("gap_added_ms")
            figures = [
                num(pct(ttft, "p50")),
                num(pct(ttft, "p95")),
                num(pct(ttft, "p99")),
                num(pct(e2e, "p50")),
                num(pct(e2e, "p99")),
                num(pct(gap, "p99")),
                num(lev.get("stalls")),
                num(lev.get("rps"), 0),
                num(lev.get("cpu_us_per_request"), 0),
            ]
            errors = f" ({lev['errors']} errors)" if lev.get("errors") else ""
            valid = "yes" if lev.get("valid", True) else "no: " + "; ".join(lev.get("invalid_reasons") or ["?"])
            lines.append(f"| {name} | {c} | " + " | ".join(figures) + f" | {valid}{errors} |")
    return [*lines, ""]


def target_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| target | members | start→ready ms | RSS idle MB | load MB | per in-flight KB | after MB "
        "| CPU µs/chunk | cache hit whole p50/p99 ms | stream p50/p99 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, t in targets(results):
        if t.get("skipped"):
            lines.append(f"| {name} | {t.get('members', DASH)} |" + f" {DASH} |" * 7 + f" skipped: {t['skipped']} |")
            continue
        hit = t.get("cache_hit_ms") or {}
        hits = [
            f"{num(pct(hit.get(k), 'p50'))} / {num(pct(hit.get(k), 'p99'))}" if k in hit else DASH
            for k in ("whole", "stream")
        ]
        figures = [
            num(t.get("members")),
            num(t.get("start_to_ready_ms"), 0),
            num(t.get("rss_idle_mb"), 1),
            num(t.get("rss_load_mb"), 1),
            num(t.get("rss_per_inflight_kb"), 1),
            num(t.get("rss_after_mb"), 1),
            num(t.get("cpu_us_per_chunk"), 1),
            *hits,
        ]
        lines.append(f"| {name} | " + " | ".join(figures) + " |")
    return [*lines, ""]


def verdict(passed: Iterable[bool | None]) -> str:
    """MISS if any check failed, else PASS (saying how many were measured when some were not: None), else —."""
    checks = list(passed)
    measured = [p for p in checks if p is not None]
    if not measured:
        return DASH
    if not all(measured):
        return "MISS"
    return "PASS" if len(measured) == len(checks) else f"PASS ({len(measured)} of {len(checks)} measured)"


def skipped_note(t: Target | None, name: str) -> str | None:
    if t is None:
        return f"{name} not in this run"
    return f"{name} skipped: {t['skipped']}" if t.get("skipped") else None


def compare_ttft(
    results: dict[str, Any], other: str, label: str, ok: Callable[[float, float], bool]
) -> list[tuple[str, str, str]]:
    """mom-3's added TTFT p50 against `other`'s, at c=1 and at every concurrency."""
    given = dict(targets(results))
    mom, base = given.get("mom-3"), given.get(other)
    if note := skipped_note(mom, "mom-3") or skipped_note(base, other):
        return [(f"{label} (c=1)", DASH + f" ({note})", DASH), (f"{label} (all c)", DASH + f" ({note})", DASH)]
    figures: list[str] = []
    per_c: dict[int, bool | None] = {}
    for c in concurrencies(results):
        a, b = (
            pct((level(mom, c) or {}).get("ttft_added_ms"), "p50"),
            pct((level(base, c) or {}).get("ttft_added_ms"), "p50"),
        )
        per_c[c] = None if a is None or b is None else ok(a, b)
        mark = star(num(a), level(mom, c)) + " vs " + star(num(b), level(base, c))
        figures.append(f"c={c}: {mark}" + ("" if per_c[c] is None else (" ✓" if per_c[c] else " ✗")))
    first = min(per_c) if per_c else 1
    one = figures[0] if figures else DASH
    return [
        (f"{label} (c={first})", one, verdict([per_c.get(first)])),
        (f"{label} (all c)", "; ".join(figures) or DASH, verdict(per_c.values())),
    ]


def per_mom(
    results: dict[str, Any], label: str, figure: Callable[[Target], tuple[str, bool | None]]
) -> tuple[str, str, str]:
    """One check over the mom targets: its figures per target and a verdict over all of them."""
    given = dict(targets(results))
    parts: list[str] = []
    checks: list[bool | None] = []
    for name in MOM:
        t = given.get(name)
        if note := skipped_note(t, name):
            parts.append(f"{DASH} ({note})")
            checks.append(None)
            continue
        assert t is not None
        text, passed = figure(t)
        parts.append(f"{name}: {text}")
        checks.append(passed)
    return label, "; ".join(parts), verdict(checks)


def stalls_and_gap(t: Target) -> tuple[str, bool | None]:
    lev = level(t, STALL_LEVEL)
    if lev is None:
        return f"{DASH} (c={STALL_LEVEL} not run)", None
    stalls, gap = lev.get("stalls"), pct(lev.get("gap_added_ms"), "p99")
    passed = None if stalls is None or gap is None else stalls == 0 and gap < GAP_P99_MS
    return star(f"{num(stalls)} stalls, gap p99 {num(gap)} ms", lev), passed


def under(key: str, limit: float, unit: str) -> Callable[[Target], tuple[str, bool | None]]:
    def figure(t: Target) -> tuple[str, bool | None]:
        value = t.get(key)
        return f"{num(value, 1)} {unit}", None if value is None else value < limit

    return figure


def cache_hit(t: Target) -> tuple[str, bool | None]:
    hit = t.get("cache_hit_ms")
    if not hit:
        return DASH, None
    p99s = {mode: pct(hit.get(mode), "p99") for mode in ("whole", "stream")}
    known = [v for v in p99s.values() if v is not None]
    text = " / ".join(f"{mode} {num(v)}" for mode, v in p99s.items()) + " ms"
    return text, (max(known) < CACHE_HIT_P99_MS) if known else None


def checks_table(results: dict[str, Any]) -> list[str]:
    rows = [
        *compare_ttft(results, "litellm-proxy", "mom-3 added TTFT p50 < litellm-proxy's", lambda a, b: a < b),
        *compare_ttft(
            results,
            "direct",
            f"mom-3 added TTFT p50 ≤ {TTFT_VS_DIRECT}x direct's",
            lambda a, b: a <= TTFT_VS_DIRECT * b,
        ),
        per_mom(results, f"{STALL_LEVEL} streams: 0 stalls, added gap p99 < {GAP_P99_MS:g} ms", stalls_and_gap),
        per_mom(
            results,
            f"CPU per streamed chunk < {CPU_PER_CHUNK_US:g} µs",
            under("cpu_us_per_chunk", CPU_PER_CHUNK_US, "µs"),
        ),
        per_mom(
            results,
            f"RSS per request in flight < {RSS_PER_INFLIGHT_KB:g} KB",
            under("rss_per_inflight_kb", RSS_PER_INFLIGHT_KB, "KB"),
        ),
        per_mom(results, f"cache hit p99 < {CACHE_HIT_P99_MS:g} ms", cache_hit),
    ]
    lines = ["**Targets**", "", "| target | figures (ms unless stated) | result |", "|---|---|---|"]
    lines += [f"| {label} | {figures} | {result} |" for label, figures, result in rows]
    if not results.get("valid"):
        lines += ["", "The run is INVALID: read these as indicative only."]
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    return "\n".join([*header(results), *main_table(results), *target_table(results), *checks_table(results)])


# --- figure -----------------------------------------------------------------------------------------------------

# title, unit, the figure of a level, the target line (if any)
PANELS: tuple[tuple[str, str, Callable[[Level], Any], float | None], ...] = (
    ("Added TTFT p50", "ms", lambda lev: pct(lev.get("ttft_added_ms"), "p50"), None),
    ("Added end-to-end p99", "ms", lambda lev: pct(lev.get("e2e_added_ms"), "p99"), None),
    ("CPU per request", "µs", lambda lev: lev.get("cpu_us_per_request"), None),
    ("Added chunk gap p99", "ms", lambda lev: pct(lev.get("gap_added_ms"), "p99"), GAP_P99_MS),
)


def figure(results: dict[str, Any], path: Path) -> None:
    cs = concurrencies(results)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110)
    colours = [f"C{i}" for i in range(10)]  # the default colour cycle, one per target in ORDER
    skipped = [f"{n} ({t['skipped']})" for n, t in targets(results) if t.get("skipped")]
    any_invalid = False
    for ax, (title, unit, value, target_line) in zip(axes.flat, PANELS, strict=True):
        values: list[float] = []  # every figure drawn in this panel
        for i, (name, t) in enumerate(targets(results)):
            if t.get("skipped"):
                continue
            points = [(c, value(lev), bool(lev.get("valid", True))) for c in cs if (lev := level(t, c)) is not None]
            points = [(c, v, ok) for c, v, ok in points if v is not None]
            if not points:
                continue
            colour = colours[i % len(colours)]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            values += ys
            ax.plot(xs, ys, "o-", color=colour, label=t.get("label") or name, linewidth=1.6, markersize=6)
            hollow = [(c, v) for c, v, ok in points if not ok]
            if hollow:
                any_invalid = True
                ax.plot(*zip(*hollow, strict=True), "o", color=colour, markersize=6, markerfacecolor="white")
        ax.set_xscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.xaxis.set_minor_locator(NullLocator())
        if target_line is not None and ax.lines:
            ax.axhline(target_line, color="gray", linestyle=":", linewidth=1.2)
            ax.annotate(
                f"target {target_line:g} {unit}",
                (cs[0], target_line),
                textcoords="offset points",
                xytext=(3, -11),
                fontsize=8,
                color="gray",
            )
        if values and min(values) > 0:
            subs = (1.0, 2.0, 5.0) if max(values) / min(values) > 15 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_locator(NullLocator())
        elif values:  # a negative added figure (faster than the baseline): log scale away from zero
            linthresh = 10 ** math.ceil(math.log10(max(-min(values), 1e-3)))
            ax.set_yscale("symlog", linthresh=linthresh, linscale=1)
            ax.set_ylim(-linthresh, max(max(values), linthresh) * 1.6)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(title)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=min(3, max(1, len(labels))),
        bbox_to_anchor=(0.5, 0.955),
        frameon=False,
        fontsize=9,
    )
    validity = "valid" if results.get("valid") else "INVALID: " + "; ".join(results.get("invalid_reasons") or ["?"])
    fig.suptitle(f"MoM Service gateway overhead, {results.get('date', '?')} ({validity})"[:160], fontsize=13)
    notes = []
    if any_invalid:
        notes.append("hollow marker: level marked invalid")
    if skipped:
        notes.append("skipped: " + "; ".join(skipped))
    if notes:
        fig.text(0.5, 0.01, " · ".join(notes)[:200], ha="center", fontsize=9, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.89))
    fig.savefig(path)
    plt.close(fig)


def render(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/perf-<date>.md and .png; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / f"perf-{results['date']}.md", out_dir / f"perf-{results['date']}.png"
    md.write_text(markdown(results))
    figure(results, png)
    return md, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="bench/results/perf-<date>.json")
    parser.add_argument("--out-dir", type=Path, help="default: beside the JSON")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    for path in render(results, args.out_dir or args.results.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
