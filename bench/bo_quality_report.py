"""The tables, summary and plots of ``bench/bo_quality.py`` (split out of it: the runs there, the
reporting here)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.tasks import Task

#: Every method, in the order of the tables and plots (``bench/bo_quality.py`` runs them).
METHODS = ("random", "tpe", "optuna_gp", "ax", "gp_on_J", "bocompress")


# --------------------------------------------------------------------------- reporting


def best_so_far(scores: list[float]) -> list[float]:
    """Running minimum of per-trial scores (``inf`` until the first finite one)."""
    out, best = [], math.inf
    for s in scores:
        best = min(best, s)
        out.append(best)
    return out


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), ``inf`` entries sorting last."""
    ys = sorted(xs)
    if len(ys) == 1:
        return ys[0], ys[0], ys[0]
    q = statistics.quantiles(ys, n=4, method="inclusive") if all(math.isfinite(y) for y in ys) else None
    if q is None:
        def at(f: float) -> float:
            k = f * (len(ys) - 1)
            lo, hi = math.floor(k), math.ceil(k)
            if not (math.isfinite(ys[lo]) and math.isfinite(ys[hi])):
                return ys[hi]
            return ys[lo] + (ys[hi] - ys[lo]) * (k - lo)
        return at(0.25), at(0.5), at(0.75)
    return q[0], statistics.median(ys), q[2]


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "none feasible"
    return f"{x:.4g}"


def plot(task: Task, results: list[dict[str, Any]], path: Path) -> None:
    """Median (and IQR band) of the best-so-far score per trial, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        runs = [r for r in results if r["task"] == task.name and r["method"] == method]
        if not runs:
            continue
        curves = [best_so_far(r["scores"]) for r in runs]
        xs = list(range(1, task.trials + 1))
        med, lo, hi = [], [], []
        for i in range(task.trials):
            q25, q50, q75 = quantiles([c[i] for c in curves])
            med.append(q50 if math.isfinite(q50) else float("nan"))
            lo.append(q25 if math.isfinite(q25) else float("nan"))
            hi.append(q75 if math.isfinite(q75) else float("nan"))
        style = {"linewidth": 2.4} if method == "bocompress" else {"linewidth": 1.4}
        (line,) = ax.plot(xs, med, label=method, **style)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    if task.optimum is not None:
        ax.axhline(task.optimum, color="k", linestyle=":", linewidth=1, label="optimum")
    ax.set_xlabel("trial")
    ax.set_ylabel({"synthetic": "best value", "scalarized": "best J = L + R",
                   "constrained": f"best feasible L (R <= {task.budget})"}[task.kind])
    if task.kind != "synthetic" or task.name in ("ackley10", "rosenbrock6", "powell8", "griewank8"):
        ax.set_yscale("log")
    ax.set_title(f"{task.title}\nmedian best-so-far over seeds, IQR band", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finals(results: list[dict[str, Any]], task: str, method: str) -> list[float]:
    return [best_so_far(r["scores"])[-1] for r in results if r["task"] == task and r["method"] == method]


def table(tasks: list[Task], results: list[dict[str, Any]], methods: list[str]) -> str:
    """Markdown table, one row per task: median [IQR] of the final best score per method, and the
    number of seeds where a method ran on fewer than the others."""
    n_max = max((len(_finals(results, t.name, m)) for t in tasks for m in methods), default=0)
    lines = ["| task (trials) | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for t in tasks:
        cells = []
        for m in methods:
            finals = _finals(results, t.name, m)
            if not finals:
                cells.append("—")
                continue
            q25, q50, q75 = quantiles(finals)
            few = f" ({len(finals)} seeds)" if len(finals) < n_max else ""
            cells.append(f"{_fmt(q50)} [{_fmt(q25)}, {_fmt(q75)}]{few}")
        lines.append(f"| {t.title} ({t.trials}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(results: list[dict[str, Any]], methods: list[str], tasks: list[Task]) -> str:
    """Markdown table: median seconds per search."""
    lines = ["| method | " + " | ".join(t.name for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        cells = []
        for t in tasks:
            secs = [r["seconds"] for r in results if r["task"] == t.name and r["method"] == m]
            cells.append(f"{statistics.median(secs):.1f}" if secs else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PEERS = ("tpe", "optuna_gp", "ax")


def summary(tasks: list[Task], results: list[dict[str, Any]], methods: list[str]) -> str:
    """Which tasks bocompress's median final score wins and loses, against each baseline and
    against the best peer (TPE, Optuna GP, Ax: whichever of them ran, on the seeds they ran)."""
    def med(task: str, method: str) -> float | None:
        finals = _finals(results, task, method)
        return quantiles(finals)[1] if finals else None

    if "bocompress" not in methods:
        return ""
    out = []
    for base in [m for m in ("random",) + PEERS if m in methods]:
        better, worse = [], []
        for t in tasks:
            ours, theirs = med(t.name, "bocompress"), med(t.name, base)
            if ours is None or theirs is None:
                continue
            (better if ours < theirs else worse).append(f"{t.name} ({_fmt(ours)} vs {_fmt(theirs)})")
        if not better and not worse:
            continue
        out.append(f"Against {base}, bocompress's median is lower on {len(better)} of {len(better) + len(worse)} "
                   f"tasks" + (f"; not lower on {', '.join(worse)}" if worse else "") + ".")
    at_best, behind = [], []
    for t in tasks:
        ours = med(t.name, "bocompress")
        peers = {m: med(t.name, m) for m in PEERS if m in methods}
        peers = {m: v for m, v in peers.items() if v is not None}
        if ours is None or not peers:
            continue
        best_m = min(peers, key=lambda m: peers[m])  # type: ignore[arg-type, return-value]
        (at_best if ours <= peers[best_m] else behind).append(
            f"{t.name} ({_fmt(ours)} vs {best_m} {_fmt(peers[best_m])})")  # type: ignore[arg-type]
    if at_best or behind:
        out.append(f"At or below the best peer's median on {len(at_best)} of {len(at_best) + len(behind)} tasks"
                   + (f": {', '.join(at_best)}" if at_best else "")
                   + (f"; behind it on {', '.join(behind)}" if behind else "") + ".")
    return " ".join(out)
