"""Compression quality on trained deep networks: bocompress vs random, Optuna TPE, Ax and the
one-shot allocators, with the same evaluation code for all.

Cells: model x method x budget (``min L s.t. R <= budget``, R in parameters). Each optimizer gets the
same black box, in process:

- the worker's compressor (``bocompress.worker.methods.build_compressor``) applies theta;
- BatchNorm statistics are re-estimated on the calibration inputs (``--no-bn`` turns it off);
- L is the relative distillation error on the calibration inputs (``--calibration``, 128 images of
  the zoo model's training split); measurements are cached by the kept counts of theta, so a
  compressed model is paid for once per (model, method) whichever optimizer or budget asks for it;
- the best feasible theta of each search is then fine-tuned by distillation for a fixed
  ``--ft-steps`` (50; Adam, lr 3e-4, pruned weights kept at zero, batch 32, on the calibration inputs, BN
  re-estimated again), and
  the held-out accuracy (the 450 digits the zoo models never saw) is measured before and after.

Optimizers: ``random`` (uniform in the box), ``tpe`` (Optuna's TPESampler with the constraint),
``ax`` (Ax's default strategy, outcome constraint R <= budget), ``bocompress`` (the engine's
``propose`` as the service calls it for one worker, ``n_initial`` 8: the allocators' points first),
and each one-shot allocator (``uniform``, ``energy``, ``global``, ``knapsack``: one evaluation each,
from the profile's signals; signals the worker's profile lacks are measured here by the same
definitions, see :func:`ensure_signals`).

Also the rank correlation (Spearman) between -L and held-out accuracy after the fine-tune, with and
without BN re-estimation, over ``--spearman`` distinct points of each (model, method) at its first
budget; the page (``bench/compression_report.py``) also pools them per model. A budget below the
smallest R the space allows is reported as unreachable, as the service does, and not searched.

Run: ``python bench/compression_quality.py --quick`` (one seed, two models, fewer cells) or
without ``--quick`` for the full grid; ``--models``, ``--methods``, ``--budgets``, ``--seeds``,
``--trials``, ``--optimizers`` select; ``--device cuda`` runs the models on a GPU (the page then
says so); ``--json PATH`` saves the raw results, ``--from-json PATH`` re-renders the page.

The black box and its caches (:class:`Cell`, :func:`ensure_signals`, :func:`get_cell`) are in
``bench/quality_cells.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import quality_cells  # noqa: E402
from bench.quality_cells import Cell, ensure_signals, get_cell  # noqa: E402

MODELS = ("resnet20", "resnet56", "mobilenet", "transformer")
#: method label -> the method spec per model family (svd for the transformer's Linear layers).
METHODS = ("lowrank", "channel_l1", "magnitude")
BUDGETS = (0.5, 0.25)
OPTIMIZERS = ("random", "tpe", "ax", "bocompress", "uniform", "energy", "global", "knapsack")
#: Engine variants measured against the default (``--optimizers bocompress+tr ...``).
VARIANTS = {
    "bocompress+tr": {"trust_region": True},
    "bocompress+perturb": {"init": "perturb"},
    "bocompress+tr+perturb": {"trust_region": True, "init": "perturb"},
    "bocompress-alloc": {"seed_allocators": False},
}
ALLOCATOR_NAMES = ("uniform", "energy", "global", "knapsack")
N_INITIAL = 8
#: Where run_cell writes the runs of the cell in progress after each search (``--json`` + ``.partial``).
PARTIAL: Path | None = None


def _quiet() -> None:
    from bench.bo_quality import _quiet as quiet_peers  # the same quieting of Optuna, Ax and BoTorch

    quiet_peers()


# --------------------------------------------------------------------------- optimizers


def _box(cell: Cell) -> list[tuple[str, float, float]]:
    return [(p["name"], float(p["low"]), float(p["high"])) for p in cell.params]


def run_random(cell: Cell, seed: int, trials: int) -> list[tuple[dict, dict]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(trials):
        p = {n: rng.uniform(lo, hi) for n, lo, hi in _box(cell)}
        out.append((p, cell.measure(p)))
    return out


def run_tpe(cell: Cell, seed: int, trials: int) -> list[tuple[dict, dict]]:
    import optuna

    def constraints(ft: optuna.trial.FrozenTrial) -> list[float]:
        return [ft.user_attrs["R"] - cell.budget]

    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed, constraints_func=constraints))
    out = []
    for _ in range(trials):
        t = study.ask()
        p = {n: t.suggest_float(n, lo, hi) for n, lo, hi in _box(cell)}
        m = cell.measure(p)
        t.set_user_attr("R", m["R"])
        study.tell(t, m["L"])
        out.append((p, m))
    return out


def run_ax(cell: Cell, seed: int, trials: int) -> list[tuple[dict, dict]]:
    from ax.api.client import Client
    from ax.api.configs import RangeParameterConfig

    client = Client(random_seed=seed)
    client.configure_experiment(parameters=[RangeParameterConfig(name=n, parameter_type="float", bounds=(lo, hi))
                                            for n, lo, hi in _box(cell)])
    client.configure_optimization(objective="-L", outcome_constraints=[f"R <= {cell.budget}"])
    out = []
    for _ in range(trials):
        ((idx, p),) = client.get_next_trials(max_trials=1).items()
        p = {k: float(v) for k, v in p.items()}
        m = cell.measure(p)
        client.complete_trial(trial_index=idx, raw_data={"L": (m["L"], m["sem"]), "R": (m["R"], 0.0)})
        out.append((p, m))
    return out


def run_bocompress(cell: Cell, seed: int, trials: int, options: dict | None = None,
                   score: str = "L") -> list[tuple[dict, dict]]:
    """The engine's ``propose`` for one worker, ``min score s.t. R <= budget`` in the cell's cost.

    ``score`` is what the GP is given: ``L`` (the product's objective) or ``err`` (top-1 error on the
    labelled calibration inputs, its binomial standard error as noise).
    """
    from bocompress.service.optimizer import Observation, Problem, propose

    prob = Problem(cell.params, {"kind": "constrained", "budget": cell.budget, "cost": cell.cost}, cell.profile,
                   N_INITIAL, seed, options=options or None)
    obs: list[Observation] = []
    state: dict | None = None
    out = []
    for i in range(trials):
        pts, state = propose(prob, obs, [], i, 1, state)
        if not pts:  # every distinct point of the (integer-rank) space measured: the service ends the job here too
            break
        p = pts[0]
        m = cell.measure(p)
        assert m["R"] <= cell.budget + 1e-9, f"bocompress proposed R={m['R']} over the budget"
        if score == "L":
            obs.append(Observation(p, m["L"], m["sem"]))
        else:
            e = m[score]
            obs.append(Observation(p, e, math.sqrt(max(e * (1 - e), 1e-4) / len(cell.x_cal))))
        out.append((p, m))
    return out


def run_allocator(cell: Cell, name: str) -> list[tuple[dict, dict]]:
    from bocompress.service.optimizer.allocators import allocate

    a = allocate(name, cell.profile, cell.params, cell.budget, cell.cost)
    if a is None:
        return []
    return [(a.theta, cell.measure(a.theta))]


def best_feasible(history: list[tuple[dict, dict]]) -> tuple[dict, dict] | None:
    feas = [(p, m) for p, m in history if m["feasible"]]
    return min(feas, key=lambda pm: pm[1]["L"]) if feas else None


# --------------------------------------------------------------------------- running


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (proxy_quality's, average ranks for ties); NaN below 3 points."""
    from bench.proxy_quality import spearman as rank_correlation

    return rank_correlation(xs, ys) if len(xs) >= 3 else math.nan



def run_cell(model: str, method: str, budget: float, seeds: list[int], trials: int, optimizers: list[str],
             device: str, bn: bool, ft_steps: int, n_spearman: int, options: dict | None) -> dict[str, Any]:
    """One cell; ``n_spearman`` > 0 also measures the proxy's rank correlation on that many points."""
    t_cell = time.perf_counter()
    cell = get_cell(model, method, budget, device, bn, ft_steps)
    n0, s0 = cell.evals, cell.eval_seconds
    if cell.min_ratio > budget + 1e-12:  # as the service does: an unreachable budget is said at once
        print(f"  {cell.name}: unreachable, the smallest R this space allows is {cell.min_ratio:.3f}", flush=True)
        return {"model": model, "method": method, "budget": budget, "runs": [], "spearman": {},
                "unreachable": cell.min_ratio, "acc_original": cell.acc_original, "d": len(cell.params),
                "signals": {"layers": 0, "evals": 0, "seconds": 0.0}, "evals": 0, "eval_seconds": 0.0,
                "seconds": time.perf_counter() - t_cell, "device": device, "bn": bn, "ft_steps": ft_steps,
                "trials": trials, "seeds": seeds, "n_calibration": quality_cells.N_CALIBRATION}
    sig = ensure_signals(cell) if "knapsack" in optimizers else {"layers": 0, "evals": 0, "seconds": 0.0}
    runs: list[dict[str, Any]] = []
    for opt in optimizers:
        for seed in seeds if opt not in ALLOCATOR_NAMES else seeds[:1]:
            t0 = time.perf_counter()
            try:
                hist = _search(cell, opt, seed, trials, options)
            except Exception as e:  # noqa: BLE001 - one optimizer's failure is reported, the cell goes on
                print(f"  {cell.name} {opt} seed {seed} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                runs.append({"optimizer": opt, "seed": seed, "seconds": time.perf_counter() - t0, "n": 0,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            seconds = time.perf_counter() - t0
            best = best_feasible(hist)
            row: dict[str, Any] = {"optimizer": opt, "seed": seed, "seconds": seconds, "n": len(hist)}
            if best is not None:
                p, m = best
                row.update({"theta": p, "L": m["L"], "R": m["R"], **cell.finetune(p)})
            runs.append(row)
            if PARTIAL is not None:
                PARTIAL.write_text(json.dumps({"model": model, "method": method, "budget": budget, "runs": runs},
                                              default=str))
            print(f"  {cell.name} {opt} seed {seed}: L={row.get('L', math.nan):.4g} R={row.get('R', math.nan):.3f} "
                  f"acc {row.get('acc_before', math.nan):.3f} -> {row.get('acc_after', math.nan):.3f} "
                  f"({seconds:.0f} s)", flush=True)
    corr = proxy_correlation(cell, runs, n_spearman) if n_spearman > 0 else {}
    return {"model": model, "method": method, "budget": budget, "runs": runs, "spearman": corr,
            "acc_original": cell.acc_original, "d": len(cell.params), "signals": sig,
            "evals": cell.evals - n0, "eval_seconds": cell.eval_seconds - s0,
            "seconds": time.perf_counter() - t_cell, "device": device, "bn": bn, "ft_steps": ft_steps,
            "trials": trials, "seeds": seeds, "n_calibration": quality_cells.N_CALIBRATION}


def _search(cell: Cell, opt: str, seed: int, trials: int, options: dict | None) -> list[tuple[dict, dict]]:
    """One search (or one allocation) of the cell: its (theta, measurement) history."""
    if opt == "random":
        return run_random(cell, seed, trials)
    if opt == "tpe":
        return run_tpe(cell, seed, trials)
    if opt == "ax":
        return run_ax(cell, seed, trials)
    if opt == "bocompress":
        return run_bocompress(cell, seed, trials, options)
    if opt.startswith("bocompress+") or opt.startswith("bocompress-"):  # an engine variant under test
        return run_bocompress(cell, seed, trials, {**(options or {}), **VARIANTS[opt]})
    return run_allocator(cell, opt)


def proxy_correlation(cell: Cell, runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Spearman(-L, held-out accuracy after the fine-tune) over ``n`` distinct feasible points spread over L
    (the searches' bests, then random points), with and without BN re-estimation; the points are kept
    so the page can also pool them per model."""
    pts = sorted({cell.key(r["theta"]): r["theta"] for r in runs if "theta" in r}.values(),
                 key=lambda th: cell.measure(th)["L"])
    rnd = [p for p, m in run_random(cell, 12345, 3 * n) if m["feasible"]]
    pool = (pts + rnd)[: 2 * n]
    step = max(1, len(pool) // n)
    pool = pool[::step][:n]
    corr: dict[str, Any] = {"n": len(pool)}
    for use_bn in (True, False):
        pairs = []
        for th in pool:
            ft = cell.finetune(th, bn=use_bn)
            pairs.append((ft["L_before"], ft["acc_after"]))
        tag = "bn" if use_bn else "no_bn"
        corr[tag] = spearman([-x for x, _ in pairs], [y for _, y in pairs])
        corr[f"points_{tag}"] = pairs
    return corr


def merge_cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (model, method, budget): runs of the same cell from several invocations (more
    seeds, more optimizers) are pooled, in first-seen cell order; a run (optimizer, seed) seen twice
    keeps its first measurement."""
    out: dict[tuple, dict[str, Any]] = {}
    for res in results:
        k = (res["model"], res["method"], float(res["budget"]))
        if k not in out:
            out[k] = {**res, "runs": list(res["runs"]), "seeds": list(res.get("seeds", []))}
            continue
        cell = out[k]
        have = {(r["optimizer"], r["seed"]) for r in cell["runs"]}
        cell["runs"] += [r for r in res["runs"] if (r["optimizer"], r["seed"]) not in have]
        cell["seeds"] = sorted(set(cell["seeds"]) | set(res.get("seeds", [])))
        for key in ("evals", "eval_seconds", "seconds"):
            cell[key] = cell.get(key, 0) + res.get(key, 0)
        if not (cell.get("spearman") or {}).get("n") and (res.get("spearman") or {}).get("n"):
            cell["spearman"] = res["spearman"]
        if not cell["signals"].get("layers") and res["signals"].get("layers"):
            cell["signals"] = res["signals"]
    return list(out.values())


def main() -> None:
    global PARTIAL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one seed; resnet20 and mobilenet; lowrank and channel_l1; R <= 0.5; 20 trials")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--methods", nargs="*")
    ap.add_argument("--budgets", nargs="*", type=float)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed .. first-seed+seeds-1 (more seeds later; --from-json a,b pools them)")
    ap.add_argument("--trials", type=int, default=None, help="trials per search (default 30; 20 with --quick)")
    ap.add_argument("--optimizers", nargs="*")
    ap.add_argument("--ft-steps", type=int, default=50)
    ap.add_argument("--spearman", type=int, default=6,
                    help="points per (model, method), at its first budget, for the proxy's rank correlation")
    ap.add_argument("--calibration", type=int, default=quality_cells.N_CALIBRATION, help="calibration images per model")
    ap.add_argument("--no-bn", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--options", type=json.loads, default=None, help="engine options (Problem.options), JSON")
    ap.add_argument("--json")
    ap.add_argument("--from-json")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    _quiet()
    torch.set_num_threads(args.threads)
    quality_cells.N_CALIBRATION = args.calibration
    optimizers = list(args.optimizers or OPTIMIZERS)
    PARTIAL = Path(args.json + ".partial") if args.json else None
    if args.from_json and not args.optimizers:
        optimizers = list(dict.fromkeys(r["optimizer"] for path in args.from_json.split(",")
                                        for res in json.loads(Path(path).read_text())["results"] for r in res["runs"]))
    if args.from_json:
        results, argv, total = [], [], 0.0
        for path in args.from_json.split(","):  # several runs (e.g. one process per cell) on one page
            blob = json.loads(Path(path).read_text())
            results += blob["results"]
            argv = argv + (["+"] if argv else []) + blob["argv"]
            total += blob["seconds"]
        results = merge_cells(results)
    else:
        models = args.models or (["resnet20", "mobilenet"] if args.quick else list(MODELS))
        methods = args.methods or (["lowrank", "channel_l1"] if args.quick else list(METHODS))
        budgets = args.budgets or ([0.5] if args.quick else list(BUDGETS))
        seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
        trials = args.trials or (20 if args.quick else 30)
        argv = sys.argv[1:]
        t0 = time.perf_counter()
        results = []
        for model in models:
            for method in methods:
                for i, budget in enumerate(budgets):
                    print(f"cell {model}/{method}/R<={budget}", flush=True)
                    try:
                        results.append(run_cell(model, method, budget, seeds, trials, optimizers, args.device,
                                                not args.no_bn, args.ft_steps, args.spearman if i == 0 else 0,
                                                args.options))
                    except Exception as e:  # noqa: BLE001 - one cell that cannot run (no such layer) is reported
                        print(f"  cell failed: {type(e).__name__}: {e}", flush=True)
                    if args.json:  # after every cell, so a long run that is stopped keeps what it measured
                        Path(args.json).write_text(json.dumps({"results": results, "argv": sys.argv[1:],
                                                               "seconds": time.perf_counter() - t0}, default=str))
        total = time.perf_counter() - t0
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "argv": argv, "seconds": total}, default=str))
    from bench.compression_report import render

    body = render(results, optimizers, argv, total, not args.no_docs)
    print(body)
    if not args.no_docs:
        from bench._docs import write_section

        if args.quick:  # its own section: a quick run does not replace the full grid's tables
            write_section("compression-quality", "## Compression quality: the `--quick` subset", body,
                          key="compression-quality-quick")
        else:
            write_section("compression-quality", "## Compression quality on trained deep networks", body,
                          key="compression-quality")


if __name__ == "__main__":
    main()
