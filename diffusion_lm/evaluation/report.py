"""Writing an evaluation report: ``report.json`` (everything), ``report.md`` (tables) and PNG plots of
task figures vs sampler settings (``sweep_<factor>.png``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_write

__all__ = ["markdown", "plot_sweep", "sweep_table", "write_report"]

# What the plots show (when a task has it): quality, repetition, cost.
PLOT_FIGURES = ("chrf", "fixed/chrf", "rep3", "looping", "empty", "nfe")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", "\\n") or " "


def task_table(entry: dict) -> list[str]:
    """A task's figures as Markdown rows: one row per figure, columns overall and per language."""
    metrics, langs = entry["metrics"], entry.get("languages", [])
    lines = ["| figure | all | " + " | ".join(langs) + " |", "|---|---|" + "---|" * len(langs)]
    for fig in entry.get("figures", []):
        cells = [_fmt(metrics.get(fig, float("nan")))]
        cells += [_fmt(metrics.get(f"{fig}_{lg}", float("nan"))) for lg in langs]
        lines.append(f"| {fig} | " + " | ".join(cells) + " |")
    return lines


def sweep_table(rows: Sequence[dict]) -> list[str]:
    """Sweep rows as one Markdown table: factor, value, task, then the figures present."""
    if not rows:
        return []
    figures = [f for f in dict.fromkeys(k for r in rows for k in r) if f not in ("factor", "value", "task")]
    lines = ["| factor | value | task | " + " | ".join(figures) + " |",
             "|---|---|---|" + "---|" * len(figures)]
    for r in rows:
        lines.append(f"| {r['factor']} | {r['value']} | {r['task']} | "
                     + " | ".join(_fmt(r.get(f, float("nan"))) for f in figures) + " |")
    return lines


def _sample_lines(name: str, entry: dict) -> list[str]:
    out = []
    for row in entry.get("samples", []):
        if "answer" in row:
            out.append(f"| {name} | {row.get('language') or ''} | {_cell(row.get('prompt'))} | "
                       f"{_cell(row['answer'])} | {_cell(row.get('reference') or '')} |")
        elif "fixed" in row:
            fixed, variable = row.get("fixed", {}), row.get("variable", {})
            out.append(f"| {name} | {row.get('language') or ''} | {_cell(row['id'])} | "
                       f"fixed: {_cell(fixed.get('fill', ''))}<br>"
                       f"variable: {_cell(variable.get('fill', ''))} | |")
    return out


def markdown(report: dict) -> str:
    """The report as Markdown: the test NELBO / accuracy, one table per task, samples, the sweep."""
    lines = ["# Evaluation report", ""]
    if report.get("model"):
        lines += [f"model: `{report['model']}`", ""]
    lines += [f"sampler: preset `{report.get('preset') or 'quality'}`, seed {report.get('seed')}", ""]
    test = report.get("test") or {}
    if test:
        lines += ["## Held-out NELBO and masked-token accuracy (`test/`)", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(test.items())]
        lines.append("")
    for name, entry in report.get("tasks", {}).items():
        lines += [f"## Task `{name}` ({entry['kind']}, {entry['records']} records, {entry['skipped']} "
                  f"skipped as too long)", ""]
        lines += task_table(entry)
        lines.append("")
    samples = [line for name, entry in report.get("tasks", {}).items() for line in _sample_lines(name, entry)]
    if samples:
        lines += ["## Samples", "", "| task | lang | input | output | reference |", "|---|---|---|---|---|"]
        lines += samples + [""]
    if report.get("sweep"):
        lines += ["## Sampler sweep", "", "One setting changed at a time around the base sampler.", ""]
        lines += sweep_table(report["sweep"])
        factors = dict.fromkeys(r["factor"] for r in report["sweep"])
        lines += [""] + [f"![{f}](sweep_{f}.png)" for f in factors]
        lines.append("")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict], factor: str, path: Path) -> bool:
    """One PNG for a sweep factor: a panel per figure (:data:`PLOT_FIGURES` present), a line per task.
    Returns False when there is nothing to plot."""
    rows = [r for r in rows if r["factor"] == factor]
    figures = [f for f in PLOT_FIGURES if any(f in r for r in rows)]
    if not rows or not figures:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(r["value"] for r in rows))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    fig, axes = plt.subplots(1, len(figures), figsize=(3.2 * len(figures), 3.0), squeeze=False)
    for ax, figure in zip(axes[0], figures):
        for task in dict.fromkeys(r["task"] for r in rows):
            pts = [(r["value"], r[figure]) for r in rows if r["task"] == task and figure in r]
            if not pts:
                continue
            xs = [p[0] if numeric else values.index(p[0]) for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=task)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        elif factor in ("steps", "block_size") and min(values) > 0:
            ax.set_xscale("log", base=2)
        ax.set_title(figure)
        ax.set_xlabel(factor)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict, folder: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and one ``sweep_<factor>.png`` per swept factor into
    ``folder`` (created); returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with atomic_write(folder / "report.json") as handle:
        handle.write(json.dumps(report, ensure_ascii=False, indent=1, default=str) + "\n")
    paths.append(folder / "report.json")
    with atomic_write(folder / "report.md") as handle:
        handle.write(markdown(report))
    paths.append(folder / "report.md")
    for factor in dict.fromkeys(r["factor"] for r in report.get("sweep") or []):
        path = folder / f"sweep_{factor}.png"
        if plot_sweep(report["sweep"], factor, path):
            paths.append(path)
    return paths
