"""ChipNet as a product feature: one ChipNet job per budget type, through the service and a worker.

For each budget type (``channels``, ``activation``, ``params``, ``flops``) a ChipNet job on the
zoo's trained ``resnet20`` (``channel_l1``, ``constrained`` at ``--budget``, calibration data
``digits32-train``) runs on a real service (SQLite) and a real worker subprocess; the table has
the job's one trial as the API shows it: R (exact, from the layer table), L, held-out accuracy,
and the job's wall time. Then, for the params job's trial, the exports with each retraining mode
(``--retrain-epochs``) and their held-out accuracy.

Usage::

    python -m bench.chipnet_jobs [--epochs 1] [--gate-lr 0.05] [--budget 0.5] [--retrain-epochs 1]

Prints a markdown table (not a test; writes nothing).
"""

from __future__ import annotations

import argparse
import time

from bocompress import Client
from bench._local import local_service

BUDGETS = ("channels", "activation", "params", "flops")
MODES = ("finetune-distill", "finetune-labels", "scratch-e", "scratch-b")


def _wait(client: Client, path: str, done: tuple[str, ...], timeout: float = 1800.0) -> dict:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        out = client._json("GET", path)
        if out["state"] in done:
            return out
        time.sleep(0.5)
    raise TimeoutError(path)


def main(argv: list[str] | None = None) -> None:
    """Run the jobs and print the tables."""
    ap = argparse.ArgumentParser(prog="python -m bench.chipnet_jobs", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--gate-lr", type=float, default=0.05)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--n-calibration", type=int, default=512)
    ap.add_argument("--retrain-epochs", type=int, default=1)
    args = ap.parse_args(argv)
    with local_service("bocompress-chipnet-") as (client, work):
        print(f"ChipNet jobs on resnet20 (digits32-train, n_calibration {args.n_calibration}), budget "
              f"{args.budget}, {args.epochs} epoch(s), gate_lr {args.gate_lr}\n")
        print("| budget type | R (exact) | \\|R - budget\\| | L | held-out accuracy | original | job wall s |")
        print("|---|---|---|---|---|---|---|")
        params_trial = None
        for kind in BUDGETS:
            t0 = time.perf_counter()
            job = client.create_job({
                "name": f"chipnet-{kind}",
                "compression": {"model": "resnet20", "data": "digits32-train", "method": "channel_l1",
                                "n_calibration": args.n_calibration, "sensitivity": False},
                "objective": {"kind": "constrained", "budget": args.budget, "cost": kind},
                "optimizer": {"engine": "chipnet", "chipnet": {"epochs": args.epochs, "gate_lr": args.gate_lr}}})
            out = _wait(client, f"/jobs/{job.id}", ("completed", "failed", "cancelled"))
            secs = time.perf_counter() - t0
            if out["state"] != "completed":
                print(f"| {kind} | {out['state']}: {out.get('reason')} | | | | | {secs:.0f} |")
                continue
            v = out["best"]["values"]
            print(f"| {kind} | {v['ratio']:.4f} | {abs(v['ratio'] - args.budget):.4f} | {v['distill_l2']:.4f} | "
                  f"{v['accuracy']:.4f} | {v['accuracy_original']:.4f} | {secs:.0f} |")
            if kind == "params":
                params_trial = (job, out["best"])
        if params_trial is None:
            return
        job, trial = params_trial
        # a ChipNet trial is exported as trained; retraining applies to BO trials: one uniform-θ
        # BO trial at the same R for comparison
        bo = client.create_job({
            "name": "uniform-params",
            "compression": {"model": "resnet20", "data": "digits32-train", "method": "channel_l1",
                            "n_calibration": args.n_calibration, "sensitivity": False},
            "objective": {"kind": "constrained", "budget": args.budget, "cost": "params"},
            "optimizer": {"engine": "uniform"}})
        out = _wait(client, f"/jobs/{bo.id}", ("completed", "failed", "cancelled"))
        best = out["best"]
        print(f"\nRetraining the uniform-θ channel_l1 trial at R = {best['values']['ratio']:.4f} "
              f"(held-out accuracy {best['values']['accuracy']:.4f} as measured), {args.retrain_epochs} epoch(s):\n")
        print("| mode | epochs trained | held-out accuracy before | after | L after | wall s |")
        print("|---|---|---|---|---|---|")
        for mode in MODES:
            t0 = time.perf_counter()
            bo.export(best["id"], retrain={"mode": mode, "epochs": args.retrain_epochs})
            exp = _wait(client, f"/jobs/{bo.id}/trials/{best['id']}/export", ("completed", "failed", "cancelled"))
            v = exp["values"]
            print(f"| {mode} | {v.get('retrain_epochs', 0):.0f} | {v.get('accuracy_before', float('nan')):.4f} | "
                  f"{v.get('accuracy', float('nan')):.4f} | {v.get('distill_l2', float('nan')):.4f} | "
                  f"{time.perf_counter() - t0:.0f} |")


if __name__ == "__main__":
    main()
