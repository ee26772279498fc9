"""Helpers for end-to-end tests: worker subprocesses, a deliberately slow model, job polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from bocompress.worker.zoo import load_model
from bocompress.worker.zoo.models import DigitsCNN

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds each forward pass of :class:`SlowDigitsCNN` over a batch of >= 64 samples sleeps (unset: none).
SLOW_SECONDS_ENV = "BOCOMPRESS_TEST_SLOW_SECONDS"
#: Batches at least this large are slow: the teacher pass and each trial's evaluation, not the trace.
SLOW_MIN_BATCH = 64
#: The import path of the slow model (a worker must allow the prefix ``tests.e2e``).
SLOW_MODEL = "tests.e2e.helpers:slow_digits_cnn"


class SlowDigitsCNN(DigitsCNN):
    """The zoo's digits CNN, whose large-batch forward passes sleep (to hold a trial open in tests)."""

    def forward(self, x: Tensor) -> Tensor:
        """``batch x 1 x 8 x 8`` -> ``batch x 10``, after sleeping ``$BOCOMPRESS_TEST_SLOW_SECONDS``."""
        seconds = os.environ.get(SLOW_SECONDS_ENV)
        if seconds and x.shape[0] >= SLOW_MIN_BATCH:
            time.sleep(float(seconds))
        return super().forward(x)


def slow_digits_cnn() -> SlowDigitsCNN:
    """A :class:`SlowDigitsCNN` with the zoo's trained digits-cnn weights (an import-path factory)."""
    model = SlowDigitsCNN()
    model.load_state_dict(load_model("digits-cnn").state_dict())
    return model.eval()


@contextmanager
def worker_process(url: str, token: str | None, log_path: Path, *extra: str,
                   env: dict[str, str] | None = None, command: list[str] | None = None,
                   name: str = "e2e-worker") -> Iterator[subprocess.Popen[bytes]]:
    """A real worker subprocess (``python -m bocompress.worker``, or ``command`` such as ``bocompress worker``);
    stopped (SIGTERM, then SIGKILL) on exit."""
    base = command or [sys.executable, "-m", "worker"]
    argv = [*base, "--url", url, "--poll", "0.2", "--name", name, *extra]
    if token:
        argv += ["--token", token]
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    full_env.pop("BOCOMPRESS_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_job(client: Any, job_id: int, states: Sequence[str] = ("completed", "failed", "cancelled"),
             timeout: float = 240.0, log_path: Path | None = None) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` (with a bocompress Client) until the job is in one of ``states``."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client._json("GET", f"/jobs/{job_id}")
        if job["state"] in states:
            return job
        time.sleep(0.25)
    tail = log_tail(log_path) if log_path else ""
    raise AssertionError(f"job {job_id} still {job.get('state')} after {timeout} s: {job.get('counts')}\n{tail}")


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def trials(client: Any, job_id: int) -> list[dict[str, Any]]:
    return list(client.paginate(f"/jobs/{job_id}/trials"))


def save_state_dict(tensors: dict[str, Tensor], path: Path) -> Path:
    """Write tensors as a safetensors file (contiguous copies)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def digits_cnn_spec(name: str, trials_n: int, **compression: Any) -> dict[str, Any]:
    """A small Sobol-only compression job on the zoo's digits CNN."""
    comp = {"model": "digits-cnn", "data": "digits", "method": {"Conv2d": "tucker2", "Linear": "svd"},
            "n_calibration": 128, **compression}
    return {"name": name, "compression": comp, "objective": {"kind": "scalarized", "kappa": 1.0},
            "budget": {"max_trials": trials_n, "max_parallel": 2},
            "optimizer": {"n_initial": trials_n, "seed": 0, "engine": "sobol"}}


__all__ = ["REPO_ROOT", "SLOW_SECONDS_ENV", "SLOW_MODEL", "SlowDigitsCNN", "slow_digits_cnn",
           "worker_process", "log_tail", "wait_job", "wait_for", "trials", "save_state_dict", "digits_cnn_spec"]
