"""What the studies share: the fixed settings, seeded searches, and one row per compressed model."""

from __future__ import annotations

import math
import time
from typing import Any

from bench.compression_quality import best_feasible, run_allocator, run_bocompress
from bench.compression_report import _med
from bench.quality_cells import Cell

#: BO trials per search (the issue: a fixed budget <= 60).
TRIALS = 24
#: Steps of the fixed distillation fine-tune (Adam 3e-4, batch 32, on the calibration inputs).
FT_STEPS = 100


def search(cell: Cell, optimizer: str, seed: int, trials: int, score: str = "L") -> dict[str, Any]:
    """One search (``bo``) or one allocation (``uniform``, ``global``...) of ``cell``, its best feasible
    θ fine-tuned: a row with L, R, held-out accuracy before/after the fixed fine-tune, seconds."""
    t0 = time.perf_counter()
    if optimizer == "bo":
        hist = run_bocompress(cell, seed, trials, score=score)
    else:
        hist = run_allocator(cell, optimizer)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"optimizer": optimizer, "seed": seed, "score": score, "n": len(hist),
                           "seconds": seconds}
    if score != "L" and hist:  # the best by the score searched alone: among equal errors the first found, not the lowest L
        feas = [(p, m) for p, m in hist if m["feasible"]]
        best = min(feas, key=lambda pm: pm[1][score]) if feas else None
    else:
        best = best_feasible(hist)
    if best is None:
        row["error"] = "no feasible point"
        return row
    theta, m = best
    row.update({"theta": theta, "L": m["L"], "R": m["R"], "err_cal": m.get("err"), **cell.finetune(theta)})
    return row


def median(rows: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over the rows that have a finite one (NaN for none)."""
    return _med([float(r[key]) for r in rows if r.get(key) is not None])


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2g}"
    return str(x)


def log(msg: str) -> None:
    print(msg, flush=True)
