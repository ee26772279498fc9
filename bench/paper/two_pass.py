"""Study 6: the two-pass recipe of Ma et al. (VGG-16) vs one pass at the same total R.

- **One pass**: one search over every layer (tucker2 on the convolutions, svd on the linear layers),
  ``R <= budget`` of the whole model's parameters, then the fixed distillation fine-tune.
- **Two passes**: search the convolutions alone (the linear layers dense) with each group held to the
  budget of its own parameters, fine-tune the result by distillation, then search the linear layers of
  the fine-tuned model (L now measured against it, as the paper does) so that the final model keeps
  at most ``budget`` of the original's parameters; then the same fixed fine-tune as the one pass.

``digits-cnn`` (two convolutions and three linear layers, most parameters in the linear ones, as in
VGG-16) is the zoo model with both kinds of layer worth compressing; the ResNets' one linear layer is
0.2% of their parameters and the transformer has no convolution.
"""

from __future__ import annotations

import time
from typing import Any

from bench.compression_quality import best_feasible, run_bocompress
from bench.paper.common import FT_STEPS, log
from bench.quality_cells import Cell
from bocompress.costs import searched_cost

MODEL = "digits-cnn"


def run(budgets: tuple[float, ...] = (0.25, 0.1), seeds: int = 2, trials: int = 24) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        for seed in range(seeds):
            # one pass
            t0 = time.perf_counter()
            one = Cell(MODEL, "lowrank", budget, ft_steps=FT_STEPS, spec={"Conv2d": "tucker2", "Linear": "svd"})
            p, m = best_feasible(run_bocompress(one, seed, trials)) or (None, None)
            ft = one.finetune(p)
            rows.append({"recipe": "one pass", "budget": budget, "seed": seed, "R": m["R"], "L": m["L"], **ft,
                         "seconds": time.perf_counter() - t0, "acc_original": one.acc_original})
            # one pass, the fine-tune doubled (the two passes fine-tune twice)
            again = one._build(p, True)
            one.finetune_model(again)  # in place: the first fine-tune ...
            twice = one.finetune_model(again)  # ... and a second one, as the two passes get
            rows.append({"recipe": "one pass, 2x fine-tune", "budget": budget, "seed": seed, "R": m["R"],
                         "L": m["L"], **{**ft, "acc_after": twice["acc_after"], "L_after": twice["L_after"]},
                         "seconds": time.perf_counter() - t0, "acc_original": one.acc_original})
            log(f"  two-pass study R<={budget} seed {seed}: one pass L={m['L']:.4g} R={m['R']:.3f} "
                f"acc {ft['acc_before']:.3f} -> {ft['acc_after']:.3f} (2x FT {twice['acc_after']:.3f})")
            # two passes
            t0 = time.perf_counter()
            conv = Cell(MODEL, "lowrank", budget, ft_steps=FT_STEPS, spec={"Conv2d": "tucker2"})
            total = float(conv.profile["totals"]["params"])
            p_conv = searched_cost(conv.profile, "params")
            rest = total - p_conv  # params the conv search does not touch (linear layers, biases ...)
            conv.budget = min(1.0, (budget * p_conv + rest) / total)  # the convolutions at `budget` of their own
            p1, m1 = best_feasible(run_bocompress(conv, seed, trials)) or (None, None)
            mid = conv._build(p1, True)
            ft1 = conv.finetune_model(mid)  # mid is fine-tuned in place, against the original's outputs
            lin = Cell(MODEL, "lowrank", 1.0, ft_steps=FT_STEPS, spec={"Linear": "svd"}, module=mid)
            p_mid = float(lin.profile["totals"]["params"])
            lin.budget = min(1.0, budget * total / p_mid)  # the final model keeps <= budget of the original's
            if lin.min_ratio > lin.budget:
                log(f"  two-pass study R<={budget} seed {seed}: the linear pass cannot reach R <= {lin.budget:.3f} "
                    f"(smallest {lin.min_ratio:.3f})")
                continue
            p2, m2_ = best_feasible(run_bocompress(lin, seed, trials)) or (None, None)
            final = lin._build(p2, True)
            R_total = m2_["R"] * p_mid / total
            L_final = conv._l(final)[0]  # against the ORIGINAL's outputs, as the one pass is measured
            acc_before = conv._accuracy(final)
            ft2 = conv.finetune_model(final)
            rows.append({"recipe": "two passes", "budget": budget, "seed": seed, "R": R_total, "L": L_final,
                         "R_conv_pass": m1["R"], "L_conv_pass": m1["L"], "acc_mid": ft1["acc_after"],
                         "R_linear_pass": m2_["R"], "L_linear_pass": m2_["L"],
                         "acc_before": acc_before, "acc_after": ft2["acc_after"], "L_after": ft2["L_after"],
                         "seconds": time.perf_counter() - t0, "acc_original": conv.acc_original})
            log(f"  two-pass study R<={budget} seed {seed}: two passes L={L_final:.4g} R={R_total:.3f} "
                f"acc {acc_before:.3f} -> {ft2['acc_after']:.3f}")
    return {"rows": rows, "model": MODEL, "seeds": seeds, "trials": trials, "ft_steps": FT_STEPS}
