"""Search quality of the bocompress BO engine against random search, Optuna and Ax.

Every method gets the same trial budget on each task (``bench/tasks.py``) and runs one trial at a
time (bocompress through :func:`bocompress.service.optimizer.propose`, sequentially, as the service calls it
for a single worker). Methods:

- ``random``: uniform draws in the box;
- ``tpe``: Optuna's ``TPESampler`` (defaults);
- ``optuna_gp``: Optuna's ``GPSampler`` (defaults);
- ``ax``: Ax's default generation strategy through ``ax.api.Client``;
- ``gp_on_J`` (compression tasks): bocompress run as a generic job on the scalar J (the penalized
  L for the constrained task), i.e. an off-the-shelf GP on J without the structure;
- ``bocompress``: the engine as the service runs it (compression tasks: the composite objective,
  GP on log L with the exact R; synthetic tasks: the generic GP).

Constrained task (min L s.t. R <= 0.4): Optuna's samplers get ``constraints_func`` (R - 0.4) and
Ax an outcome constraint ``R <= 0.4`` (each learns R from the reported values); random search and
``gp_on_J`` see the penalized L. The score is the best *feasible* L. Every point bocompress
proposes for this task is asserted to fit the budget.

Writes a median best-so-far plot per task (``docs/bo_quality_<task>.png``) and the table of final
values (median and interquartile range over seeds) into ``docs/benchmarks.md``.

Run: ``python bench/bo_quality.py [--seeds 5 --first-seed 0 --workers 2 --suite classic|rough|synthetic|all
--tasks ... --methods ...]`` (``--suite`` names a set of tasks, ``bench.tasks.SUITES``; ``--tasks``, when given,
overrides it; the default is ``classic``, the five tasks the page had before the rough suite);
``--no-docs`` prints only, ``--options JSON`` passes engine options (``Problem.options``) to
bocompress and ``gp_on_J`` for experiments (``{"bench_n_initial": 5}`` changes their ``n_initial``),
``--json PATH`` saves the raw per-trial scores and ``--from-json PATH[,PATH...]`` re-renders the tables,
the summary and docs/ from such files without running anything (several files are merged: e.g. one
run of the peers and one of bocompress).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tasks import SUITES, Task, make_tasks  # noqa: E402

from bench.bo_quality_report import METHODS, best_so_far, plot, quantiles, summary, table, timing, _fmt  # noqa: E402,F401
DOCS = Path(__file__).resolve().parents[1] / "docs"
#: The Sobol initial design of bocompress (the service's default ``n_initial``).
N_INITIAL = 8


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name in ("ax", "ax.api", "ax.service", "ax.modelbridge", "ax.generation_strategy", "botorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------- methods


def run_random(task: Task, seed: int) -> list[dict[str, float]]:
    """Uniform random search; returns each trial's measurement."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(task.trials):
        p = {n: rng.uniform(lo, hi) for n, lo, hi in task.bounds()}
        m = task.measure(p)
        out.append(m)
    return out


def _optuna(task: Task, seed: int, sampler_name: str) -> list[dict[str, float]]:
    import optuna

    constraints = None
    if task.kind == "constrained":
        def constraints(ft: optuna.trial.FrozenTrial) -> list[float]:
            return [ft.user_attrs["R"] - float(task.budget)]  # type: ignore[arg-type]

    if sampler_name == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, constraints_func=constraints)
    else:
        sampler = optuna.samplers.GPSampler(seed=seed, constraints_func=constraints)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    out: list[dict[str, float]] = []
    for _ in range(task.trials):
        t = study.ask()
        p = {n: t.suggest_float(n, lo, hi) for n, lo, hi in task.bounds()}
        m = task.measure(p)
        out.append(m)
        if task.compression:
            t.set_user_attr("R", m["R"])
            study.tell(t, m["L"] if task.kind == "constrained" else m["J"])
        else:
            study.tell(t, m["value"])
    return out


def run_tpe(task: Task, seed: int) -> list[dict[str, float]]:
    """Optuna TPE (defaults; native constraints on the constrained task)."""
    return _optuna(task, seed, "tpe")


def run_optuna_gp(task: Task, seed: int) -> list[dict[str, float]]:
    """Optuna GPSampler (defaults; native constraints on the constrained task)."""
    return _optuna(task, seed, "gp")


def run_ax(task: Task, seed: int) -> list[dict[str, float]]:
    """Ax's default generation strategy (``ax.api.Client``), one trial at a time."""
    from ax.api.client import Client
    from ax.api.configs import RangeParameterConfig

    client = Client(random_seed=seed)
    client.configure_experiment(
        parameters=[RangeParameterConfig(name=n, parameter_type="float", bounds=(lo, hi)) for n, lo, hi in task.bounds()]
    )
    if task.kind == "constrained":
        client.configure_optimization(objective="-L", outcome_constraints=[f"R <= {task.budget}"])
    elif task.kind == "scalarized":
        client.configure_optimization(objective="-J")
    else:
        client.configure_optimization(objective="-y")
    out: list[dict[str, float]] = []
    for _ in range(task.trials):
        ((idx, p),) = client.get_next_trials(max_trials=1).items()
        m = task.measure({k: float(v) for k, v in p.items()})
        out.append(m)
        if task.kind == "constrained":
            raw = {"L": (m["L"], m["sem"]), "R": (m["R"], 0.0)}
        elif task.kind == "scalarized":
            raw = {"J": (m["J"], m["sem"])}
        else:
            raw = {"y": (m["value"], 0.0)}
        client.complete_trial(trial_index=idx, raw_data=raw)
    return out


def _bocompress(task: Task, seed: int, on_j: bool, options: dict | None) -> list[dict[str, float]]:
    from bocompress.service.optimizer import Observation, Problem, propose

    options = dict(options or {}) or None
    n_initial = int(options.pop("bench_n_initial", N_INITIAL)) if options else N_INITIAL

    if task.compression and not on_j:
        objective: dict[str, Any] = {"kind": task.kind, "kappa": 1.0, "cost": "params"}
        if task.kind == "constrained":
            objective["budget"] = task.budget
        prob = Problem(task.params, objective, task.profile, n_initial, seed, options=options)
    else:
        params = [{"name": n, "type": "float", "low": lo, "high": hi, "log": False} for n, lo, hi in task.bounds()]
        metric = "J" if task.compression else "y"
        prob = Problem(params, {"metric": metric, "direction": "minimize"}, None, n_initial, seed, options=options)
    obs: list[Observation] = []
    state: dict | None = None
    out: list[dict[str, float]] = []
    for i in range(task.trials):
        (p,), state = propose(prob, obs, [], i, 1, state)
        m = task.measure(p)
        out.append(m)
        if task.kind == "constrained" and not on_j:
            assert m["R"] <= float(task.budget) + 1e-12, f"bocompress proposed R={m['R']} over the budget {task.budget}: {p}"
        if not task.compression:
            obs.append(Observation(p, m["value"], 0.0))  # noiseless, as Ax is told
        elif on_j:
            obs.append(Observation(p, m["J"], m["sem"]))
        else:
            obs.append(Observation(p, m["L"], m["sem"]))
    return out


def run_gp_on_J(task: Task, seed: int, options: dict | None = None) -> list[dict[str, float]]:
    """bocompress as a generic job on the scalar J (no structure)."""
    return _bocompress(task, seed, True, options)


def run_bocompress(task: Task, seed: int, options: dict | None = None) -> list[dict[str, float]]:
    """bocompress as the service runs it."""
    return _bocompress(task, seed, False, options)


RUNNERS = {
    "random": run_random,
    "tpe": run_tpe,
    "optuna_gp": run_optuna_gp,
    "ax": run_ax,
    "gp_on_J": run_gp_on_J,
    "bocompress": run_bocompress,
}


def _job(args: tuple[str, str, int, dict | None]) -> dict[str, Any]:
    """One (task, method, seed) search in a worker process; returns its per-trial scores."""
    task_name, method, seed, options = args
    import torch

    torch.set_num_threads(1)
    _quiet()
    (task,) = make_tasks([task_name])
    t0 = time.perf_counter()
    if method in ("gp_on_J", "bocompress"):
        ms = RUNNERS[method](task, seed, options)
    else:
        ms = RUNNERS[method](task, seed)
    elapsed = time.perf_counter() - t0
    scores = [task.score(m) for m in ms]
    return {"task": task_name, "method": method, "seed": seed, "scores": scores, "seconds": elapsed}


def _run(
    tasks: list[Task], methods: list[str], seeds: int, first_seed: int, workers: int, options: dict | None,
    save: Callable[[list[dict[str, Any]], float], None] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Every (task, method, seed) search on a process pool; returns the results and the wall time.

    ``save``, if given, is called with the results so far after every search (a run stopped early
    keeps what it finished)."""
    jobs = []
    for t in tasks:
        for m in methods:
            if m == "gp_on_J" and not t.compression:
                continue  # on a synthetic task, bocompress *is* a GP on the value
            for s in range(first_seed, first_seed + seeds):
                jobs.append((t.name, m, s, options))
    # Slow searches first, so the pool does not end on one long straggler.
    cost = {"ax": 5, "optuna_gp": 3, "bocompress": 3, "gp_on_J": 3, "tpe": 1, "random": 0}
    size = {t.name: t.trials * t.d for t in tasks}
    jobs.sort(key=lambda j: -(cost[j[1]] * size[j[0]]))
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=20) as pool:
        for r in pool.imap_unordered(_job, jobs):
            results.append(r)
            final = best_so_far(r["scores"])[-1]
            print(f"[{time.perf_counter() - t0:7.1f}s] {r['task']:<17} {r['method']:<11} seed {r['seed']}: "
                  f"best {_fmt(final)} ({r['seconds']:.1f}s)", file=sys.stderr, flush=True)
            if save is not None:
                save(results, time.perf_counter() - t0)
    return results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--suite", default=None, choices=sorted(SUITES),
                    help="a named set of tasks (classic: the original five; rough: the BoTorch suite; all)")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (overrides --suite)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--options", default=None, help="JSON engine options for bocompress and gp_on_J (experiments)")
    ap.add_argument("--json", default=None, help="also write the raw per-trial scores here")
    ap.add_argument("--no-docs", action="store_true", help="print only; do not write docs/")
    ap.add_argument("--from-json", default=None, help="re-render the tables and docs from a --json file; run nothing")
    args = ap.parse_args()
    if args.tasks:
        task_names = [t for t in args.tasks.split(",") if t]
    else:
        task_names = list(SUITES[args.suite or ("all" if args.from_json else "classic")])
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
    options = json.loads(args.options) if args.options else None
    if args.from_json:
        results, total = [], 0.0
        for part in args.from_json.split(","):
            saved = json.loads(Path(part).read_text())
            if isinstance(saved, list):
                saved = {"results": saved}
            results += saved["results"]
            total += float(saved.get("total_s", math.nan))
            args.workers = int(saved.get("workers", args.workers))
        seeds = sorted({r["seed"] for r in results})
        args.seeds, args.first_seed = len(seeds), seeds[0]
        present = {r["task"] for r in results}
        task_names = [t for t in task_names if t in present]
        methods = [m for m in methods if any(r["method"] == m for r in results)]
        tasks = make_tasks(task_names)
    else:
        tasks = make_tasks(task_names)
        def save(res: list[dict[str, Any]], secs: float) -> None:
            if args.json:
                Path(args.json).write_text(json.dumps({"results": res, "total_s": secs, "workers": args.workers}))

        results, total = _run(tasks, methods, args.seeds, args.first_seed, args.workers, options, save)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "total_s": total, "workers": args.workers}))
    tab = table(tasks, results, methods)
    tim = timing(results, methods, tasks)
    summ = summary(tasks, results, methods)
    print(tab)
    if summ:
        print()
        print(summ)
    print()
    print(tim)
    print(f"\ntotal {total:.0f} s on {args.workers} processes")
    if args.no_docs:
        return
    from bench._docs import write_section

    pngs = []
    for t in tasks:
        path = DOCS / f"bo_quality_{t.name}.png"
        plot(t, results, path)
        pngs.append(f"![{t.title}]({path.name})")
    body = (
        f"Median [IQR] over up to {args.seeds} seeds (seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; "
        "a cell run on fewer says how many) of the "
        "final best score (lower is better), every method with the same trial budget per task, one trial at a "
        "time. Synthetic tasks: the best noiseless function value found (each method is told the values are "
        "exact: sem 0; Branin min 0.3979, Hartmann6 min -3.3224, Ackley min 0; Ackley on [-5, 10]^10, so its "
        "optimum is not at the centre). The rough suite (`--suite rough`, `bench/tasks.py:ROUGH`): BoTorch's "
        "synthetic test functions, 40 trials each; minima Rosenbrock 0, Levy 0, Styblinski-Tang-8 -313.3, "
        "Michalewicz-5 -4.688, Griewank 0, Rastrigin 0, Powell 0 (Hartmann-4: BoTorch gives none); where the "
        "optimum sits at (or within a tenth of the width of) the centre of BoTorch's box (Levy, Griewank, "
        "Rastrigin, Powell) the box is translated per dimension by a seeded 15-35 % of its width with a random "
        "sign (`shifted_box`, the same box for every method and seed). Compression tasks (zoo `digits-cnn`, Tucker-2 on the convolutions + "
        "SVD on the linear layers, 5 layers, real relative distillation L on the 450 held-out digits, reported "
        "with its standard error): scalarized J = L + R with R the exact parameter ratio; constrained: the "
        f"best L among trials with R <= 0.4. bocompress's initial design is the service default "
        f"n_initial = {N_INITIAL} (generic jobs: the centre of the box, then Sobol points; compression jobs: "
        "Sobol points), then the GP; Ax's default is the centre + 4 Sobol points (5), then its GP; Optuna "
        "(TPE, GPSampler) uses its own defaults. On the constrained task Optuna gets `constraints_func` and "
        "Ax an outcome constraint (both learn R); random search and `gp_on_J` see the penalized L; every "
        f"point bocompress proposed there was asserted to fit the budget. From one set of {args.seeds} seeds to another a "
        "median can move by as much as the IQR shown (Ackley-10 most of all), so differences "
        "smaller than the IQRs are not established by this table.\n\n"
        + tab
        + ("\n\n" + summ if summ else "")
        + "\n\nMedian seconds per search (all trials, evaluation included, one torch thread):\n\n"
        + tim
        + (f"\n\nWhole run: {total / 60:.1f} min on {args.workers} processes.\n\n" if math.isfinite(total) else "\n\n")
        + "\n".join(pngs)
        + "\n"
    )
    write_section("bo-quality", "## BO search quality: bocompress vs random, Optuna, Ax", body, key="bo-quality")


if __name__ == "__main__":
    main()
