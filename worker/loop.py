"""The worker process loop: lease a task, run it while heartbeating, report, repeat.

One worker runs one task at a time:

1. ``POST /workers/lease`` for a ``profile``, ``evaluate``, ``export`` or ``chipnet`` task (204: sleep
   ``poll`` seconds). ChipNet and retraining exports are long tasks: their progress rides on the
   heartbeats, and a refused heartbeat stops their training before its next step.
2. Run it in a compute thread while a heartbeat thread extends the lease every
   ``lease_seconds / 3``. A heartbeat answered 409 (lease lost, job cancelled) abandons the task:
   nothing is reported.
3. Report ``complete`` (the layer table for a profiling task; L, the measured ratio and task metrics
   for a trial) or ``fail`` (``retry=False`` for errors that would recur on any worker: no layer
   matched, weights that do not fit, an import path not allowed, a cost mismatch, and any type,
   shape, value or lookup error of the model's code, see :func:`bocompress.worker.failures.deterministic`; ``retry=True``
   for memory, device and I/O errors). The stored error is the message on its first line, then
   the last frames of the traceback (:func:`bocompress.worker.failures.error_text`).

SIGTERM/SIGINT set a stop event: the current task is finished if it ends within ``grace`` seconds,
else handed back with ``fail(retry=True)`` (a second signal hands it back at once), and the loop
returns. When the service is away, the loop waits with a jittered backoff (up to 10 s) and tries
again; it never crashes on a connection error.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bocompress.client import Client
from bocompress.errors import (
    AuthenticationError,
    BocompressError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableEntityError,
)
from bocompress.worker.failures import deterministic, error_text, is_transient, permanent_types
from bocompress.worker.logs import configure_logging

__all__ = ["run_worker", "Worker", "Backoff", "KINDS"]

logger = logging.getLogger("bocompress.worker")


#: Task kinds this worker runs (``chipnet``: a ChipNet job's one long task, bocompress.worker.tasks_chipnet).
KINDS = ("profile", "evaluate", "export", "chipnet")
#: Longest wait between two attempts to reach a service that is away, in seconds.
MAX_BACKOFF = 10.0
#: Default seconds a stopping worker lets the current task finish before handing it back.
DEFAULT_GRACE = 20.0


# --------------------------------------------------------------------------- helpers


class _Log(logging.LoggerAdapter):
    """A LoggerAdapter whose context fields merge with (not replace) a call's own ``extra``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class Backoff:
    """Jittered exponential backoff: 0.5 s, 1 s, 2 s ... up to ``cap`` seconds, reset on success."""

    def __init__(self, base: float = 0.5, cap: float = MAX_BACKOFF) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2.0**self.failures)
        self.failures += 1
        return delay * (0.5 + 0.5 * random.random())

    def reset(self) -> None:
        self.failures = 0


@dataclass
class _Outcome:
    """What a task's compute thread produced."""

    ok: bool
    values: dict[str, float] | None = None
    sem: dict[str, float] | None = None
    profile: dict[str, Any] | None = None
    error: str | None = None
    retry: bool = False
    artifact: bytes | None = None
    #: What the service stores with an uploaded artifact besides its reference (ChipNet: θ, masks).
    artifact_info: dict[str, Any] | None = None


class _Heartbeat(threading.Thread):
    """Extends a lease every ``interval`` seconds until stopped; sets ``lost`` on a 409/404."""

    def __init__(self, client: Client, trial_id: int, token: str | None, interval: float,
                 log: _Log) -> None:
        super().__init__(name=f"heartbeat-{trial_id}", daemon=True)
        self.client, self.trial_id, self.token, self.interval, self.log = client, trial_id, token, interval, log
        self.lost = threading.Event()
        self.reason = ""
        self._stop_event = threading.Event()
        #: A long task's ``(fraction, message)``, sent with the next beat (None: a plain beat).
        self.progress: tuple[float, str] | None = None

    def report(self, fraction: float, message: str) -> None:
        """Keep a long task's progress for the next beat (called from the compute thread)."""
        self.progress = (min(1.0, max(0.0, float(fraction))), str(message)[:500])

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            body: dict[str, Any] = {"lease_token": self.token}
            progress = self.progress
            if progress is not None:
                body.update(progress=progress[0], message=progress[1])
            try:
                self.client.request("POST", f"/trials/{self.trial_id}/heartbeat", json=body)
            except (ConflictError, NotFoundError) as exc:
                self.reason = getattr(exc, "detail", str(exc))
                self.lost.set()
                return
            except BocompressError as exc:  # the service is away: the next beat may get through
                self.log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop_event.set()


# --------------------------------------------------------------------------- the worker


class Worker:
    """A worker: leases tasks from one service and runs them, one at a time.

    Args:
        url: the service URL.
        token: a worker (or admin) token; None for a service without auth.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        name: the name shown on trials (default ``host:pid``).
        poll: seconds between lease requests while there is no work.
        allowed_prefixes: import-path prefixes models may be imported from (default: the
            ``BOCOMPRESS_WORKER_ALLOW_IMPORT`` environment variable; none when unset).
        grace: seconds a stopping worker lets the current task finish before handing it back.
        cache_jobs: how many jobs' models, data and compressors to keep.
    """

    def __init__(
        self,
        url: str | None,
        token: str | None,
        device: str = "cpu",
        name: str | None = None,
        poll: float = 1.0,
        allowed_prefixes: Sequence[str] | None = None,
        grace: float = DEFAULT_GRACE,
        cache_jobs: int = 3,
    ) -> None:
        from bocompress.worker.runtime import JobCache, allowed_prefixes_from_env, build_context

        self.device = _check_device(device)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.poll = float(poll)
        self.grace = float(grace)
        self.allowed_prefixes = list(allowed_prefixes) if allowed_prefixes is not None else allowed_prefixes_from_env()
        # Short client-side retries: the loop does its own backoff and must notice a stop quickly.
        self.client = Client(url, token, timeout=60.0, max_retries=2)
        self.hb_client = Client(url, token, timeout=30.0, max_retries=1)
        self.cache = JobCache(lambda job: build_context(self.client, job, self.device, self.allowed_prefixes),
                              max_jobs=cache_jobs)
        self.hurry = threading.Event()
        self.log = _Log(logger, {"worker": self.name})

    def close(self) -> None:
        self.client.close()
        self.hb_client.close()

    # ------------------------------------------------------------------ the loop

    def run(self, max_trials: int | None = None, stop_event: threading.Event | None = None) -> int:
        """Lease and run tasks until ``stop_event`` is set or ``max_trials`` tasks were reported.

        Returns:
            The number of tasks reported (completed or failed); tasks abandoned because their
            lease was lost, or handed back on stop, are not counted.

        Raises:
            AuthenticationError, PermissionDeniedError: the token is refused (retrying cannot help).
        """
        stop = stop_event or threading.Event()
        done = 0
        backoff = Backoff()
        self.log.info("worker started", extra={"task": f"device={self.device} url={self.client.url}"})
        while not stop.is_set() and (max_trials is None or done < max_trials):
            try:
                lease = self.client.lease(self.name, list(KINDS))
            except (AuthenticationError, PermissionDeniedError):
                raise
            except BocompressError as exc:
                delay = backoff.next()
                self.log.warning("cannot lease (%s); retrying in %.1f s", exc, delay)
                stop.wait(delay)
                continue
            backoff.reset()
            if lease is None:
                stop.wait(self.poll)
                continue
            if self.run_task(lease, stop):
                done += 1
        self.log.info("worker stopped after %d tasks", done)
        return done

    def run_task(self, lease: Mapping[str, Any], stop: threading.Event) -> bool:
        """Run one leased task to its report. Returns True when a result or failure was reported."""
        trial, job, info = lease["trial"], lease["job"], lease["lease"]
        trial_id, kind = int(trial["id"]), str(lease["task"])
        token = info.get("token")
        log = _Log(logger, {"worker": self.name, "job_id": job["id"], "trial_id": trial_id,
                                             "task": kind, "attempt": info.get("attempt")})
        lease_seconds = float(info.get("lease_seconds") or 60.0)
        hb = _Heartbeat(self.hb_client, trial_id, token, max(0.2, lease_seconds / 3.0), log)
        hb.start()
        try:
            if kind not in KINDS:
                return self._report(trial_id, token, _Outcome(False, error=f"worker {self.name} does not run "
                                                              f"{kind!r} tasks", retry=True), hb, stop, log)
            result: list[_Outcome] = []
            finished = threading.Event()
            t0 = time.perf_counter()

            def compute() -> None:
                try:
                    result.append(self._compute(kind, trial, job, log, lease.get("source"), hb))
                finally:
                    finished.set()

            threading.Thread(target=compute, name=f"task-{trial_id}", daemon=True).start()
            log.info("task started")
            deadline: float | None = None
            while not finished.wait(0.05):
                if hb.lost.is_set():
                    log.warning("lease lost (%s): task abandoned", hb.reason)
                    return False
                if stop.is_set():
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.grace
                        log.info("stopping: letting the task finish for up to %.0f s", self.grace)
                    if now >= deadline or self.hurry.is_set():
                        self._report(trial_id, token, _Outcome(
                            False, error=f"worker {self.name} stopped before the task finished", retry=True,
                        ), hb, stop, log)
                        log.info("task handed back")
                        return False
            if hb.lost.is_set():
                log.warning("lease lost (%s): result dropped", hb.reason)
                return False
            outcome = result[0]
            log.info("task %s", "done" if outcome.ok else "failed",
                     extra={"seconds": round(time.perf_counter() - t0, 4),
                            **({"error": outcome.error} if not outcome.ok else {})})
            return self._report(trial_id, token, outcome, hb, stop, log)
        finally:
            hb.stop()

    # ------------------------------------------------------------------ computing

    def _compute(self, kind: str, trial: Mapping[str, Any], job: Mapping[str, Any],
                 log: _Log, source: Mapping[str, Any] | None = None, hb: _Heartbeat | None = None) -> _Outcome:
        """Run a task; never raises: errors become a failed outcome, with or without retry."""
        permanent = permanent_types()
        try:
            if kind == "chipnet":
                from bocompress.worker.tasks_chipnet import run_chipnet_task

                ctx, _ = self.cache.get(job)
                return self._long(lambda report, stop: run_chipnet_task(ctx, job, trial, report, stop).parts(),
                                  hb, "ChipNet", job, trial)
            if kind == "profile":
                from bocompress.worker.proxy import job_profile

                ctx, _ = self.cache.get(job)
                log.info("profiled in %.2f s", ctx.build_seconds)
                return _Outcome(True, values={}, sem={}, profile=job_profile(ctx))
            if kind == "export":
                return self._export(trial, job, source, hb)
            return self._evaluate(trial, job)
        except permanent as exc:
            return _Outcome(False, error=error_text(exc, str(exc) or None), retry=False)
        except Exception as exc:  # noqa: BLE001 - sorted: a deterministic error fails at once
            again = not deterministic(exc)
            log.error("%s error", "unexpected" if again else "deterministic", exc_info=True)
            return _Outcome(False, error=error_text(exc), retry=again)

    def _evaluate(self, trial: Mapping[str, Any], job: Mapping[str, Any]) -> _Outcome:
        from bocompress.worker.proxy import measure_trial
        from bocompress.worker.runtime import TaskError

        ctx, _ = self.cache.get(job)
        theta = {k: float(v) for k, v in (trial.get("params") or {}).items()}
        space = [p["name"] for p in (job.get("search_space") or [])]
        mine = [p["name"] for p in ctx.compressor.profile()["params"]]
        if space and sorted(space) != sorted(mine):
            raise TaskError(f"this worker's layer table ({len(mine)} parameters) differs from the job's "
                            f"({len(space)}): {sorted(set(space) ^ set(mine))[:10]}")
        out = measure_trial(ctx, theta)  # apply, BN re-estimation (+ fine-tune), evaluate
        values = {k: float(v) for k, v in out["values"].items() if math.isfinite(float(v))}
        sem = {k: float(v) for k, v in out["sem"].items() if math.isfinite(float(v)) and float(v) >= 0}
        if "distill_l2" not in values:
            raise TaskError(f"the distillation error is not finite ({out['values'].get('distill_l2')})")
        return _Outcome(True, values=values, sem=sem)

    def _export(self, task: Mapping[str, Any], job: Mapping[str, Any],
                source: Mapping[str, Any] | None, hb: _Heartbeat | None = None) -> _Outcome:
        """Build the source trial's compressed model, fine-tune or retrain it if asked, serialize it."""
        from bocompress.worker.export import build_export
        from bocompress.worker.runtime import TaskError

        if not source or source.get("state") != "completed":
            raise TaskError("the trial to export is not a completed trial of this job")
        ctx, _ = self.cache.get(job)
        theta = {k: float(v) for k, v in (source.get("params") or {}).items()}
        params = task.get("params") or {}
        if params.get("retrain"):
            from bocompress.worker.tasks_retrain import retrain_export

            return self._long(lambda report, stop: (*retrain_export(self.client, ctx, job, source, params["retrain"],
                                                                    report, stop), None), hb, "retraining", job, task)
        data, values, _ = build_export(
            ctx.export_base, ctx.compressor, ctx.arch, theta, ctx.inputs, ctx.teacher,
            steps=int(params.get("finetune_steps", 0)), lr=float(params.get("lr", 1e-4)),
            extra={"job_id": int(job["id"]), "trial_id": int(source["id"])},
            output=ctx.output, linearized=ctx.linearized,
        )
        return _Outcome(True, values=values, sem={}, artifact=data)

    def _long(self, run: Any, hb: _Heartbeat | None, what: str, job: Mapping[str, Any],
              task: Mapping[str, Any]) -> _Outcome:
        """A long task (ChipNet, a retraining): ``run(progress, should_stop)`` returns ``(values, sem,
        artifact bytes, artifact info)``. Progress rides on the heartbeats; a heartbeat refused (the
        job or the export was cancelled) stops the training before its next step: nothing is reported."""
        from bocompress.worker.strategies import Cancelled

        def should_stop() -> bool:
            return hb is not None and hb.lost.is_set() or self.hurry.is_set()

        try:
            values, sem, data, info = run(hb.report if hb is not None else None, should_stop)
        except Cancelled as exc:
            self.log.info("%s stopped: %s", what, exc, extra={"job_id": job.get("id"), "trial_id": task.get("id")})
            return _Outcome(False, error=str(exc), retry=True)
        return _Outcome(True, values=values, sem=sem, artifact=data, artifact_info=info)

    # ------------------------------------------------------------------ reporting

    def _report(self, trial_id: int, token: str | None, outcome: _Outcome, hb: _Heartbeat,
                stop: threading.Event, log: _Log) -> bool:
        """Send ``complete`` or ``fail``; retries while the service is away (the heartbeat keeps
        the lease). Returns True when the service took the report."""
        if outcome.ok:
            path = f"/trials/{trial_id}/complete"
            body: dict[str, Any] = {"values": outcome.values or {}, "sem": outcome.sem or {}, "lease_token": token}
            if outcome.profile is not None:
                body["profile"] = outcome.profile
            if outcome.artifact is not None:
                try:
                    body["artifact"] = {**self.client.upload_artifact(trial_id, outcome.artifact, lease_token=token),
                                        **(outcome.artifact_info or {})}
                except (ConflictError, NotFoundError) as exc:
                    log.warning("artifact refused (%s): the lease was lost or the job cancelled", exc)
                    return False
                except BocompressError as exc:
                    log.error("artifact upload failed: %s", exc)
                    outcome = _Outcome(False, error=f"artifact upload failed: {exc}", retry=True)
                    path = f"/trials/{trial_id}/fail"
                    body = {"error": outcome.error, "retry": True, "lease_token": token}
        else:
            path = f"/trials/{trial_id}/fail"
            body = {"error": (outcome.error or "failed")[:20_000], "retry": outcome.retry, "lease_token": token}
        backoff = Backoff()
        give_up = time.monotonic() + 120.0
        while True:
            if hb.lost.is_set():
                log.warning("lease lost (%s) before the report was sent: dropped", hb.reason)
                return False
            try:
                self.client.request("POST", path, json=body)
                return True
            except (ConflictError, NotFoundError) as exc:
                log.warning("report refused (%s): the lease was lost or the job cancelled", exc)
                return False
            except UnprocessableEntityError as exc:
                if not outcome.ok:
                    log.error("failure report refused: %s", exc)
                    return False
                # The service refused the result itself (e.g. an invalid layer table): fail the task.
                log.error("result refused: %s", exc)
                outcome = _Outcome(False, error=f"the service refused the worker's result: {exc.detail}", retry=False)
                path, body = f"/trials/{trial_id}/fail", {"error": outcome.error, "retry": False, "lease_token": token}
            except BocompressError as exc:
                if not is_transient(exc):
                    log.error("report failed: %s", exc)
                    return False
                deadline = give_up if not stop.is_set() else min(give_up, time.monotonic() + 10.0)
                if time.monotonic() >= deadline:
                    log.error("giving up reporting (%s); the lease will expire and the trial be retried", exc)
                    return False
                delay = backoff.next()
                log.warning("cannot report (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)


def _check_device(device: str) -> str:
    import re

    if not re.match(r"^(cpu|cuda(:\d+)?)$", device or ""):
        raise BocompressError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BocompressError(f"device {device!r} asked for, but CUDA is not available")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise BocompressError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


# --------------------------------------------------------------------------- entry point


def run_worker(
    url: str | None,
    token: str | None,
    device: str = "cpu",
    name: str | None = None,
    max_trials: int | None = None,
    poll: float = 1.0,
    allowed_prefixes: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
    grace: float = DEFAULT_GRACE,
) -> int:
    """Run a worker until stopped (SIGTERM/SIGINT or ``stop_event``) or ``max_trials`` tasks are done.

    Args:
        url: the service URL (default ``BOCOMPRESS_URL``, else ``http://127.0.0.1:8000``).
        token: a worker token (default ``BOCOMPRESS_TOKEN``; none for a service without auth).
        device: ``cpu``, ``cuda`` or ``cuda:N``: where models and data live.
        name: the name shown on trials (default ``host:pid``).
        max_trials: return after this many tasks were reported (None: run until stopped).
        poll: seconds between lease requests while there is no work.
        allowed_prefixes: import-path prefixes user models may be imported from (default:
            ``BOCOMPRESS_WORKER_ALLOW_IMPORT``, comma-separated; none when unset).
        stop_event: set it to stop the worker (signals set it too when this runs in the main thread).
        grace: seconds the current task may take to finish after a stop before it is handed back.

    Returns:
        The number of tasks reported (completed or failed).
    """
    if not logger.handlers and not logging.getLogger().handlers:
        configure_logging(os.environ.get("BOCOMPRESS_WORKER_LOG_LEVEL", "info"))
    stop = stop_event or threading.Event()
    worker = Worker(url, token, device=device, name=name, poll=poll, allowed_prefixes=allowed_prefixes, grace=grace)
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
        if stop.is_set():
            worker.hurry.set()
            logger.info("second signal: handing the current task back now", extra={"worker": worker.name})
        else:
            logger.info("signal %s: stopping after the current task", signal.Signals(signum).name,
                        extra={"worker": worker.name})
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        return worker.run(max_trials=max_trials, stop_event=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.close()
