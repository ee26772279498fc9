"""The Python client of the bocompress service.

``Client`` speaks the v1 wire contract (DESIGN.md) over httpx: it retries what is safe to retry
(connection errors, timeouts, 408, 429, 5xx, and a 409 that carries ``Retry-After``) with a
jittered exponential backoff that honours ``Retry-After``, sends one ``Idempotency-Key`` per
logical POST (the same on each of its retries, so a create that timed out after the service stored
it returns the same job), and turns error responses into the typed errors of
:mod:`bocompress.errors`.

``Job`` is a handle on one job: ``wait()`` with a progress bar, ``trials()`` as a DataFrame,
``plot()``, ``pareto()``, ask/tell for client-evaluated jobs, and export/download of a compressed
model.

Only httpx and pydantic are imported here at import time; torch, safetensors, tqdm, pandas and
matplotlib are imported inside the methods that need them.

Example::

    import bocompress
    client = bocompress.Client("http://127.0.0.1:8000", token="...")
    job = client.create_job({
        "name": "digits-svd",
        "compression": {"model": "digits_cnn", "data": "digits", "method": "svd"},
        "budget": {"max_trials": 24},
    })
    job.wait()
    print(job.best())
    df = job.trials()
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from .errors import APIConnectionError, APITimeoutError, BocompressError, WaitTimeoutError, status_error
from .objective import pareto_mask
from .schemas import API_PREFIX, TERMINAL_TRIAL_STATES, JobCreate
from .spec import JobSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas
    from matplotlib.figure import Figure

__all__ = ["Client", "Job", "DEFAULT_URL", "JOB_DONE_STATES"]

DEFAULT_URL = "http://127.0.0.1:8000"
JOB_DONE_STATES = ("completed", "cancelled", "failed")
"""Job states after which nothing changes any more (``Job.wait`` returns on them)."""

_TRIAL_COLUMNS = ("id", "number", "state", "attempt", "worker", "error", "created_at", "finished_at")


def _retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Seconds asked for by ``Retry-After-Ms`` / ``Retry-After`` (seconds or an HTTP date), if any."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return float(email.utils.mktime_tz(parsed) - time.time())


def _sleep(seconds: float) -> None:
    """Sleep between retries (a module function so tests can record the backoff)."""
    time.sleep(seconds)


class CollapseWarning(UserWarning):
    """The service flagged a job's best trial (``Job.warnings``): e.g. its outputs collapsed."""


class Client:
    """A connection to a bocompress service.

    Args:
        url: Base URL of the service, e.g. ``http://gpu-box:8000``. Defaults to the environment
            variable ``BOCOMPRESS_URL``, else ``http://127.0.0.1:8000``.
        token: Bearer token. Defaults to ``BOCOMPRESS_TOKEN``; none is sent when unset (a service
            started with ``--no-auth``).
        timeout: Seconds to wait for each HTTP exchange.
        max_retries: How many times a retryable failure is retried (so up to ``max_retries + 1``
            attempts per call).

    The client is a context manager; ``close()`` releases its connections.
    """

    initial_retry_delay: float = 0.5
    """Backoff before the first retry, in seconds; doubled on each further retry."""
    max_retry_delay: float = 8.0
    """Longest backoff between two attempts, in seconds (a ``Retry-After`` up to 60 s is honoured)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
    ) -> None:
        url = (url or os.environ.get("BOCOMPRESS_URL") or DEFAULT_URL).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise BocompressError(f"service url must start with http:// or https://, got {url!r}")
        if max_retries < 0:
            raise BocompressError(f"max_retries must be >= 0, got {max_retries}")
        if not timeout > 0:
            raise BocompressError(f"timeout must be > 0 seconds, got {timeout}")
        self.url = url
        self.token = token if token is not None else (os.environ.get("BOCOMPRESS_TOKEN") or None)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        headers = {"Accept": "application/json", "User-Agent": "bocompress-client/0.1"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(base_url=url, headers=headers, timeout=self.timeout)

    # ------------------------------------------------------------------ plumbing

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool. The client must not be used afterwards."""
        self._http.close()

    def __repr__(self) -> str:
        return f"Client(url={self.url!r}, token={'set' if self.token else 'unset'})"

    def _should_retry(self, response: httpx.Response) -> bool:
        status = response.status_code
        if status in (408, 429) or status >= 500:
            return True
        # A 409 is a real conflict (lease lost, job cancelled) unless the service says "try again".
        return status == 409 and ("retry-after" in response.headers or "retry-after-ms" in response.headers)

    def _retry_delay(self, retries_done: int, headers: httpx.Headers | None) -> float:
        """Seconds to sleep before the next attempt (jittered exponential backoff, or Retry-After)."""
        if headers is not None:
            asked = _retry_after_seconds(headers)
            if asked is not None and 0 <= asked <= 60:
                return asked
        delay = min(self.initial_retry_delay * 2.0**retries_done, self.max_retry_delay)
        return max(delay * (1.0 - 0.25 * random.random()), 0.0)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        files: Callable[[], dict[str, Any]] | None = None,
        data: Mapping[str, Any] | None = None,
        ok_statuses: Iterable[int] = (),
        timeout: float | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one logical request, with retries, and return its successful response.

        Args:
            method: HTTP method.
            path: Path under the service root; a path not starting with ``/api/`` or ``/healthz``
                / ``/metrics`` is put under ``/api/v1``.
            json: JSON body.
            params: Query parameters (``None`` values are dropped).
            files: A function returning httpx ``files`` for a multipart body; called anew for each
                attempt so that file objects are fresh.
            data: Form fields of a multipart body.
            ok_statuses: Extra 4xx statuses to return instead of raising (e.g. 404 while polling).
            timeout: Per-request timeout overriding the client's.
            idempotency_key: For a POST, the ``Idempotency-Key`` to send (default: a fresh uuid4,
                the same on every retry of this call).
            headers: Extra headers (e.g. ``X-Lease-Token``).

        Returns:
            The ``httpx.Response`` (status < 400, or one of ``ok_statuses``).

        Raises:
            APIStatusError: A subclass by status, after retries when retryable.
            APIConnectionError: No response after retries (``APITimeoutError`` for timeouts).
        """
        if self._http.is_closed:
            raise BocompressError("this Client is closed; create a new one")
        url = self._path(path)
        method = method.upper()
        headers = {**(headers or {}),
                   **({"Idempotency-Key": idempotency_key or str(uuid.uuid4())} if method == "POST" else {})}
        query = {k: v for k, v in (params or {}).items() if v is not None}
        ok = set(ok_statuses)
        for attempt in range(self.max_retries + 1):
            retries_left = self.max_retries - attempt
            request = self._http.build_request(
                method, url, json=json, params=query, files=files() if files else None, data=data,
                headers=headers, timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                response = self._http.send(request)
            except httpx.TimeoutException as exc:
                if retries_left > 0:
                    _sleep(self._retry_delay(attempt, None))
                    continue
                raise APITimeoutError(request) from exc
            except httpx.UnsupportedProtocol as exc:
                raise APIConnectionError(message=f"unsupported url {request.url}: {exc}", request=request) from exc
            except httpx.TransportError as exc:
                if retries_left > 0:
                    _sleep(self._retry_delay(attempt, None))
                    continue
                raise APIConnectionError(
                    message=f"cannot reach the service at {self.url} ({type(exc).__name__}: {exc})",
                    request=request,
                ) from exc
            if response.status_code < 400 or response.status_code in ok:
                return response
            if retries_left > 0 and self._should_retry(response):
                response.close()
                _sleep(self._retry_delay(attempt, response.headers))
                continue
            raise status_error(response)
        raise AssertionError("unreachable: the retry loop always returns or raises")  # pragma: no cover

    def _path(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        if not path.startswith("/"):
            path = "/" + path
        if path.startswith(("/api/", "/healthz", "/metrics")):
            return path
        return API_PREFIX + path

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """``request`` and decode its JSON body (``None`` for an empty body, e.g. a 204)."""
        response = self.request(method, path, **kwargs)
        return response.json() if response.content else None

    def paginate(self, path: str, params: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over every item of a cursor-paginated list endpoint.

        Follows ``{"items": [...], "next_cursor": ...}`` pages until ``next_cursor`` is null.

        Args:
            path: The list endpoint, e.g. ``/jobs``.
            params: Query parameters sent with every page (``limit``, ``since``, ...).

        Yields:
            Each item, as the service's JSON dict.
        """
        query = dict(params or {})
        cursor: str | None = None
        while True:
            page = self._json("GET", path, params={**query, "cursor": cursor})
            if isinstance(page, list):  # a plain list: nothing more to follow
                yield from page
                return
            yield from page.get("items", [])
            next_cursor = page.get("next_cursor")
            if not next_cursor or next_cursor == cursor:
                return
            cursor = next_cursor

    # ------------------------------------------------------------------ jobs

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the service's liveness answer."""
        return self._json("GET", "/healthz")

    def create_job(self, spec: Mapping[str, Any] | JobCreate) -> "Job":
        """Create a job (``POST /api/v1/jobs``).

        Args:
            spec: The job spec of DESIGN.md (compression or generic form), as a dict or a
                :class:`~bocompress.schemas.JobCreate`. A dict is sent as is; the service
                validates it (a mistake is an :class:`~bocompress.errors.UnprocessableEntityError`
                naming the field).

        Returns:
            A :class:`Job` handle.
        """
        body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobCreate) else dict(spec)
        return Job(self, self._json("POST", "/jobs", json=body))

    def submit_many(self, specs: Iterable[Mapping[str, Any] | JobCreate]) -> list["Job"]:
        """Create several jobs, one request (and one idempotency key) each, in order."""
        return [self.create_job(spec) for spec in specs]

    def get_job(self, job_id: int | str) -> "Job":
        """Fetch one job (``GET /api/v1/jobs/{id}``) as a :class:`Job` handle."""
        return Job(self, self._json("GET", f"/jobs/{job_id}"))

    def jobs(self, limit: int = 100) -> Iterator[dict[str, Any]]:
        """Iterate over the jobs this token can see, newest first as the service orders them.

        Args:
            limit: Page size asked of the service (pages are fetched lazily as you iterate).

        Yields:
            Job JSON dicts (wrap one with ``Job(client, data)`` for a handle).
        """
        return self.paginate("/jobs", {"limit": limit})

    # ------------------------------------------------------------------ uploads

    def upload_model(self, module_or_path: Any, arch: str) -> dict[str, Any]:
        """Upload model weights (``POST /api/v1/models``, multipart ``file`` + form ``arch``).

        Args:
            module_or_path: A ``torch.nn.Module`` (its ``state_dict`` is saved as safetensors),
                a ``dict`` of tensor name -> tensor, or the path of a ``.safetensors`` file,
                sent as is.
            arch: The architecture the weights belong to: a zoo name, an import path that the
                workers allow, or a model spec (a dict or its JSON text), e.g.
                ``{"factory": "timm:create_model", "args": ["resnet18"], "kwargs": {"num_classes": 10}}``.

        Returns:
            The upload record: ``{"id", "kind", "arch", "size", "sha256", ...}``.
        """
        if isinstance(arch, Mapping):  # a model spec: {"factory": ..., "args": [...], "kwargs": {...}}
            import json

            arch = json.dumps(arch)
        if isinstance(module_or_path, (str, os.PathLike)):
            files = _file_factory(Path(module_or_path))
        else:
            payload = _safetensors_bytes(_state_dict(module_or_path))
            files = _bytes_factory(payload, "model.safetensors")
        return self._json("POST", "/models", files=files, data={"arch": arch})

    def upload_dataset(self, tensor_or_path: Any, labels: Any = None) -> dict[str, Any]:
        """Upload calibration inputs (``POST /api/v1/datasets``, multipart ``file``).

        Args:
            tensor_or_path: Inputs as a tensor or array (``n x ...``: the first dimension indexes
                samples), a dict of named inputs (``{"input_ids": ..., "attention_mask": ...}``,
                passed to the model as keyword arguments), or the path of a safetensors file
                holding them (and optionally ``labels``), sent as is.
            labels: Optional labels (``n``), stored as ``labels``, for task metrics.

        Returns:
            The upload record: ``{"id", "kind", "size", "sha256", "tensors", ...}``.
        """
        if isinstance(tensor_or_path, (str, os.PathLike)):
            if labels is not None:
                raise BocompressError("labels go inside the safetensors file when uploading a path")
            files = _file_factory(Path(tensor_or_path))
        else:
            import torch

            if isinstance(tensor_or_path, Mapping):  # named inputs: input_ids, attention_mask...
                tensors = {str(k): torch.as_tensor(v) for k, v in tensor_or_path.items()}
                first = next(iter(tensors.values()), None)
                tensors["inputs"] = first if first is not None else torch.empty(0)
                named = True
            else:
                tensors = {"inputs": torch.as_tensor(tensor_or_path)}
                named = False
            if labels is not None:
                tensors["labels"] = torch.as_tensor(labels)
                if tensors["labels"].shape[:1] != tensors["inputs"].shape[:1]:
                    raise BocompressError(
                        f"labels ({tuple(tensors['labels'].shape)}) and inputs "
                        f"({tuple(tensors['inputs'].shape)}) differ in their first dimension"
                    )
            if named:
                del tensors["inputs"]
            files = _bytes_factory(_safetensors_bytes(tensors), "dataset.safetensors")
        return self._json("POST", "/datasets", files=files)

    def download_model(self, model_id: str) -> bytes:
        """The uploaded weights of a model (``GET /api/v1/models/{id}/file``), safetensors bytes."""
        return self.request("GET", f"/models/{model_id}/file").content

    def download_dataset(self, dataset_id: str) -> bytes:
        """The uploaded calibration set (``GET /api/v1/datasets/{id}/file``), safetensors bytes."""
        return self.request("GET", f"/datasets/{dataset_id}/file").content

    # ------------------------------------------------------------------ worker side

    def lease(self, worker: str, kinds: list[str] | None = None) -> dict[str, Any] | None:
        """Ask for a task (``POST /api/v1/workers/lease``).

        Args:
            worker: This worker's name (shown in the trial's ``worker``).
            kinds: Task kinds it accepts (``profile``, ``evaluate``, ``export``); all when ``None``.

        Returns:
            ``{"task", "trial", "job", "lease"}``, or ``None`` when there is no work (204).
        """
        body: dict[str, Any] = {"worker": worker}
        if kinds is not None:
            body["kinds"] = list(kinds)
        response = self.request("POST", "/workers/lease", json=body)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def heartbeat(self, trial_id: int, lease_token: str | None = None) -> dict[str, Any]:
        """Extend a lease. Raises :class:`~bocompress.errors.ConflictError` once it is lost or the job cancelled."""
        return self._json("POST", f"/trials/{trial_id}/heartbeat", json={"lease_token": lease_token})

    def complete(
        self,
        trial_id: int,
        values: Mapping[str, float],
        sem: Mapping[str, float],
        profile: Any = None,
        artifact: Mapping[str, Any] | None = None,
        lease_token: str | None = None,
    ) -> dict[str, Any]:
        """Report a finished task (``POST /api/v1/trials/{id}/complete``; idempotent).

        Args:
            trial_id: The leased trial.
            values: Measured metrics (``distill_l2``, ``ratio``, ...).
            sem: Standard errors of the metrics that have one.
            profile: For a profiling task, the ``ProfileReport`` (model or dict).
            artifact: For an export task, the artifact's description.
        """
        body: dict[str, Any] = {"values": dict(values), "sem": dict(sem)}
        if profile is not None:
            body["profile"] = profile.model_dump(mode="json") if hasattr(profile, "model_dump") else profile
        if artifact is not None:
            body["artifact"] = dict(artifact)
        if lease_token is not None:
            body["lease_token"] = lease_token
        return self._json("POST", f"/trials/{trial_id}/complete", json=body)

    def fail(self, trial_id: int, error: str, retry: bool = False, lease_token: str | None = None) -> dict[str, Any]:
        """Report a failed task (``POST /api/v1/trials/{id}/fail``); ``retry`` asks to queue it again."""
        body: dict[str, Any] = {"error": error, "retry": retry}
        if lease_token is not None:
            body["lease_token"] = lease_token
        return self._json("POST", f"/trials/{trial_id}/fail", json=body)

    def upload_artifact(self, task_id: int, data: bytes, lease_token: str | None = None) -> dict[str, Any]:
        """Upload an export task's compressed model (safetensors bytes) before completing the task."""
        headers = {"X-Lease-Token": lease_token} if lease_token else None
        return self._json("POST", f"/trials/{task_id}/artifact", headers=headers,
                          files=_bytes_factory(data, "model.safetensors"))


def _state_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return dict(obj.state_dict())
    raise BocompressError(
        f"upload_model takes an nn.Module, a dict of tensors or a file path, not {type(obj).__name__}"
    )


def _safetensors_bytes(tensors: Mapping[str, Any]) -> bytes:
    """Serialize tensors with safetensors (no pickle). Shared or strided storage is copied first."""
    import torch
    from safetensors.torch import save

    out = {}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise BocompressError(f"{name!r} is a {type(value).__name__}, not a tensor")
        out[name] = value.detach().cpu().clone().contiguous()
    return save(out)


def _file_factory(path: Path) -> Callable[[], dict[str, Any]]:
    if not path.is_file():
        raise BocompressError(f"no such file: {path}")

    def files() -> dict[str, Any]:
        return {"file": (path.name, path.read_bytes(), "application/octet-stream")}

    return files


def _bytes_factory(payload: bytes, filename: str) -> Callable[[], dict[str, Any]]:
    def files() -> dict[str, Any]:
        return {"file": (filename, payload, "application/octet-stream")}

    return files


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

    def export(self, trial_id: int, finetune_steps: int = 0, lr: float = 1e-4) -> dict[str, Any]:
        """Ask a worker to build the compressed model of a trial (optionally distillation-fine-tuned).

        Returns:
            The service's answer (the export task's state); fetch the file with :meth:`download`.
        """
        return self.client._json(
            "POST", f"/jobs/{self.id}/trials/{trial_id}/export", json={"finetune_steps": finetune_steps, "lr": lr}
        )

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

