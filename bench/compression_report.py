"""The page of ``bench/compression_quality.py``: per-cell tables, the summary against the goals, the
proxy's rank correlation per model, and a plot per model."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs"
ALLOCATOR_NAMES = ("uniform", "energy", "global", "knapsack")
#: The label of the product's default engine in the runs (the row the goals are judged on).
PRIMARY = "bocompress"


def _med(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def _f(x: float, nd: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}g}" if nd > 3 else f"{x:.{nd}f}"


def med(res: dict[str, Any], opt: str, key: str) -> float:
    """Median over seeds of one optimizer's ``key`` in a cell (NaN when it has none)."""
    return _med([r.get(key, math.nan) for r in res["runs"] if r["optimizer"] == opt])


def cell_title(res: dict[str, Any]) -> str:
    return f"{res['model']}/{res['method']}/R<={res['budget']}"


def cell_table(res: dict[str, Any], optimizers: list[str]) -> str:
    lines = ["| optimizer | L (median) | held-out acc before FT | after FT | R | seconds |",
             "|---|---|---|---|---|---|"]
    for opt in optimizers:
        rows = [r for r in res["runs"] if r["optimizer"] == opt]
        if not rows:
            continue
        if not any("L" in r for r in rows):
            lines.append(f"| {opt} | not available (no signals) or none feasible | | | | |")
            continue
        lines.append(f"| {opt} | {_f(med(res, opt, 'L'), 4)} | {_f(med(res, opt, 'acc_before'))} | "
                     f"{_f(med(res, opt, 'acc_after'))} | {_f(med(res, opt, 'R'))} | "
                     f"{_med([r['seconds'] for r in rows]):.0f} |")
    return "\n".join(lines)


def goals(res: dict[str, Any]) -> dict[str, Any]:
    """The cell against the goals: accuracy after the fine-tune >= the best allocator's and uniform's;
    L below TPE's and Ax's (medians over seeds)."""
    bo_acc, bo_l = med(res, PRIMARY, "acc_after"), med(res, PRIMARY, "L")
    allocs = {a: med(res, a, "acc_after") for a in ALLOCATOR_NAMES}
    allocs = {a: v for a, v in allocs.items() if math.isfinite(v)}
    best_a = max(allocs, key=lambda a: allocs[a]) if allocs else None
    out: dict[str, Any] = {"bo_acc": bo_acc, "bo_L": bo_l, "best_alloc": best_a,
                           "best_alloc_acc": allocs.get(best_a, math.nan) if best_a else math.nan,
                           "uniform_acc": allocs.get("uniform", math.nan)}
    # uniform is one of the allocators, so at least the best of them is at least uniform too.
    out["acc_ok"] = bool(math.isfinite(bo_acc) and all(bo_acc >= v - 1e-9 for v in allocs.values()))
    for other in ("tpe", "ax", "random"):
        o = med(res, other, "L")
        out[f"{other}_L"] = o
        # A peer that found nothing feasible loses to any feasible result.
        out[f"L_below_{other}"] = bool(math.isfinite(bo_l) and (not math.isfinite(o) or bo_l < o))
    return out


def verdict(res: dict[str, Any]) -> list[str]:
    """Plain statements of where bocompress does not meet the goal in this cell."""
    g = goals(res)
    out = []
    if math.isfinite(g["bo_acc"]) and g["best_alloc"] and not g["acc_ok"]:
        out.append(f"bocompress's accuracy after the fine-tune ({g['bo_acc']:.3f}) is **below** the best allocator's "
                   f"({g['best_alloc']}, {g['best_alloc_acc']:.3f}) or uniform's ({_f(g['uniform_acc'])}).")
    for other in ("tpe", "ax"):
        if not g[f"L_below_{other}"] and math.isfinite(g["bo_L"]):
            out.append(f"bocompress's L ({g['bo_L']:.4g}) is **not lower** than {other}'s ({g[f'{other}_L']:.4g}).")
    return out


def summary_table(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """One row per cell, and the counts the goals are judged on."""
    lines = [f"| cell | {PRIMARY} L | its acc after FT | best allocator (acc after FT) | uniform | TPE L | Ax L | "
             "random L | goals |", "|---|---|---|---|---|---|---|---|---|"]
    n = acc_ok = l_ok = 0
    for res in results:
        if "unreachable" in res:
            lines.append(f"| {cell_title(res)} | unreachable: the smallest R this space allows is "
                         f"{res['unreachable']:.3f} | | | | | | | not run |")
            continue
        g = goals(res)
        n += 1
        acc_ok += g["acc_ok"]
        both = g["L_below_tpe"] and g["L_below_ax"]
        l_ok += both
        mark = ("acc ✓" if g["acc_ok"] else "acc ✗") + (", L ✓" if both else ", L ✗")
        lines.append(f"| {cell_title(res)} | {_f(g['bo_L'], 4)} | {_f(g['bo_acc'])} | {g['best_alloc']} "
                     f"({_f(g['best_alloc_acc'])}) | {_f(g['uniform_acc'])} | {_f(g['tpe_L'], 4)} | "
                     f"{_f(g['ax_L'], 4)} | {_f(g['random_L'], 4)} | {mark} |")
    return "\n".join(lines), {"cells": n, "acc_ok": acc_ok, "l_ok": l_ok}


def pooled_spearman(results: list[dict[str, Any]]) -> str:
    """Spearman(-L, held-out accuracy after the fine-tune) per model, pooling its cells' points."""
    from bench.proxy_quality import spearman

    lines = ["| model | points | with BN re-estimation | without | per cell (with / without) |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in results):
        cells = [r for r in results if r["model"] == model and r.get("spearman", {}).get("n")]
        if not cells:
            continue
        row = []
        for tag in ("bn", "no_bn"):
            pts = [tuple(p) for c in cells for p in c["spearman"].get(f"points_{tag}", [])]
            row.append(spearman([-x for x, _ in pts], [y for _, y in pts]) if len(pts) >= 3 else math.nan)
        per = "; ".join(f"{c['method']} {_f(c['spearman'].get('bn', math.nan), 2)} / "
                        f"{_f(c['spearman'].get('no_bn', math.nan), 2)}" for c in cells)
        n = sum(c["spearman"]["n"] for c in cells)
        lines.append(f"| {model} | {n} | {_f(row[0], 2)} | {_f(row[1], 2)} | {per} |")
    return "\n".join(lines)


def plot_model(model: str, results: list[dict[str, Any]], optimizers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in results if r["model"] == model and "unreachable" not in r]
    if not cells:
        return
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
    for ax, res in zip(axes[0], cells):
        for i, opt in enumerate(optimizers):
            rows = [r for r in res["runs"] if r["optimizer"] == opt and "L" in r]
            if not rows:
                continue
            ax.scatter([r["L"] for r in rows], [r["acc_after"] for r in rows], label=opt, s=28,
                       marker="o*sD^v<>p"[i % 9])
        ax.set_xscale("log")
        ax.set_xlabel("L (best feasible)")
        ax.set_ylabel("held-out accuracy after fine-tune")
        ax.axhline(res["acc_original"], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{res['method']}, R <= {res['budget']}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{model}: compression quality per optimizer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(results: list[dict[str, Any]], optimizers: list[str], argv: list[str], total_s: float,
           write_docs: bool) -> str:
    parts = []
    dev = {r["device"] for r in results}
    parts.append(f"Command: `python bench/compression_quality.py {' '.join(argv)}`, total {total_s / 60:.1f} min on "
                 f"{', '.join(sorted(dev))}" + (" (a CUDA run: labelled as such; the product is tested on CPU)"
                                                if "cuda" in dev else " (2 cores shared with other work)") + ".")
    r0 = next((r for r in results if "unreachable" not in r), results[0])
    ncal = r0.get("n_calibration", 256)
    parts.append(f"Per cell: {r0['trials']} trials per search, seeds {r0['seeds']}; the allocators are one "
                 f"evaluation each (deterministic, one seed). Black box: the worker's compressor, BatchNorm "
                 f"re-estimated on {ncal} training images ({'on' if r0['bn'] else 'off'}), L on them; "
                 f"the best feasible theta of each search fine-tuned {r0['ft_steps']} distillation steps, held-out "
                 f"accuracy on the 450 digits the zoo models never saw. Medians over seeds.")
    table, counts = summary_table(results)
    notes = []
    cells = []
    for res in results:
        head = (f"### {res['model']}, {res['method']}, R <= {res['budget']} ({res['d']} parameters; original "
                f"held-out accuracy {res['acc_original']:.3f}")
        if "unreachable" in res:
            cells.append(head + f"): unreachable — the smallest R this search space allows is "
                                f"{res['unreachable']:.3f}, so no search ran; the service fails such a job at once "
                                "with that message.")
            continue
        cells.append(head + f"; {res['evals']} distinct models measured, cell {res['seconds'] / 60:.1f} min)")
        cells.append(cell_table(res, optimizers))
        s = res.get("spearman") or {}
        if s.get("n"):
            cells.append(f"Spearman(-L, held-out accuracy after fine-tune) over {s.get('n')} points: "
                         f"{_f(s.get('bn', math.nan), 2)} with BN re-estimation, {_f(s.get('no_bn', math.nan), 2)} "
                         "without.")
        if res["signals"]["layers"]:
            cells.append(f"Sensitivity curves measured here for the knapsack: {res['signals']['layers']} parameters, "
                         f"{res['signals']['evals']} evaluations, {res['signals']['seconds']:.0f} s (not counted as "
                         "trials).")
        v = verdict(res)
        if v:
            cells.append("**Where bocompress falls short here:** " + " ".join(v))
            notes.extend(f"{cell_title(res)}: {x}" for x in v)
    n = max(counts["cells"], 1)
    parts.append(f"**Summary.** Of {counts['cells']} cells run (unreachable ones excluded), {PRIMARY}'s median "
                 f"held-out accuracy after the fine-tune is at least the best allocator's and uniform's in "
                 f"{counts['acc_ok']} ({100 * counts['acc_ok'] / n:.0f}%), and its median L is below both TPE's "
                 f"and Ax's in {counts['l_ok']} ({100 * counts['l_ok'] / n:.0f}%)."
                 + (f" Where it falls short, the cell says so ({len(notes)} statement(s))." if notes else ""))
    parts.append(table)
    parts.append("Proxy quality — Spearman(−L, held-out accuracy after the fine-tune), per model, pooling the "
                 "points measured in its cells:\n\n" + pooled_spearman(results))
    parts.extend(cells)
    if write_docs:
        for model in dict.fromkeys(r["model"] for r in results):
            path = DOCS / f"compression_quality_{model}.png"
            plot_model(model, results, optimizers, path)
            if path.exists():
                parts.append(f"![{model}]({path.name})")
    return "\n\n".join(parts)
