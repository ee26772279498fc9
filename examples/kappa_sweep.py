"""Batch: the same model at several κ (how much fidelity is worth against size), side by side.

    python examples/kappa_sweep.py --kappas 0.5 1 2 4 [--url URL] [--token TOKEN] [--trials 20]

The same sweep as a YAML file for the CLI is `examples/kappa_sweep.yaml`:
``bocompress submit examples/kappa_sweep.yaml --wait``.
"""

from __future__ import annotations

import argparse

import bocompress


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description="κ sweep")
    ap.add_argument("--url", default=None)
    ap.add_argument("--token", default=None)
    ap.add_argument("--kappas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    client = bocompress.Client(args.url, token=args.token)
    specs = [{
        "name": f"{args.model}-kappa{k:g}",
        "compression": {"model": args.model, "data": "digits", "method": {"Conv2d": "tucker2", "Linear": "svd"}},
        "objective": {"kind": "scalarized", "kappa": k},
        "budget": {"max_trials": args.trials, "max_parallel": 2},
        "optimizer": {"n_initial": min(8, args.trials), "seed": 0},
    } for k in args.kappas]
    jobs = client.submit_many(specs)
    rows = []
    for k, job in zip(args.kappas, jobs):
        job.wait(progress=not args.no_progress)
        best = job.best()
        v = best["values"] if best else {}
        rows.append({"kappa": k, "job": job.id, "state": job.state, "R": v.get("ratio"), "L": v.get("distill_l2"),
                     "accuracy": v.get("accuracy")})
    print(f"{'kappa':>6} {'job':>5} {'R':>7} {'L':>8} {'accuracy':>9}")
    for r in rows:
        fmt = lambda x, f: format(x, f) if isinstance(x, float) else "-"  # noqa: E731
        print(f"{r['kappa']:>6g} {r['job']:>5} {fmt(r['R'], '7.3f')} {fmt(r['L'], '8.4f')} {fmt(r['accuracy'], '9.3f')}")
    return rows


if __name__ == "__main__":
    main()
