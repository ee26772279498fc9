"""``bocompress demo``: the whole system on one machine, in about a minute.

Starts the service on a temporary SQLite database and local worker processes, submits a
compression job for the zoo's digits CNN (Tucker-2 on the convolutions, SVD on the linear layers,
``minimize L subject to R <= 0.5``), shows its progress, then prints the best trial layer by
layer, its cost ratio R, distillation error L and accuracy against the original's, and the
Pareto set. The subprocesses are always stopped, also on Ctrl-C; the temporary directory is
deleted unless ``keep``.

The demo meets its bar when the best trial keeps at most half the parameters (R <= 0.5) and loses
at most 2 points of accuracy on the held-out digits; otherwise :class:`DemoFailed` is raised (the
command line prints it and exits with status 1).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import BocompressError
from .procs import ROOT, NotHealthy, ProcessGroup, free_port, wait_healthy
from .spec import JobSpec

__all__ = ["DemoFailed", "DemoResult", "demo_spec", "run_demo", "MAX_RATIO", "MAX_ACCURACY_DROP"]

#: The demo's bar: the best trial keeps at most this fraction of the parameters ...
MAX_RATIO = 0.5
#: ... and loses at most this much accuracy (a fraction: 0.02 = 2 points).
MAX_ACCURACY_DROP = 0.02
#: Seconds to wait for the service to answer /healthz.
STARTUP_TIMEOUT = 90.0


class DemoFailed(BocompressError):
    """The demo did not run to the end, or its best trial missed the bar."""


@dataclass
class DemoResult:
    """What the demo found.

    Attributes:
        job_id: the demo job's id.
        best: the best trial (the service's JSON).
        ratio: R of the best trial.
        distill_l2: L of the best trial.
        accuracy: its accuracy on the calibration (held-out) digits.
        accuracy_original: the original model's accuracy on the same samples.
        pareto: the Pareto set, trials sorted by R.
        seconds: wall time of the whole demo.
        workdir: the temporary directory (deleted unless ``keep``).
    """

    job_id: int
    best: dict[str, Any]
    ratio: float
    distill_l2: float
    accuracy: float
    accuracy_original: float
    pareto: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    workdir: str = ""


def demo_spec(trials: int, workers: int = 1) -> dict[str, Any]:
    """The demo job: digits CNN, Tucker-2 convs + SVD linears, min L s.t. R <= 0.5.

    Args:
        trials: the trial budget.
        workers: local workers (trials run in parallel up to this many).
    """
    return {
        "name": "demo-digits-cnn",
        "compression": {
            "model": "digits-cnn",
            "data": "digits",
            "method": {"Conv2d": "tucker2", "Linear": "svd"},
            "layers": ["*"],
            "theta_min": 0.05,
            "n_calibration": 450,  # every held-out digit: L and accuracy on the full test split
        },
        "objective": {"kind": "constrained", "budget": MAX_RATIO, "cost": "params"},
        "budget": {"max_trials": int(trials), "max_parallel": max(1, int(workers)), "lease_seconds": 60},
        "optimizer": {"n_initial": max(2, min(8, int(trials) // 3)), "seed": 0},
    }


def _stop(procs: ProcessGroup, worker_timeout: float = 15.0, service_timeout: float = 5.0) -> None:
    """Stop the workers (SIGTERM: each hands back its trial), then the service; SIGKILL what lingers.

    The service goes last and gets a short grace: its database is a temporary file, and a
    proposal being computed when it stops is of no use to anyone.
    """
    procs.stop(worker_timeout, only=lambda name: name != "service")
    procs.stop(service_timeout, only=lambda name: name == "service")


def _wait_healthy(url: str, procs: ProcessGroup, timeout: float) -> None:
    def started() -> None:
        dead = procs.died()
        if dead:
            raise DemoFailed("the service did not start: " + "\n".join(dead))

    try:
        wait_healthy(url, timeout, check=started, interval=0.25)
    except NotHealthy as exc:
        raise DemoFailed(f"the service at {exc}") from None


class _Watchdog(threading.Thread):
    """Cancels the demo job when one of the demo's processes dies, so that waiting on it ends."""

    def __init__(self, procs: ProcessGroup, url: str, job_id: int) -> None:
        super().__init__(name="demo-watchdog", daemon=True)
        self.procs, self.url, self.job_id = procs, url, job_id
        self.problem = ""
        self._stop_event = threading.Event()

    def run(self) -> None:
        from .client import Client

        while not self._stop_event.wait(0.5):
            dead = self.procs.died()
            if dead:
                self.problem = "a demo process died:\n" + "\n".join(dead)
                try:
                    with Client(self.url, token=None, timeout=5.0, max_retries=0) as c:
                        c.get_job(self.job_id).cancel()
                except BocompressError:
                    pass  # the service itself is gone: the wait fails on its own
                return

    def stop(self) -> None:
        self._stop_event.set()


def _kept_text(layer: Mapping[str, Any], theta: Mapping[str, float]) -> str:
    """``kept/size`` of every count the layer's theta multiplies (rank; in/out ranks for Tucker-2)."""
    from .costs import kept

    pairs: list[tuple[str, int]] = []
    for form in layer["costs"].values():
        for term in form["terms"]:
            for f in term["factors"]:
                key = (f["param"], int(f["size"]))
                if key not in pairs:
                    pairs.append(key)
        break  # one cost kind lists them all
    return ", ".join(f"{kept(float(theta[p]), s)}/{s}" for p, s in pairs) or "-"


def _layer_table(layers: Sequence[Mapping[str, Any]], theta: Mapping[str, float], kind: str) -> str:
    from .costs import form_cost

    header = ("layer", "type", "method", "shape", "theta", "kept (rank or channels)", "layer R")
    rows = []
    for layer in layers:
        params = [p for p in layer["params"] if p in theta]
        th = ", ".join(f"{theta[p]:.3f}" for p in params) or "-"
        if kind in layer["costs"] and layer["dense"].get(kind):
            r = form_cost(layer["costs"][kind], theta) / float(layer["dense"][kind])
            r_text = f"{r:.3f}" + (" (dense)" if r >= 1.0 - 1e-12 else "")
        else:
            r_text = "-"
        rows.append((layer["name"], layer["type"], layer["method"], "x".join(str(s) for s in layer["shape"]),
                     th, _kept_text(layer, theta), r_text))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _pareto_table(pareto: Sequence[Mapping[str, Any]]) -> str:
    lines = ["  trial      R          L   accuracy", "  -----  -----  ---------  --------"]
    for t in pareto:
        v = t.get("values") or {}
        acc = v.get("accuracy")
        lines.append(f"  {t.get('number', t['id']):>5}  {v.get('ratio', float('nan')):5.3f}  "
                     f"{v.get('distill_l2', float('nan')):9.3g}  {'' if acc is None else f'{acc:8.2%}'}")
    return "\n".join(lines)


def report(job: Any, started: float, out: IO[str] | None = None) -> DemoResult:
    """Print the best trial (layer table, R, L, accuracy) and the Pareto set of a finished demo job.

    Raises:
        DemoFailed: the job did not complete, has no best trial, or the best trial misses the bar.
    """
    out = out or sys.stdout
    if job.state != "completed":
        raise DemoFailed(f"the demo job ended {job.state}: {job.data.get('reason') or job.counts}")
    best = job.best()
    if not best:
        raise DemoFailed(f"the demo job has no completed trial ({job.counts})")
    v = best["values"]
    kind = JobSpec.of(job.spec).cost
    layers = job.data.get("layers") or []
    pareto = sorted(job.pareto(), key=lambda t: t["values"].get("ratio", 0.0))
    r, loss = float(v["ratio"]), float(v["distill_l2"])
    acc, acc0 = float(v.get("accuracy", float("nan"))), float(v.get("accuracy_original", float("nan")))
    totals = job.data.get("totals") or {}
    w = lambda s="": print(s, file=out)  # noqa: E731 - a local print shorthand
    w()
    w(f"best trial #{best.get('number')} of job {job.id} ({job.counts.get('completed', 0)} trials completed, "
      f"{time.monotonic() - started:.0f} s):")
    w()
    w(_layer_table(layers, best["params"], kind))
    w()
    total = totals.get(kind)
    kept_cost = f" ({r * float(total):,.0f} of {float(total):,.0f} {kind})" if total else ""
    w(f"R (cost ratio, {kind}) = {r:.4f}{kept_cost}")
    w(f"L (distillation error) = {loss:.4g} +- {float((best.get('sem') or {}).get('distill_l2', 0.0)):.2g}")
    w(f"accuracy = {acc:.2%} (original {acc0:.2%}, {100 * (acc - acc0):+.1f} points) "
      f"on {job.spec['compression'].get('n_calibration', '?')} held-out digits")
    w()
    w(f"Pareto set ({len(pareto)} trials, R vs L):")
    w(_pareto_table(pareto))
    w()
    result = DemoResult(job_id=job.id, best=best, ratio=r, distill_l2=loss, accuracy=acc, accuracy_original=acc0,
                        pareto=pareto, seconds=time.monotonic() - started)
    problems = []
    if not r <= MAX_RATIO + 1e-12:
        problems.append(f"R = {r:.4f} > {MAX_RATIO}")
    if not acc >= acc0 - MAX_ACCURACY_DROP - 1e-12:
        problems.append(f"accuracy {acc:.2%} is more than {100 * MAX_ACCURACY_DROP:.0f} points below "
                        f"the original's {acc0:.2%}")
    if problems:
        raise DemoFailed("the demo missed its bar: " + "; ".join(problems))
    w(f"demo passed: R <= {MAX_RATIO} with accuracy within {100 * MAX_ACCURACY_DROP:.0f} points of the original")
    return result


def run_demo(trials: int = 24, workers: int = 1, keep: bool = False, port: int | None = None,
             progress: bool = True) -> DemoResult:
    """Run the service, ``workers`` worker processes and a compression job on this machine.

    Args:
        trials: trials of the demo job.
        workers: local worker processes (cpu).
        keep: keep the temporary directory (database and logs); the service stays up, serving its
            dashboard, until Ctrl-C.
        port: the service's port (default: a free one).
        progress: show a progress bar while the job runs.

    Returns:
        The :class:`DemoResult` (also printed).

    Raises:
        DemoFailed: a process did not start, the job failed, or the best trial missed the bar.
    """
    from .client import Client

    if trials < 1 or workers < 1:
        raise DemoFailed(f"trials and workers must be >= 1 (got {trials}, {workers})")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bocompress-demo-"))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    repo_root = str(ROOT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)}
    for var in ("BOCOMPRESS_TOKEN", "BOCOMPRESS_URL", "BOCOMPRESS_DATABASE_URL"):
        env.pop(var, None)
    procs = ProcessGroup(workdir)
    client = Client(url, token=None, timeout=30.0, max_retries=2)
    result: DemoResult | None = None
    try:
        print(f"starting the service at {url} (database {workdir / 'demo.db'}) and {workers} worker(s)...",
              flush=True)
        procs.start("service", [sys.executable, "-m", "bocompress.cli", "serve", "--no-auth", "--port", str(port),
                                "--database-url", f"sqlite:///{workdir / 'demo.db'}", "--log-level", "warning"], env,
                    new_session=True)
        _wait_healthy(url, procs, STARTUP_TIMEOUT)
        for i in range(workers):
            procs.start(f"worker-{i}", [sys.executable, "-m", "worker", "--url", url, "--device", "cpu",
                                        "--name", f"demo-worker-{i}", "--poll", "0.2", "--grace", "5",
                                        "--log-level", "warning"], env, new_session=True)
        job = client.create_job(demo_spec(trials, workers))
        print(f"job {job.id}: digits-cnn, Tucker-2 on Conv2d + SVD on Linear, min L s.t. R <= {MAX_RATIO}, "
              f"{trials} trials", flush=True)
        watchdog = _Watchdog(procs, url, job.id)
        watchdog.start()
        try:
            job.wait(progress=progress, poll=0.5)
        except BocompressError as exc:
            raise DemoFailed(f"lost the service while waiting for the job: {exc}"
                             + (f"\n{watchdog.problem}" if watchdog.problem else "")) from exc
        finally:
            watchdog.stop()
        if watchdog.problem:
            raise DemoFailed(watchdog.problem)
        result = report(job, started)
        result.workdir = str(workdir)
        if keep:
            print(f"\nthe service is still running at {url} (dashboard: {url}/); database and logs in {workdir}."
                  "\npress Ctrl-C to stop it.", flush=True)
            try:
                while not procs.died():
                    time.sleep(1.0)
            except KeyboardInterrupt:
                pass
        return result
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the demo's processes", file=sys.stderr, flush=True)
        raise
    finally:
        client.close()
        _stop(procs)
        if keep:
            print(f"kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
