"""Studies 1 and 2 (Ma et al., ICCV 2019).

1. **Per-layer θ by BO vs one θ for every layer** at equal R: the engine's constrained search
   (``min L s.t. R <= budget``) vs the uniform allocator (one θ at the target R), tucker2 on the
   convolutions and svd on the linear layers, R <= 0.5 and R <= 0.25.
2. **The distillation proxy**: the same search given top-1 error on the labelled calibration inputs
   instead of L; the held-out accuracy of each search's best at equal R. The paper's claim: L is as
   good a proxy as the error for choosing θ.
"""

from __future__ import annotations

from typing import Any

from bench.paper.common import FT_STEPS, log, search
from bench.quality_cells import Cell

MODELS = ("resnet20", "mobilenet")
BUDGETS = (0.5, 0.25)


def run(models: tuple[str, ...] = MODELS, budgets: tuple[float, ...] = BUDGETS, seeds: int = 2,
        trials: int = 24, proxy_models: tuple[str, ...] = ("resnet20",)) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for model in models:
        cell = Cell(model, "lowrank", budgets[0], ft_steps=FT_STEPS)
        for budget in budgets:
            cell.budget = budget
            info = {"model": model, "budget": budget, "d": len(cell.params), "acc_original": cell.acc_original,
                    "min_ratio": cell.min_ratio}
            cells.append(info)
            if cell.min_ratio > budget:
                log(f"  {model} R<={budget}: unreachable (smallest R {cell.min_ratio:.3f})")
                continue
            plan = [("uniform", 0, "L")] + [("bo", s, "L") for s in range(seeds)]
            if model in proxy_models:
                plan += [("bo", s, "err") for s in range(seeds)]
            for opt, seed, score in plan:
                row = {"model": model, "budget": budget, **search(cell, opt, seed, trials, score)}
                rows.append(row)
                log(f"  {model} R<={budget} {opt}[{score}] seed {seed}: L={row.get('L', float('nan')):.4g} "
                    f"R={row.get('R', float('nan')):.3f} acc {row.get('acc_before', float('nan')):.3f} -> "
                    f"{row.get('acc_after', float('nan')):.3f} ({row['seconds']:.0f} s)")
    return {"rows": rows, "cells": cells, "seeds": seeds, "trials": trials, "ft_steps": FT_STEPS}
