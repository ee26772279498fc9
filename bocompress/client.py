"""The Python client of the bocompress service.

``Client`` speaks the v1 wire contract (DESIGN.md) over httpx: it retries what is safe to retry
(connection errors, timeouts, 408, 429, 5xx, and a 409 that carries ``Retry-After``) with a
jittered exponential backoff that honours ``Retry-After``, sends one ``Idempotency-Key`` per
logical POST (the same on each of its retries, so a create that timed out after the service stored
it returns the same job), and turns error responses into the typed errors of
:mod:`bocompress.errors`.

``Job`` (:mod:`bocompress.job`, importable from here too) is a handle on one job: ``wait()`` with
a progress bar, ``trials()`` as a DataFrame, ``plot()``, ``pareto()``, ask/tell for
client-evaluated jobs, and export/download of a compressed model.

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
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import httpx

from .errors import APIConnectionError, APITimeoutError, BocompressError, status_error
from .job import JOB_DONE_STATES, CollapseWarning, Job  # importable from here, as before the split
from .schemas import API_PREFIX, JobCreate
from .uploads import bytes_files, dataset_files, model_files

__all__ = ["Client", "Job", "DEFAULT_URL", "JOB_DONE_STATES"]

DEFAULT_URL = "http://127.0.0.1:8000"


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

    def create_job(self, spec: Mapping[str, Any] | JobCreate, idempotency_key: str | None = None) -> "Job":
        """Create a job (``POST /api/v1/jobs``).

        Args:
            spec: The job spec of DESIGN.md (compression or generic form), as a dict or a
                :class:`~bocompress.schemas.JobCreate`. A dict is sent as is; the service
                validates it (a mistake is an :class:`~bocompress.errors.UnprocessableEntityError`
                naming the field).
            idempotency_key: The ``Idempotency-Key`` (default: a fresh one, so only this call's own
                retries are deduplicated). Pass your own, e.g. one per row of a batch script, and
                a rerun of the script answers the jobs it already made instead of new ones.

        Returns:
            A :class:`Job` handle.
        """
        body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobCreate) else dict(spec)
        return Job(self, self._json("POST", "/jobs", json=body, idempotency_key=idempotency_key))

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
        return self._json("POST", "/models", files=model_files(module_or_path), data={"arch": arch})

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
        return self._json("POST", "/datasets", files=dataset_files(tensor_or_path, labels))

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
                          files=bytes_files(data, "model.safetensors"))
