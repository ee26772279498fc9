"""Smoke benchmark of the BO engine on a synthetic additive compression landscape.

Compares, at the same number of trials (one at a time, as a single worker would run them):

- ``sobol``: the scrambled-Sobol design only;
- ``gp_on_J``: an off-the-shelf GP on J = kappa * L + R, the job run as a generic job;
- ``composite``: the engine's default (GP on log L, R exact, qLogNEI of kappa * exp(log L) + R);
- ``composite_additive``: the same with the first-order additive + full kernel.

Prints the median (over seeds) of the best noiseless J found, and the median seconds per
``propose``. Run: ``python bench/bo_engine_smoke.py [--d 8 --seeds 5 --trials 30]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bocompress.service.optimizer import Observation, Problem, propose, ratio  # noqa: E402
from bocompress.service.optimizer.synthetic import Landscape, make_landscape  # noqa: E402

METHODS = ("sobol", "gp_on_J", "composite", "composite_additive")


def run_one(method: str, ls: Landscape, seed: int, trials: int, n_initial: int, kappa: float) -> tuple[float, list[float]]:
    """One search; returns the best noiseless J and the seconds of each propose call."""
    objective = {"kind": "scalarized", "kappa": kappa, "cost": "params"}
    comp = Problem(params=ls.params, objective=objective, profile=ls.profile, n_initial=n_initial, seed=seed)
    if method == "gp_on_J":
        generic = [{"name": p["name"], "type": "float", "low": p["low"], "high": p["high"], "log": False} for p in ls.params]
        prob = Problem(params=generic, objective={"metric": "J", "direction": "minimize"}, profile=None,
                       n_initial=n_initial, seed=seed)
    else:
        prob = Problem(
            params=ls.params, objective=objective, profile=ls.profile, n_initial=n_initial, seed=seed,
            engine="sobol" if method == "sobol" else "auto",
            options={"kernel": "additive" if method == "composite_additive" else "rbf"},
        )
    g = torch.Generator().manual_seed(10_000 + seed)
    obs: list[Observation] = []
    state: dict | None = None
    best = float("inf")
    times: list[float] = []
    for i in range(trials):
        t0 = time.perf_counter()
        (theta,), state = propose(prob, obs, [], i, 1, state)
        if i >= n_initial:
            times.append(time.perf_counter() - t0)
        L, sem = ls.measure(theta, g)
        r = ratio(comp, theta)
        if method == "gp_on_J":
            obs.append(Observation(theta, kappa * L + r, kappa * sem))
        else:
            obs.append(Observation(theta, L, sem))
        best = min(best, kappa * ls.true_l(theta) + r)
    return best, times


def oracle(ls: Landscape, kappa: float, sweeps: int = 3) -> float:
    """Near-optimal noiseless J by coordinate descent over each layer's k / size grid."""
    comp = Problem(params=ls.params, objective={"kind": "scalarized", "kappa": kappa, "cost": "params"},
                   profile=ls.profile, n_initial=1, seed=0)
    theta = {p["name"]: p["high"] for p in ls.params}

    def j(t: dict[str, float]) -> float:
        return kappa * ls.true_l(t) + ratio(comp, t)

    best = j(theta)
    for _ in range(sweeps):
        for p in ls.params:
            size = int(p["size"])
            k_lo, k_hi = max(1, math.ceil(p["low"] * size - 1e-9)), math.floor(p["high"] * size + 1e-9)
            for k in range(k_lo, k_hi + 1):
                cand = dict(theta, **{p["name"]: k / size})
                v = j(cand)
                if v < best:
                    best, theta = v, cand
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--n-initial", type=int, default=8)
    ap.add_argument("--kappa", type=float, default=1.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
    print(f"d={args.d}, {args.trials} trials ({args.n_initial} Sobol), kappa={args.kappa}, {args.seeds} seeds")
    print(f"{'method':<20} {'median best J':>14} {'per seed':<48} {'s/propose':>9}")
    refs = [oracle(make_landscape(d=args.d, seed=s), args.kappa) for s in range(args.seeds)]
    per = " ".join(f"{b:.4f}" for b in refs)
    print(f"{'(coord. descent)':<20} {statistics.median(refs):>14.4f} {per:<48} {'':>9}", flush=True)
    for m in methods:
        bests, times = [], []
        for s in range(args.seeds):
            ls = make_landscape(d=args.d, seed=s)
            b, t = run_one(m, ls, s, args.trials, args.n_initial, args.kappa)
            bests.append(b)
            times += t
            print(f"  {m} seed {s}: best J {b:.4f}", file=sys.stderr, flush=True)
        per = " ".join(f"{b:.4f}" for b in bests)
        tm = statistics.median(times) if times else 0.0
        print(f"{m:<20} {statistics.median(bests):>14.4f} {per:<48} {tm:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
