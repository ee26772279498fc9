"""Studies 1 and 2 (Ma et al., ICCV 2019).

1. **Per-layer θ by BO vs one θ for every layer** at equal R: the engine's constrained search
   (``min L s.t. R <= budget``) vs the uniform allocator (one θ at the target R), R <= 0.5 and
   R <= 0.25, with ``lowrank`` (tucker2 on the convolutions, svd on the linear layers: the paper's
   methods) and ``channel_l1`` (channel pruning, the product's default for MobileNet-style nets).
2. **The distillation proxy**: the same search given top-1 error on the labelled calibration inputs
   instead of L; the held-out accuracy of each search's best at equal R. The paper's claim: L is as
   good a proxy as the error for choosing θ.
"""

from __future__ import annotations

from typing import Any

from bench.paper.common import FT_STEPS, log, search
from bench.quality_cells import Cell

CELLS = (("resnet20", "lowrank"), ("resnet20", "channel_l1"), ("mobilenet", "lowrank"), ("mobilenet", "channel_l1"))
#: The (model, method) pairs of study 2: those where the top-1 error on the calibration inputs is not 0 for
#: most θ at these budgets (with lowrank on ResNet-20 both objectives find the same point).
PROXY = (("resnet20", "channel_l1"), ("mobilenet", "channel_l1"))
BUDGETS = (0.5, 0.25)


def run(cells: tuple[tuple[str, str], ...] = CELLS, budgets: tuple[float, ...] = BUDGETS, seeds: int = 2,
        trials: int = 24, proxy: tuple[tuple[str, str], ...] = PROXY) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    for model, method in cells:
        cell = Cell(model, method, budgets[0], ft_steps=FT_STEPS)
        for budget in budgets:
            cell.budget = budget
            info = {"model": model, "method": method, "budget": budget, "d": len(cell.params),
                    "acc_original": cell.acc_original, "min_ratio": cell.min_ratio}
            infos.append(info)
            if cell.min_ratio > budget:
                log(f"  {model}/{method} R<={budget}: unreachable (smallest R {cell.min_ratio:.3f})")
                continue
            plan = [("uniform", 0, "L")] + [("bo", s, "L") for s in range(seeds)]
            if (model, method) in proxy:
                plan += [("bo", s, "err") for s in range(seeds)]
            for opt, seed, score in plan:
                row = {"model": model, "method": method, "budget": budget, **search(cell, opt, seed, trials, score)}
                rows.append(row)
                log(f"  {model}/{method} R<={budget} {opt}[{score}] seed {seed}: L={row.get('L', float('nan')):.4g} "
                    f"R={row.get('R', float('nan')):.3f} acc {row.get('acc_before', float('nan')):.3f} -> "
                    f"{row.get('acc_after', float('nan')):.3f} ({row['seconds']:.0f} s)")
    return {"rows": rows, "cells": infos, "seeds": seeds, "trials": trials, "ft_steps": FT_STEPS}
