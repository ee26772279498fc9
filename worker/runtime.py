"""Job-level state of a worker: the model, calibration data, teacher outputs and Compressor of a job.

A worker evaluates many trials of the same job. Everything that depends only on the job (loading
the model, its calibration inputs, the original model's outputs on them, and the compressor with
its full factorizations) is built once and kept in a small LRU cache keyed by job id, so a trial
costs about one truncation and one forward pass over the calibration set.

Models come from three places, and only these:

* a zoo name (``digits-cnn``...): :func:`worker.zoo.load_model` with its shipped weights;
* an uploaded model ``mdl_...``: its safetensors bytes are downloaded and read with
  ``safetensors.torch.load`` (never ``torch.load``/pickle) into the architecture the upload names
  (a zoo name, or an import path the worker allows);
* an import path ``package.module:factory`` (as the job's model or as an upload's ``arch``), only
  when it starts with one of the worker's allowed prefixes (``BOCOMPRESS_WORKER_ALLOW_IMPORT``,
  comma-separated; none by default).

Calibration data: ``digits``/``digits-train``/``synthetic`` from the zoo, or an uploaded
``ds_...`` safetensors file with ``inputs`` (``N x ...``) and optional ``labels`` (``N``).
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.schemas import IMPORT_PATH_RE

__all__ = [
    "ALLOW_IMPORT_ENV",
    "EVAL_BATCH_SIZE",
    "DATA_SEED",
    "TaskError",
    "JobContext",
    "JobCache",
    "allowed_prefixes_from_env",
    "import_allowed",
    "load_job_model",
    "load_job_data",
    "build_context",
]

#: Environment variable listing the import-path prefixes a worker may import models from.
ALLOW_IMPORT_ENV = "BOCOMPRESS_WORKER_ALLOW_IMPORT"
#: Samples per forward pass when computing teacher outputs and evaluating trials.
EVAL_BATCH_SIZE = 512
#: Seed of the calibration subset (fixed, so that every worker of a job uses the same inputs).
DATA_SEED = 0
#: Samples traced to measure spatial sizes and FLOPs when building the compressor.
TRACE_SAMPLES = 8

_MODEL_ID_RE = re.compile(r"^mdl_[0-9a-f]+$")
_DATASET_ID_RE = re.compile(r"^ds_[0-9a-f]+$")


class TaskError(Exception):
    """A task cannot succeed on any worker (bad model reference, weights that do not fit...).

    The loop reports it with ``retry=False``: retrying elsewhere would fail the same way.
    """


# --------------------------------------------------------------------------- import paths


def allowed_prefixes_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The allowed import-path prefixes from ``BOCOMPRESS_WORKER_ALLOW_IMPORT`` (comma-separated)."""
    raw = (environ if environ is not None else os.environ).get(ALLOW_IMPORT_ENV, "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def import_allowed(path: str, prefixes: Sequence[str]) -> bool:
    """Whether the import path ``package.module:factory`` starts with one of ``prefixes``.

    A prefix names a package or module (``mypkg`` allows ``mypkg:f`` and ``mypkg.models:f`` but
    not ``mypkg2.models:f``); a prefix ending in ``.`` or ``:`` is matched as a plain string prefix.
    """
    module = path.split(":", 1)[0]
    for prefix in prefixes:
        if prefix.endswith((".", ":")):
            if path.startswith(prefix):
                return True
        elif module == prefix or module.startswith(prefix + "."):
            return True
    return False


def _import_factory(path: str, prefixes: Sequence[str]) -> Callable[[], nn.Module]:
    if not IMPORT_PATH_RE.match(path):
        raise TaskError(f"{path!r} is not an import path 'package.module:factory'")
    if not import_allowed(path, prefixes):
        allowed = ", ".join(prefixes) if prefixes else "none"
        raise TaskError(
            f"import path {path!r} is not allowed on this worker (allowed prefixes: {allowed}); "
            f"set {ALLOW_IMPORT_ENV} on the workers to allow it"
        )
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import {module_name!r} for model {path!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise TaskError(f"{module_name!r} has no callable {attr!r} (model {path!r})")
    return factory


def _build_from_factory(path: str, prefixes: Sequence[str], state_dict: Mapping[str, Tensor] | None) -> nn.Module:
    from worker.zoo import check_state_dict

    factory = _import_factory(path, prefixes)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TaskError(f"{path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if state_dict is not None:
        model.load_state_dict(check_state_dict(path, model, state_dict), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- loading


def _safetensors_load(data: bytes, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load

    from service.safetensors_check import MAX_HEADER, InvalidSafetensors, inspect

    try:  # the service's upload validator, so both sides agree on what a valid file is
        inspect(data, max_header_bytes=MAX_HEADER, max_tensors=None)
    except InvalidSafetensors as exc:
        raise TaskError(f"{what} is not a valid safetensors file: {exc}") from exc
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise TaskError(f"{what} is not a valid safetensors file: {exc}") from exc


def load_job_model(client: Any, ref: str, allowed_prefixes: Sequence[str]) -> tuple[nn.Module, str]:
    """The job's original model, in eval mode on the cpu, and its architecture name.

    Args:
        client: a :class:`bocompress.Client` (to download uploaded weights).
        ref: the spec's ``compression.model``: a zoo name, an upload id ``mdl_...`` or an import path.
        allowed_prefixes: import-path prefixes this worker may import.

    Returns:
        ``(model, arch)``: ``arch`` is the zoo name or import path the model was built from.

    Raises:
        TaskError: unknown reference, an import path not allowed, an unreadable file.
        worker.zoo.WeightsMismatch: uploaded weights that do not fit the architecture (the message
            names each offending tensor).
    """
    from worker.zoo import ARCHS, load_model

    if ref in ARCHS:
        return load_model(ref), ref
    if _MODEL_ID_RE.match(ref):
        from bocompress.errors import NotFoundError

        try:
            meta = client._json("GET", f"/models/{ref}")
            data = client.download_model(ref)
        except NotFoundError as exc:
            raise TaskError(f"model {ref!r} was not found on the service") from exc
        arch = meta.get("arch")
        if not arch:
            raise TaskError(f"uploaded model {ref!r} names no architecture")
        state_dict = _safetensors_load(data, f"uploaded model {ref!r}")
        if arch in ARCHS:
            return load_model(arch, state_dict), arch
        return _build_from_factory(arch, allowed_prefixes, state_dict), arch
    if IMPORT_PATH_RE.match(ref):
        return _build_from_factory(ref, allowed_prefixes, None), ref
    raise TaskError(
        f"model {ref!r} is neither a zoo model ({', '.join(sorted(ARCHS))}), an uploaded model id "
        "(mdl_...) nor an import path 'package.module:factory'"
    )


def load_job_data(client: Any, ref: str, n: int, arch: str, model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The job's calibration inputs (``n x input shape``, float32, cpu) and labels (``n``) or None.

    Args:
        client: a :class:`bocompress.Client` (to download an uploaded dataset).
        ref: the spec's ``compression.data``: a zoo dataset or an upload id ``ds_...``.
        n: ``n_calibration``: at most this many samples (a seeded subset when there are more).
        arch: the model's architecture (the input shape of ``synthetic`` data).
        model: the model; for ``synthetic`` data of a non-zoo model, its ``input_shape``
            attribute (one sample's shape) is used.

    Raises:
        TaskError: unknown dataset, synthetic data without a known input shape, a bad file.
    """
    from worker.zoo import ARCHS, DATASETS, load_data

    if ref in DATASETS:
        if ref == "synthetic" and arch not in ARCHS:
            shape = getattr(model, "input_shape", None)
            if shape is None:
                raise TaskError(
                    f"synthetic data needs the input shape of {arch!r}: give the model an 'input_shape' "
                    "attribute or upload a dataset"
                )
            gen = torch.Generator().manual_seed(DATA_SEED)
            return torch.randn((n, *tuple(int(s) for s in shape)), generator=gen), None
        return load_data(ref, n, seed=DATA_SEED, arch=arch if arch in ARCHS else None)
    if _DATASET_ID_RE.match(ref):
        from bocompress.errors import NotFoundError

        try:
            data = client.download_dataset(ref)
        except NotFoundError as exc:
            raise TaskError(f"dataset {ref!r} was not found on the service") from exc
        tensors = _safetensors_load(data, f"uploaded dataset {ref!r}")
        if "inputs" not in tensors:
            raise TaskError(f"uploaded dataset {ref!r} has no tensor 'inputs' (found {sorted(tensors)})")
        inputs = tensors["inputs"].float()
        labels = tensors.get("labels")
        if labels is not None:
            labels = labels.long()
            if labels.shape != inputs.shape[:1]:
                raise TaskError(f"dataset {ref!r}: labels {list(labels.shape)} do not match inputs {list(inputs.shape)}")
        if len(inputs) > n:
            gen = torch.Generator().manual_seed(DATA_SEED)
            idx = torch.randperm(len(inputs), generator=gen)[:n].sort().values
            inputs = inputs[idx]
            labels = labels[idx] if labels is not None else None
        return inputs.contiguous(), labels
    raise TaskError(f"dataset {ref!r} is neither a built-in set ({', '.join(DATASETS)}) nor an uploaded id (ds_...)")


# --------------------------------------------------------------------------- the job context


@dataclass
class JobContext:
    """Everything a worker keeps about one job.

    Attributes:
        job_id: the job's id.
        arch: the architecture the model was built from (zoo name or import path).
        model: the original network f*, eval mode, on ``device``.
        inputs: calibration inputs ``N x input shape`` on ``device``.
        labels: ``N`` labels on ``device``, or None.
        teacher: the original's outputs ``N x output shape`` (float32) on ``device``.
        compressor: the job's :class:`~worker.methods.base.Compressor` (factorizations cached).
        cost_kind: the objective's cost (``params``, ``flops``...).
        device: where the model and data live.
        build_seconds: how long building the context took.
    """

    job_id: int
    arch: str
    model: nn.Module
    inputs: Tensor
    labels: Tensor | None
    teacher: Tensor
    compressor: Any
    cost_kind: str
    device: torch.device
    build_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def build_context(client: Any, job: Mapping[str, Any], device: str | torch.device,
                  allowed_prefixes: Sequence[str]) -> JobContext:
    """Load the model and data of a compression job, compute the teacher outputs, build the compressor.

    Args:
        client: a :class:`bocompress.Client`.
        job: the job JSON of a lease (``id`` and ``spec`` are read).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        allowed_prefixes: import-path prefixes this worker may import.

    Raises:
        TaskError, worker.zoo.WeightsMismatch, worker.zoo.ZooError, worker.methods.NoLayerMatched,
        worker.methods.CompressionError: the job cannot run on any worker.
    """
    import time

    from worker.evaluate import teacher_outputs
    from worker.methods import build_compressor

    t0 = time.perf_counter()
    spec = job.get("spec") or {}
    comp = spec.get("compression")
    if not comp:
        raise TaskError(f"job {job.get('id')} is not a compression job (no 'compression' in its spec)")
    dev = torch.device(device)
    model, arch = load_job_model(client, str(comp["model"]), allowed_prefixes)
    n = int(comp.get("n_calibration", 256))
    inputs, labels = load_job_data(client, str(comp["data"]), n, arch, model)
    model = model.to(dev).eval()
    inputs = inputs.to(dev)
    labels = labels.to(dev) if labels is not None else None
    teacher = teacher_outputs(model, inputs, EVAL_BATCH_SIZE, dev)
    compressor = build_compressor(
        model,
        comp["method"],
        list(comp.get("layers") or ["*"]),
        float(comp.get("theta_min", 0.05)),
        inputs[:TRACE_SAMPLES],
    )
    cost_kind = str((spec.get("objective") or {}).get("cost") or "params")
    return JobContext(
        job_id=int(job["id"]), arch=arch, model=model, inputs=inputs, labels=labels, teacher=teacher,
        compressor=compressor, cost_kind=cost_kind, device=dev, build_seconds=time.perf_counter() - t0,
        info={"n_calibration": int(len(inputs))},
    )


class JobCache:
    """An LRU cache of :class:`JobContext` by job id, safe to use from several threads.

    Args:
        builder: ``job JSON -> JobContext``.
        max_jobs: how many jobs to keep (the least recently used one is dropped beyond that).
    """

    def __init__(self, builder: Callable[[Mapping[str, Any]], JobContext], max_jobs: int = 3) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        self._builder = builder
        self.max_jobs = int(max_jobs)
        self._items: OrderedDict[int, JobContext] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, job: Mapping[str, Any]) -> tuple[JobContext, bool]:
        """The context of ``job``, built on first use.

        Returns:
            ``(context, built)``: ``built`` is True when it was built by this call.
        """
        job_id = int(job["id"])
        with self._lock:
            if job_id in self._items:
                self._items.move_to_end(job_id)
                return self._items[job_id], False
            # Built under the lock: two threads of one worker never build the same job twice, and a
            # worker only runs one task at a time (an abandoned one may still be finishing).
            ctx = self._builder(job)
            self._items[job_id] = ctx
            dropped = []
            while len(self._items) > self.max_jobs:
                dropped.append(self._items.popitem(last=False)[1])
        if dropped and any(c.device.type == "cuda" for c in dropped):
            del dropped
            torch.cuda.empty_cache()
        return ctx, True

    def drop(self, job_id: int) -> None:
        """Forget a job (e.g. once it is cancelled)."""
        with self._lock:
            self._items.pop(int(job_id), None)
