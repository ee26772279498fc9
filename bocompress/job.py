"""``Job``: a handle on one job of a bocompress service.

``wait()`` with a progress bar, ``trials()`` as a DataFrame, ``plot()``, ``pareto()``, ask/tell for
client-evaluated jobs, and export/download of a compressed model. A ``Job`` comes from a
:class:`~bocompress.client.Client` (``create_job``, ``get_job``) and talks through it.

Only pydantic is imported here at import time (through the contract); tqdm, pandas, numpy and
matplotlib are imported inside the methods that need them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WaitTimeoutError, status_error
from .objective import pareto_mask
from .schemas import TERMINAL_TRIAL_STATES
from .spec import JobSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas
    from matplotlib.figure import Figure

    from .client import Client

__all__ = ["Job", "CollapseWarning", "JOB_DONE_STATES"]

JOB_DONE_STATES = ("completed", "cancelled", "failed")
"""Job states after which nothing changes any more (``Job.wait`` returns on them)."""

_TRIAL_COLUMNS = ("id", "number", "state", "attempt", "worker", "error", "created_at", "finished_at")


class CollapseWarning(UserWarning):
    """The service flagged a job's best trial (``Job.warnings``): e.g. its outputs collapsed."""


class Job:
    """A handle on one job: its last known JSON plus the client to refresh it.

    Attributes:
        client: The :class:`Client` it came from.
        data: The job JSON as last fetched (``id``, ``name``, ``state``, ``counts`` and ``kind``
            are also properties; the best trial is :meth:`best`).
    """

    def __init__(self, client: Client, data: Mapping[str, Any]) -> None:
        self.client = client
        self.data: dict[str, Any] = dict(data)
        self._trials: dict[int, dict[str, Any]] = {}
        self._since: int | None = None

    # --------------------------------------------------------------- attributes

    @property
    def id(self) -> int:
        return self.data["id"]

    @property
    def name(self) -> str:
        return self.data.get("name", "")

    @property
    def state(self) -> str:
        return self.data.get("state", "")

    @property
    def kind(self) -> str:
        """``"compression"`` or ``"generic"``."""
        return self.data.get("kind") or ("compression" if "compression" in self.spec else "generic")

    @property
    def counts(self) -> dict[str, int]:
        """Number of trials in each state."""
        return dict(self.data.get("counts") or {})

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.data.get("spec") or {})

    @property
    def metric(self) -> str:
        """The metric the job optimizes: ``objective`` for compression jobs, else the spec's metric."""
        return JobSpec.of(self.spec).metric

    @property
    def direction(self) -> str:
        return JobSpec.of(self.spec).direction

    @property
    def max_trials(self) -> int | None:
        return (self.spec.get("budget") or {}).get("max_trials")

    @property
    def done(self) -> bool:
        return self.state in JOB_DONE_STATES

    @property
    def pipeline(self) -> dict[str, Any] | None:
        """The pipeline (a spec's ``recipe``) this job belongs to, as last fetched: ``kind``,
        ``stage`` (first | finetune | second | done | failed | cancelled), ``jobs``, ``export``,
        ``ratios``, ``total_ratio``, ``final``, ``reason``; None for a job of no pipeline."""
        return self.data.get("pipeline")

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, name={self.name!r}, state={self.state!r}, counts={self.counts})"

    # --------------------------------------------------------------- reading

    def refresh(self) -> "Job":
        """Fetch the job again; returns ``self``."""
        self.data = self.client._json("GET", f"/jobs/{self.id}")
        return self

    def _sync_trials(self) -> list[dict[str, Any]]:
        """Fetch the trials changed since the last sync (all of them the first time).

        Returns:
            The trials that changed, already merged into the local copy.
        """
        changed = list(self.client.paginate(f"/jobs/{self.id}/trials", {"since": self._since}))
        for trial in changed:
            self._trials[trial["id"]] = trial
            seq = trial.get("seq")
            if seq is not None and (self._since is None or seq > self._since):
                self._since = seq
        return changed

    def wait(self, progress: bool = True, poll: float = 1.0, timeout: float | None = None) -> "Job":
        """Block until the job is ``completed``, ``cancelled`` or ``failed``.

        Polls the job and ``GET /jobs/{id}/trials?since=<seq>`` (only what changed), keeping the
        trials locally, and shows a tqdm bar of finished trials out of ``max_trials`` with the
        best objective so far.

        Args:
            progress: Show the progress bar.
            poll: Seconds between polls.
            timeout: Give up after this many seconds (``None``: wait as long as it takes).

        Returns:
            ``self``, refreshed.

        Raises:
            WaitTimeoutError: The job was still going after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_trials, desc=f"job {self.id} {self.state}", unit="trial")
        try:
            while True:
                self.refresh()
                self._sync_trials()
                if bar is not None:
                    finished = sum(1 for t in self._trials.values() if t["state"] in TERMINAL_TRIAL_STATES)
                    bar.set_description(f"job {self.id} {self.state}", refresh=False)
                    best = self._best_value()
                    if best is not None:
                        bar.set_postfix({f"best {self.metric}": f"{best:.4g}"}, refresh=False)
                    bar.n = finished
                    bar.refresh()
                if self.done:
                    if progress and self.warnings:
                        if bar is not None:
                            bar.close()
                            bar = None
                        print(f"job {self.id} WARNING: " + "\n  ".join(self.warnings), file=sys.stderr)
                    return self
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeoutError(
                        f"job {self.id} still {self.state} after {timeout} s ({self.counts})"
                    )
                sleep = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
                time.sleep(sleep)
        finally:
            if bar is not None:
                bar.close()

    def wait_pipeline(self, progress: bool = True, poll: float = 1.0, timeout: float | None = None) -> "Job":
        """Block until this job's pipeline ends, and return its last job (the second pass).

        Waits through each stage (the first pass, its fine-tune, the second pass), printing each
        stage once with ``progress``. ``job.pipeline["total_ratio"]`` of the answer is the final
        model's R relative to the original's; export the final job's best trial as usual
        (``final.export(final.best()["id"])``: it loads with :func:`bocompress.load_compressed`
        from the original architecture).

        Raises:
            BocompressError: the job is no pipeline's, or the pipeline failed or was cancelled
                (the message carries its reason).
            WaitTimeoutError: still going after ``timeout`` seconds.
        """
        from .errors import BocompressError

        deadline = None if timeout is None else time.monotonic() + timeout
        shown = None
        while True:
            self.refresh()
            pipe = self.pipeline
            if pipe is None:
                raise BocompressError(f"job {self.id} belongs to no pipeline (its spec has no recipe)")
            if progress and pipe["stage"] != shown:
                shown = pipe["stage"]
                print(f"pipeline {pipe['root']} ({pipe['kind']}): {shown}, jobs {pipe['jobs']}", file=sys.stderr)
            if pipe["stage"] == "done":
                final = self if self.id == pipe["jobs"][-1] else self.client.get_job(pipe["jobs"][-1])
                return final.refresh()
            if pipe["stage"] in ("failed", "cancelled"):
                raise BocompressError(f"pipeline {pipe['root']} {pipe['stage']}: {pipe.get('reason')}")
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"pipeline {pipe['root']} still at stage {pipe['stage']} after {timeout} s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def _best_value(self) -> float | None:
        best = self.best(refresh=False)
        if best and self.metric in (best.get("values") or {}):
            return float(best["values"][self.metric])
        vals = [t["values"][self.metric] for t in self._trials.values()
                if t["state"] == "completed" and self.metric in (t.get("values") or {})]
        if not vals:
            return None
        return float(max(vals) if self.direction == "maximize" else min(vals))

    def trials(self) -> "pandas.DataFrame":
        """All trials as a DataFrame, one row per trial, ordered by ``number``.

        Columns: ``id, number, state, attempt, worker, error, created_at, finished_at`` (UTC
        timestamps), then one per parameter (its plain name), then one per metric in ``values``.
        If a parameter name equals a metric name or one of the fixed columns, every parameter
        column is prefixed with ``param.`` instead.
        """
        import pandas as pd

        self._sync_trials()
        trials = sorted(self._trials.values(), key=lambda t: (t.get("number", 0), t["id"]))
        param_names: list[str] = []
        metric_names: list[str] = []
        for t in trials:
            for k in t.get("params") or {}:
                if k not in param_names:
                    param_names.append(k)
            for k in t.get("values") or {}:
                if k not in metric_names:
                    metric_names.append(k)
        clash = set(param_names) & (set(metric_names) | set(_TRIAL_COLUMNS))
        prefix = "param." if clash else ""
        rows = []
        for t in trials:
            row = {c: t.get(c) for c in _TRIAL_COLUMNS}
            params, values = t.get("params") or {}, t.get("values") or {}
            row.update({prefix + k: params.get(k, math.nan) for k in param_names})
            row.update({k: values.get(k, math.nan) for k in metric_names})
            rows.append(row)
        columns = list(_TRIAL_COLUMNS) + [prefix + k for k in param_names] + metric_names
        df = pd.DataFrame(rows, columns=columns)
        for col in ("created_at", "finished_at"):
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
        return df

    def best(self, refresh: bool = True) -> dict[str, Any] | None:
        """The service's best trial; ``None`` before any completes (or for a ``pareto`` job).

        Args:
            refresh: Fetch the job first; ``False`` answers from the last fetched state.
        """
        if refresh:
            self.refresh()
        best = self.data.get("best")
        if best is not None and self.data.get("warnings"):
            import warnings

            key = (best.get("id"), tuple(self.data["warnings"]))
            if key != getattr(self, "_warned", None):  # once per best trial, not on every call
                self._warned = key
                warnings.warn(f"job {self.id}: " + "; ".join(self.data["warnings"]), CollapseWarning, stacklevel=2)
        return best

    @property
    def warnings(self) -> list[str]:
        """What the service says a user must know about the best trial (e.g. that it collapsed)."""
        return list(self.data.get("warnings") or [])

    @property
    def collapsed(self) -> bool:
        """Whether the best trial lost the model's function (L >= 0.9, or accuracy near chance)."""
        return bool(self.data.get("collapsed", False))

    def pareto(self) -> list[dict[str, Any]]:
        """The non-dominated completed trials in (L, R) (``GET /jobs/{id}/pareto``)."""
        answer = self.client._json("GET", f"/jobs/{self.id}/pareto")
        if isinstance(answer, dict):
            return list(answer.get("items", answer.get("trials", [])))
        return list(answer)

    def plot(self, ax: Any = None) -> "Figure":
        """Plot the search: best-so-far objective vs trial number, and for compression jobs
        distillation error L vs ratio R of every completed trial with the Pareto front highlighted.

        Args:
            ax: ``None`` (a new figure), one matplotlib Axes (only the best-so-far curve), or a
                pair of Axes (curve, L-vs-R scatter).

        Returns:
            The matplotlib Figure.
        """
        import matplotlib.pyplot as plt

        df = self.trials()
        compression = self.kind == "compression"
        if ax is None:
            fig, axes = plt.subplots(1, 2 if compression else 1, figsize=(11 if compression else 6, 4), squeeze=False)
            axes = list(axes[0])
        else:
            axes = list(ax) if isinstance(ax, (list, tuple)) else [ax]
            fig = axes[0].figure
        done = df[df["state"] == "completed"]
        metric, ax0 = self.metric, axes[0]
        if metric in done.columns and len(done):
            ys = done[metric].to_numpy(dtype=float)
            best = _running_best(ys, self.direction == "maximize")
            ax0.plot(done["number"], ys, "o", color="0.7", ms=4, label="trial")
            ax0.step(done["number"], best, where="post", color="C0", label="best so far")
            ax0.legend(loc="best")
        ax0.set_xlabel("trial number")
        ax0.set_ylabel(metric)
        ax0.set_title(f"{self.name}: best {metric} so far")
        if compression and len(axes) > 1:
            ax1 = axes[1]
            if {"ratio", "distill_l2"} <= set(done.columns) and len(done):
                R = done["ratio"].to_numpy(dtype=float)
                L = done["distill_l2"].to_numpy(dtype=float)
                front = _pareto_mask(R, L)
                ax1.scatter(R[~front], L[~front], s=14, color="0.6", label="trial")
                order = R[front].argsort()
                ax1.plot(R[front][order], L[front][order], "o-", color="C3", ms=5, label="Pareto front")
                ax1.legend(loc="best")
                if (L > 0).all():
                    ax1.set_yscale("log")
            ax1.set_xlabel("compression ratio R")
            ax1.set_ylabel("distillation error L")
            ax1.set_title("L vs R")
        fig.tight_layout()
        return fig

    # --------------------------------------------------------------- acting

    def cancel(self) -> "Job":
        """Cancel the job (``POST /jobs/{id}/cancel``); running trials stop at their next heartbeat."""
        answer = self.client._json("POST", f"/jobs/{self.id}/cancel")
        if isinstance(answer, dict) and "state" in answer and "id" in answer:
            self.data = answer
        else:
            self.refresh()
        return self

    def ask(self, count: int = 1) -> list[dict[str, Any]]:
        """Trials to evaluate yourself (client-evaluated jobs); empty once the budget is spent."""
        answer = self.client._json("POST", f"/jobs/{self.id}/ask", json={"count": count})
        return list(answer.get("trials", []))

    def tell(
        self,
        trial_id: int,
        values: Mapping[str, float] | None = None,
        sem: Mapping[str, float] | None = None,
        failed: bool = False,
        error: str | None = None,
    ) -> dict[str, Any]:
        """Report the result of an asked trial (``POST /trials/{id}/tell``).

        Args:
            trial_id: The trial's id (from :meth:`ask`).
            values: Metric name -> value; must hold the job's metric unless ``failed``.
            sem: Metric name -> standard error, for noisy evaluations.
            failed: The evaluation failed (give ``error``).
            error: What went wrong.
        """
        body: dict[str, Any] = {"values": dict(values or {}), "sem": dict(sem or {}), "failed": failed}
        if error is not None:
            body["error"] = error
        return self.client._json("POST", f"/trials/{trial_id}/tell", json=body)

    def export(self, trial_id: int, finetune_steps: int = 0, lr: float = 1e-4,
               retrain: dict[str, Any] | None = None) -> dict[str, Any]:
        """Ask a worker to build the compressed model of a trial (optionally distillation-fine-tuned,
        or retrained: ``retrain={"mode": "scratch-b", "epochs": 30}``, see docs/strategies.md).

        Returns:
            The service's answer (the export task's state); fetch the file with :meth:`download`.
        """
        body: dict[str, Any] = {"finetune_steps": finetune_steps, "lr": lr}
        if retrain is not None:
            body["retrain"] = dict(retrain)
        return self.client._json("POST", f"/jobs/{self.id}/trials/{trial_id}/export", json=body)

    def cancel_export(self, trial_id: int) -> dict[str, Any]:
        """Stop the trial's latest export (a retraining stops at its worker's next heartbeat)."""
        return self.client._json("POST", f"/jobs/{self.id}/trials/{trial_id}/export/cancel")

    def download(
        self,
        trial_id: int,
        path: str | os.PathLike[str],
        progress: bool = True,
        poll: float = 2.0,
        timeout: float | None = 3600.0,
    ) -> Path:
        """Save a trial's exported model to ``path``, waiting while it is being built.

        A 404 or 409 from ``GET /jobs/{id}/trials/{trial_id}/artifact`` means "not built yet": the
        call polls every ``poll`` seconds until the file is there or ``timeout`` passes.

        Returns:
            The path written.

        Raises:
            WaitTimeoutError: Still not built after ``timeout`` seconds (the last error is chained).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        target = Path(path)
        bar = None
        started = time.monotonic()
        try:
            while True:
                response = self.client.request(
                    "GET", f"/jobs/{self.id}/trials/{trial_id}/artifact", ok_statuses=(404, 409)
                )
                if response.status_code < 400:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(response.content)
                    return target
                pending = status_error(response)
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeoutError(
                        f"the artifact of trial {trial_id} is still not ready after {timeout} s: {pending.message}"
                    ) from pending
                if progress and bar is None:
                    from tqdm.auto import tqdm

                    bar = tqdm(desc=f"building trial {trial_id}", bar_format="{desc}: {elapsed} {postfix}")
                if bar is not None:
                    bar.set_postfix_str(pending.detail[:60], refresh=False)
                    bar.n = int(time.monotonic() - started)
                    bar.refresh()
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        finally:
            if bar is not None:
                bar.close()


def _running_best(x: Any, maximize: bool) -> Any:
    """Best-so-far of a 1-D numpy array (running max when ``maximize``, else running min)."""
    import numpy as np

    return (np.maximum if maximize else np.minimum).accumulate(x)


def _pareto_mask(r: Any, loss: Any) -> Any:
    """Boolean mask (``n``) of the points on the front of (minimize loss, minimize r), as the
    service's ``/pareto`` computes it (:func:`bocompress.objective.pareto_mask`)."""
    import numpy as np

    return np.asarray(pareto_mask(list(r), list(loss)), dtype=bool)

