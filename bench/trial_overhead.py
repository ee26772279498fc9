"""Trial overhead per compression method: trial time / a bare forward pass of the compressed model.

A trial on a worker is ``compressor.apply(theta)`` (truncate cached factorizations, build the
new module) plus ``evaluate`` (forward over the calibration set, L with its standard error,
exact and measured R, accuracy). The bare forward pass is the compressed model alone over the
same calibration set, the cost no method can avoid. The factorizations themselves are computed
once per job per worker and are not part of a trial.

Writes the table to docs/benchmarks.md (section "Trial overhead") and prints it.

    .venv/bin/python bench/trial_overhead.py [--repeats 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._docs import write_section  # noqa: E402
from bocompress.worker.evaluate import evaluate, teacher_outputs  # noqa: E402
from bocompress.worker.methods import build_compressor  # noqa: E402
from bocompress.worker.zoo import load_data, load_model  # noqa: E402

CASES = [
    # model, data, n calibration, methods
    ("digits-cnn", "digits", 450, ["svd", "tucker2", "magnitude", "channel_l1", "channel_lasso"]),
    ("resnet20", "synthetic", 512, ["svd", "tucker2", "magnitude", "channel_l1", "channel_lasso"]),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_time(model: torch.nn.Module, x: torch.Tensor, device: torch.device, bs: int = 512) -> float:
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            model(x[i:i + bs])
        _sync(device)
    return time.perf_counter() - t0


def run(repeats: int, device_name: str) -> list[dict]:
    device = torch.device(device_name)
    torch.manual_seed(0)
    rows = []
    for arch, data, n, methods in CASES:
        model = load_model(arch).to(device)
        x, y = load_data(data, n, arch=arch)
        x = x.to(device)
        y = y.to(device) if y is not None else None
        teacher = teacher_outputs(model, x, 512, device=device)
        for method in methods:
            try:
                comp = build_compressor(model, method, ["*"], 0.05, x[:32])
            except Exception as exc:  # noqa: BLE001 - a method that does not apply to this model
                rows.append({"model": arch, "method": method, "error": str(exc)[:80]})
                continue
            prof = comp.profile()
            gen = torch.Generator().manual_seed(1)
            trials, fwds = [], []
            for r in range(repeats + 1):
                theta = {p["name"]: p["low"] + float(torch.rand(1, generator=gen)) * (p["high"] - p["low"])
                         for p in prof["params"]}
                _sync(device)
                t0 = time.perf_counter()
                student = comp.apply(theta)
                evaluate(comp, student, x, teacher, y, theta, "params", 512, device=device)
                _sync(device)
                t_trial = time.perf_counter() - t0
                t_fwd = min(forward_time(student, x, device) for _ in range(3))
                if r > 0:  # the first round warms caches up
                    trials.append(t_trial)
                    fwds.append(t_fwd)
            tr, fw = statistics.median(trials), statistics.median(fwds)
            rows.append({"model": arch, "method": method, "n": n, "d": len(prof["params"]),
                         "trial_ms": 1000 * tr, "forward_ms": 1000 * fw, "ratio": tr / fw})
    return rows


def table(rows: list[dict], device: str, repeats: int) -> str:
    out = [f"Device: {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads); median of {repeats} trials at random θ; goal ≤ 1.3×.", "",
           "| model | method | calib. n | θ dims | trial (ms) | bare forward (ms) | trial ÷ forward |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['method']} | – | – | – | – | n/a: {r['error']} |")
        else:
            out.append(f"| {r['model']} | {r['method']} | {r['n']} | {r['d']} | {r['trial_ms']:.1f} | "
                       f"{r['forward_ms']:.1f} | {r['ratio']:.2f}× |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = run(args.repeats, args.device)
    text = table(rows, args.device, args.repeats)
    print(text)
    if not args.no_write:
        write_section("trial-overhead", f"## Trial overhead ({args.device})", text,
                      key=f"trial-overhead-{args.device.split(':')[0]}")


if __name__ == "__main__":
    main()
