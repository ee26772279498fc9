"""How informative is the proxy L on a trained deep network? Writes docs/proxy.md.

For a trained ResNet-20 on digits upsampled to 3x32x32 (calibration: training images; held out:
the 450 test digits), with the worker's own code (``bocompress.worker.proxy.measure_trial``):

1. uniform theta at R ~ 0.5 and R ~ 0.75 (params) for ``channel_l1`` and ``tucker2 + svd``:
   L and held-out accuracy without/with BatchNorm re-estimation, and without/with the
   least-squares correction;
2. ~20 random per-layer theta per method (each method's default least squares): Spearman rank
   correlation of L (with and without BN re-estimation) with held-out accuracy, as measured and
   after a short distillation fine-tune.

Usage::

    python -m bench.proxy_quality --weights PATH/resnet20.safetensors [--random 20] [--finetune-steps 50]

Without ``--weights`` it uses the zoo's shipped ``resnet20`` weights when they exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from bocompress.costs import ratio
from bocompress.worker.evaluate import teacher_outputs
from bocompress.worker.proxy import Holdout, ProxyOptions, measure_trial
from bocompress.worker.methods import CompressorOptions, build_compressor
from bocompress.worker.zoo import load_model
from bocompress.worker.zoo.data import digits_split

DOC = Path(__file__).resolve().parents[1] / "docs" / "proxy.md"
METHODS = {"channel_l1": "channel_l1", "tucker2+svd": {"Conv2d": "tucker2", "Linear": "svd"}}
THETA_MIN = 0.05


def digits32(x: torch.Tensor) -> torch.Tensor:
    """The zoo's ``digits32`` transform (bilinear 32x32, 3 equal channels, standardized)."""
    try:
        from bocompress.worker.zoo.data import to_digits32  # the zoo branch

        return to_digits32(x)
    except ImportError:
        up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return ((up - 0.305) / 0.324).expand(-1, 3, -1, -1).contiguous()


def load(weights: str | None, n_calib: int) -> tuple[torch.nn.Module, Any]:
    model = load_model("resnet20")
    if weights:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
    model.eval()
    x_tr, _, x_te, y_te = digits_split()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x_tr), generator=gen)[:n_calib].sort().values
    calib = digits32(x_tr[idx])
    held = digits32(x_te)
    teacher = teacher_outputs(model, calib)
    hold = Holdout(held, y_te, teacher_outputs(model, held))
    return model, SimpleNamespace(inputs=calib, teacher=teacher, labels=None, holdout=hold)


def context(model: torch.nn.Module, data: Any, method: Any, ls: bool | None) -> SimpleNamespace:
    comp = build_compressor(model, method, ["*"], THETA_MIN, data.inputs[:8],
                            CompressorOptions(calib_inputs=data.inputs, ls_correction=ls))
    return SimpleNamespace(compressor=comp, inputs=data.inputs, teacher=data.teacher, labels=None,
                           holdout=data.holdout, device=torch.device("cpu"), cost_kind="params", proxy=None)


def uniform_theta(comp: Any, target: float) -> dict[str, float]:
    """One theta for every layer, bisected so that R(theta) is the closest to ``target``."""
    prof = comp.profile()
    names = [p["name"] for p in prof["params"]]
    lo, hi = THETA_MIN, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if ratio(prof, {n: mid for n in names}) > target:
            hi = mid
        else:
            lo = mid
    return {n: lo for n in names}


def random_thetas(comp: Any, count: int, seed: int) -> list[dict[str, float]]:
    """Per-layer thetas spread from mild to heavy compression: a random level plus per-layer noise."""
    rng = random.Random(seed)
    names = [p["name"] for p in comp.profile()["params"]]
    out = []
    for _ in range(count):
        level = rng.uniform(0.25, 1.0)
        out.append({n: min(1.0, max(THETA_MIN, level + rng.gauss(0.0, 0.2))) for n in names})
    return out


def measure(ctx: Any, theta: dict[str, float], bn: bool, steps: int = 0) -> dict[str, float]:
    ctx.proxy = ProxyOptions(bn_recalibrate=bn, finetune_steps=steps, finetune_lr=1e-3)
    return measure_trial(ctx, theta)["values"]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="safetensors of a trained resnet20 (default: the zoo's)")
    ap.add_argument("--n-calibration", type=int, default=256)
    ap.add_argument("--random", type=int, default=20, help="random thetas per method for the rank correlation")
    ap.add_argument("--finetune-steps", type=int, default=50, help="distillation steps for 'after fine-tune' (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, data = load(args.weights, args.n_calibration)
    acc0 = float((data.holdout.teacher.argmax(1) == data.holdout.labels).float().mean())
    lines = [
        "# Proxy quality on a trained ResNet-20",
        "",
        f"_Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `bench/proxy_quality.py` on CPU "
        f"({args.threads} threads)._ ResNet-20 trained on digits upsampled to 3x32x32 "
        f"(original held-out accuracy **{acc0:.1%}** on the 450 test digits); L on {args.n_calibration} "
        "training images (the calibration part), accuracy on the 450 held-out test digits. Every number comes "
        "from `bocompress.worker.proxy.measure_trial`, the code a worker runs for a trial.",
        "",
        "## Uniform theta (one theta for every layer, bisected to the target R in parameters)",
        "",
        "| method | target R | R | LS correction | L (no BN re-est.) | acc. (no BN) | L (BN re-est.) | acc. (BN) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, method in METHODS.items():
        ls_options = [False, True]
        for target in (0.5, 0.75):
            for ls in ls_options:
                ctx = context(model, data, method, ls)
                theta = uniform_theta(ctx.compressor, target)
                off, on = measure(ctx, theta, False), measure(ctx, theta, True)
                ls_txt = {None: "n/a", False: "off", True: "on"}[ls]
                lines.append(
                    f"| {label} | {target} | {on['ratio']:.3f} | {ls_txt} | {off['distill_l2']:.3f} | "
                    f"{off['accuracy']:.1%} | {on['distill_l2']:.3f} | {on['accuracy']:.1%} |"
                )
                print(lines[-1], flush=True)
    if args.random > 0:
        lines += [
            "",
            f"## Rank correlation over {args.random} random per-layer theta",
            "",
            "Each theta: a random level in [0.25, 1] plus N(0, 0.2) per layer, clipped to [0.05, 1]. "
            "Spearman's rho between L and held-out accuracy (a good proxy gives a strongly negative rho). "
            + (f"'After fine-tune': the same model after {args.finetune_steps} distillation steps (Adam, lr 1e-3, "
               "batch 64, on the calibration images), BN re-estimated before and after."
               if args.finetune_steps else ""),
            "",
            "| method | rho(L no BN, acc. no BN) | rho(L BN, acc. BN) | rho(L no BN, acc. after fine-tune) | "
            "rho(L BN, acc. after fine-tune) | median acc. no BN / BN / fine-tuned |",
            "|---|---|---|---|---|---|",
        ]
        for label, method in METHODS.items():
            ctx = context(model, data, method, None)
            rows = []
            for theta in random_thetas(ctx.compressor, args.random, seed=1):
                off, on = measure(ctx, theta, False), measure(ctx, theta, True)
                ft = measure(ctx, theta, True, args.finetune_steps) if args.finetune_steps else None
                rows.append((off, on, ft))
            l_off = [r[0]["distill_l2"] for r in rows]
            l_on = [r[1]["distill_l2"] for r in rows]
            a_off = [r[0]["accuracy"] for r in rows]
            a_on = [r[1]["accuracy"] for r in rows]
            a_ft = [r[2]["accuracy"] for r in rows] if args.finetune_steps else None

            def med(v: list[float]) -> float:
                return sorted(v)[len(v) // 2]

            ft1 = f"{spearman(l_off, a_ft):+.2f}" if a_ft else "—"
            ft2 = f"{spearman(l_on, a_ft):+.2f}" if a_ft else "—"
            meds = f"{med(a_off):.1%} / {med(a_on):.1%} / " + (f"{med(a_ft):.1%}" if a_ft else "—")
            lines.append(f"| {label} | {spearman(l_off, a_off):+.2f} | {spearman(l_on, a_on):+.2f} | {ft1} | {ft2} | {meds} |")
            print(lines[-1], flush=True)
    lines += ["", f"Total time: {time.perf_counter() - t_start:.0f} s.", ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(lines)
    old = DOC.read_text() if DOC.exists() else ""
    if "<!-- notes -->" in old:  # hand-written notes below the marker are kept
        body += "\n" + old[old.index("<!-- notes -->"):]
    DOC.write_text(body)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
