"""Job-level state of a worker: the model, calibration data, teacher outputs and Compressor of a job.

A worker evaluates many trials of the same job. Everything that depends only on the job (loading
the model, its calibration inputs, the original model's outputs on them, and the compressor with
its full factorizations) is built once and kept in a small LRU cache keyed by job id, so a trial
costs about one truncation and one forward pass over the calibration set.

Models come from three places, and only these:

* a zoo name (``digits-cnn``...): :func:`bocompress.worker.zoo.load_model` with its shipped weights;
* an uploaded model ``mdl_...``: its safetensors bytes are downloaded and read with
  ``safetensors.torch.load`` (never ``torch.load``/pickle) into the architecture the upload names
  (a zoo name, or an import path the worker allows);
* an import path ``package.module:factory`` (as the job's model or as an upload's ``arch``), or a
  model spec naming a factory and its JSON arguments (an upload's ``arch``, see
  :mod:`bocompress.modelspec`), only when it starts with one of the worker's allowed prefixes
  (``bocompress worker --allow-import``, ``BOCOMPRESS_WORKER_ALLOW_IMPORT``, comma-separated; none
  by default).

Calibration data: ``digits``/``digits-train``/``synthetic`` from the zoo, or an uploaded
``ds_...`` safetensors file with ``inputs`` (``N x ...``, float or integer) or several named
inputs (``input_ids``, ``attention_mask``..., passed as keyword arguments), and optional
``labels`` (``N``). The distilled output is ``compression.output`` (default: the tensor, the
first element of a tuple, or ``logits`` of a dict / ``ModelOutput``).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.modelspec import ModelSpec, ModelSpecError, build_model, import_allowed, parse_arch
from bocompress.schemas import IMPORT_PATH_RE
from bocompress.worker import batch as B

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


def _build_from_factory(arch: str | ModelSpec, prefixes: Sequence[str],
                        state_dict: Mapping[str, Tensor] | None) -> nn.Module:
    """Build ``arch`` (an import path or a :class:`ModelSpec`) and load ``state_dict`` strictly."""
    from bocompress.worker.zoo import check_state_dict

    name = arch.factory if isinstance(arch, ModelSpec) else arch
    try:
        model = build_model(arch, prefixes, f"start the workers with --allow-import (or {ALLOW_IMPORT_ENV})")
    except ModelSpecError as exc:
        raise TaskError(str(exc)) from exc
    if state_dict is not None:
        model.load_state_dict(check_state_dict(name, model, state_dict), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- loading


def _load_compressed_bytes(data: bytes, desc: dict[str, Any], ref: str,
                           allowed_prefixes: Sequence[str]) -> tuple[nn.Module, Any]:
    """An exported compressed model (``desc``: its description), rebuilt with
    :func:`bocompress.load_compressed`, and the original architecture the description names (a zoo
    name, an import path or a ModelSpec)."""
    import tempfile

    from bocompress.compressed import load_compressed
    from bocompress.errors import BocompressError

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        try:
            model = load_compressed(f.name, allow_import=list(allowed_prefixes)).eval()
            arch: Any = parse_arch(dict(desc["arch_spec"])) if desc.get("arch_spec") else str(desc["arch"])
        except (BocompressError, ModelSpecError, KeyError) as exc:
            raise TaskError(f"uploaded model {ref!r} (a compressed export): {exc}") from exc
    model._bocompress_compressed = True  # type: ignore[assignment]  # build_context describes exports against a fresh base
    return model, arch


def fresh_base(arch: Any, allowed_prefixes: Sequence[str]) -> nn.Module:
    """A fresh build of ``arch`` (no weights loaded): what an export of a model rebuilt from an
    earlier export is described against, so :func:`bocompress.load_compressed` rebuilds it from
    the original architecture in one file."""
    from bocompress.worker.zoo import ARCHS

    if isinstance(arch, str) and arch in ARCHS:
        return ARCHS[arch]().eval()
    return _build_from_factory(arch, allowed_prefixes, None)


def _safetensors_load(data: bytes, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load

    from bocompress.service.safetensors_check import MAX_HEADER, InvalidSafetensors, inspect

    try:  # the service's upload validator, so both sides agree on what a valid file is
        inspect(data, max_header_bytes=MAX_HEADER, max_tensors=None)
    except InvalidSafetensors as exc:
        raise TaskError(f"{what} is not a valid safetensors file: {exc}") from exc
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise TaskError(f"{what} is not a valid safetensors file: {exc}") from exc


def load_job_model(client: Any, ref: str, allowed_prefixes: Sequence[str]) -> tuple[nn.Module, str | ModelSpec]:
    """The job's original model, in eval mode on the cpu, and its architecture name.

    Args:
        client: a :class:`bocompress.Client` (to download uploaded weights).
        ref: the spec's ``compression.model``: a zoo name, an upload id ``mdl_...`` or an import path.
        allowed_prefixes: import-path prefixes this worker may import.

    Returns:
        ``(model, arch)``: ``arch`` is the zoo name, import path or :class:`ModelSpec` the model
        was built from.

    Raises:
        TaskError: unknown reference, an import path not allowed, an unreadable file.
        bocompress.worker.zoo.WeightsMismatch: uploaded weights that do not fit the architecture (the message
            names each offending tensor).
    """
    from bocompress.worker.zoo import ARCHS, load_model

    if ref in ARCHS:
        return load_model(ref), ref
    if _MODEL_ID_RE.match(ref):
        from bocompress.errors import NotFoundError

        try:
            meta = client._json("GET", f"/models/{ref}")
            data = client.download_model(ref)
        except NotFoundError as exc:
            raise TaskError(f"model {ref!r} was not found on the service") from exc
        arch: str | ModelSpec | None = meta.get("arch")
        if meta.get("arch_spec"):
            try:
                arch = parse_arch(dict(meta["arch_spec"]))
            except ModelSpecError as exc:
                raise TaskError(f"uploaded model {ref!r}: {exc}") from exc
        if not arch:
            raise TaskError(f"uploaded model {ref!r} names no architecture")
        from bocompress.compressed import description_of
        from bocompress.errors import BocompressError

        try:
            desc = description_of(data, f"uploaded model {ref!r}")
        except BocompressError as exc:
            raise TaskError(str(exc)) from exc
        if desc is not None:  # a bocompress export (a pipeline's fine-tuned first pass): rebuilt as described
            return _load_compressed_bytes(data, desc, ref, allowed_prefixes)
        state_dict = _safetensors_load(data, f"uploaded model {ref!r}")
        if isinstance(arch, str) and arch in ARCHS:
            return load_model(arch, state_dict), arch
        return _build_from_factory(arch, allowed_prefixes, state_dict), arch
    if IMPORT_PATH_RE.match(ref):
        return _build_from_factory(ref, allowed_prefixes, None), ref
    raise TaskError(
        f"model {ref!r} is neither a zoo model ({', '.join(sorted(ARCHS))}), an uploaded model id "
        "(mdl_...) nor an import path 'package.module:factory'"
    )


def _input_tensor(t: Tensor) -> Tensor:
    """A model input as models take it: floats as float32, integers (token ids, masks) as int64."""
    if t.is_floating_point():
        return t.float()
    if t.dtype == torch.bool:
        return t
    return t.long()


def dataset_inputs(tensors: Mapping[str, Tensor], what: str) -> B.Batch:
    """The model inputs of an uploaded dataset: ``inputs`` alone (one positional tensor), or every
    tensor but ``labels`` as keyword arguments (``input_ids``, ``attention_mask``...)."""
    names = [k for k in tensors if k != "labels"]
    if not names:
        raise TaskError(f"{what} holds no input tensor (found {sorted(tensors)})")
    if "inputs" in tensors:
        if len(names) > 1:
            raise TaskError(f"{what}: 'inputs' is the one positional input; found other inputs too: "
                            f"{sorted(set(names) - {'inputs'})}")
        return _input_tensor(tensors["inputs"])
    try:
        x = {k: _input_tensor(tensors[k]) for k in sorted(names)}
        B.n_samples(x)
    except B.BatchError as exc:
        raise TaskError(f"{what}: {exc}") from exc
    return x


def load_job_data(client: Any, ref: str, n: int, arch: Any, model: nn.Module) -> tuple[B.Batch, Tensor | None]:
    """The job's calibration inputs (``n x input shape``, cpu) and labels (``n``) or None.

    Inputs are a tensor, or for a dataset with named inputs a dict of tensors passed to the model
    as keyword arguments; floating-point inputs are float32 and integer ones (token ids) int64.

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
    from bocompress.worker.zoo import ARCHS, DATASETS, load_data

    if ref in DATASETS:
        if ref == "synthetic" and not (isinstance(arch, str) and arch in ARCHS):
            shape = getattr(model, "input_shape", None)
            if shape is None:
                raise TaskError(
                    f"synthetic data needs the input shape of {arch!r}: give the model an 'input_shape' "
                    "attribute or upload a dataset"
                )
            gen = torch.Generator().manual_seed(DATA_SEED)
            return torch.randn((n, *tuple(int(s) for s in shape)), generator=gen), None
        return load_data(ref, n, seed=DATA_SEED, arch=arch if isinstance(arch, str) and arch in ARCHS else None)
    if _DATASET_ID_RE.match(ref):
        from bocompress.errors import NotFoundError

        try:
            data = client.download_dataset(ref)
        except NotFoundError as exc:
            raise TaskError(f"dataset {ref!r} was not found on the service") from exc
        tensors = _safetensors_load(data, f"uploaded dataset {ref!r}")
        inputs = dataset_inputs(tensors, f"uploaded dataset {ref!r}")
        total = B.n_samples(inputs)
        labels = tensors.get("labels")
        if labels is not None:
            labels = labels.long()
            if tuple(labels.shape) != (total,):
                raise TaskError(f"dataset {ref!r}: labels {list(labels.shape)} do not match the {total} input samples")
        if total > n:
            gen = torch.Generator().manual_seed(DATA_SEED)
            idx = torch.randperm(total, generator=gen)[:n].sort().values
            inputs = B.take(inputs, idx)
            labels = labels[idx] if labels is not None else None
        return B.contiguous(inputs), labels
    raise TaskError(f"dataset {ref!r} is neither a built-in set ({', '.join(DATASETS)}) nor an uploaded id (ds_...)")


# --------------------------------------------------------------------------- the job context


@dataclass
class JobContext:
    """Everything a worker keeps about one job.

    Attributes:
        job_id: the job's id.
        arch: the architecture the model was built from (zoo name, import path or ModelSpec).
        model: the original network f*, eval mode, on ``device``.
        inputs: calibration inputs ``N x input shape`` (a tensor or a dict of named tensors) on
            ``device``.
        labels: ``N`` labels on ``device``, or None.
        teacher: the original's outputs ``N x output shape`` (float32) on ``device``.
        compressor: the job's :class:`~bocompress.worker.methods.base.Compressor` (factorizations cached).
        cost_kind: the objective's cost (``params``, ``flops``...).
        device: where the model and data live.
        build_seconds: how long building the context took.
        output: which part of the model's output is distilled (the spec's ``compression.output``).
        linearized: names of HuggingFace ``Conv1D`` layers turned into ``nn.Linear`` at load.
    """

    job_id: int
    arch: Any
    model: nn.Module
    inputs: B.Batch
    labels: Tensor | None
    teacher: Tensor
    compressor: Any
    cost_kind: str
    device: torch.device
    build_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    output: str | int | None = None
    linearized: list[str] = field(default_factory=list)
    holdout: Any = None  # bocompress.worker.proxy.Holdout: the held-out part of labelled data (accuracy only)
    proxy: Any = None  # bocompress.worker.proxy.ProxyOptions: BN re-estimation, fine-tuning, sensitivity
    #: What exports are described against: a fresh build of the original architecture when
    #: ``model`` was itself rebuilt from an export (None: ``model``).
    base: nn.Module | None = None

    @property
    def export_base(self) -> nn.Module:
        return self.base if self.base is not None else self.model


def build_context(client: Any, job: Mapping[str, Any], device: str | torch.device,
                  allowed_prefixes: Sequence[str]) -> JobContext:
    """Load the model and data of a compression job, compute the teacher outputs, build the compressor.

    Args:
        client: a :class:`bocompress.Client`.
        job: the job JSON of a lease (``id`` and ``spec`` are read).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        allowed_prefixes: import-path prefixes this worker may import.

    Raises:
        TaskError, bocompress.worker.zoo.WeightsMismatch, bocompress.worker.zoo.ZooError, bocompress.worker.methods.NoLayerMatched,
        bocompress.worker.methods.CompressionError: the job cannot run on any worker.
    """
    import time

    from bocompress.worker.evaluate import teacher_outputs
    from bocompress.worker.proxy import Holdout, ProxyOptions, split_holdout
    from bocompress.worker.methods import CompressorOptions, build_compressor

    t0 = time.perf_counter()
    spec = job.get("spec") or {}
    comp = spec.get("compression")
    if not comp:
        raise TaskError(f"job {job.get('id')} is not a compression job (no 'compression' in its spec)")
    dev = torch.device(device)
    from bocompress.worker.layers import linearize_conv1d

    model, arch = load_job_model(client, str(comp["model"]), allowed_prefixes)
    # a model rebuilt from an export (a two-pass pipeline's second pass): exports are described
    # against a fresh build of the original architecture, not against this model
    base = fresh_base(arch, allowed_prefixes) if getattr(model, "_bocompress_compressed", False) else None
    n = int(comp.get("n_calibration", 256))
    output = comp.get("output")
    linearized = linearize_conv1d(model)
    proxy = ProxyOptions.from_spec(comp)
    # n_calibration samples for the search, plus the held-out share when the data has labels
    n_all = int(math.ceil(n / (1.0 - proxy.holdout_fraction))) if proxy.holdout_fraction > 0 else n
    inputs, labels = load_job_data(client, str(comp["data"]), n_all, arch, model)
    inputs, labels, hold_x, hold_y = split_holdout(inputs, labels, proxy.holdout_fraction)
    if hold_x is None and B.n_samples(inputs) > n:
        inputs, labels = B.head(inputs, n), (labels[:n] if labels is not None else None)
    model = model.to(dev).eval()
    inputs = B.to_device(inputs, dev)
    labels = labels.to(dev) if labels is not None else None
    try:
        teacher = teacher_outputs(model, inputs, EVAL_BATCH_SIZE, dev, output=output)
    except B.BatchError as exc:
        raise TaskError(f"the model's output: {exc}") from exc
    if teacher.dim() < 1 or not teacher.is_floating_point():
        raise TaskError(f"the distilled output must be a floating-point tensor, got {teacher.dtype} "
                        f"{list(teacher.shape)}; choose another with compression.output")
    holdout = None
    if hold_x is not None:
        hold_x = B.to_device(hold_x, dev)
        holdout = Holdout(hold_x, hold_y.to(dev), teacher_outputs(model, hold_x, EVAL_BATCH_SIZE, dev, output=output))
    cost_kind = str((spec.get("objective") or {}).get("cost") or "params")
    compressor = build_compressor(
        model,
        comp["method"],
        comp.get("layers") or ["*"],
        float(comp.get("theta_min", 0.05)),
        B.head(inputs, TRACE_SAMPLES),
        CompressorOptions(cost_kind=cost_kind, calib_inputs=inputs, ls_correction=proxy.ls_correction),
    )
    return JobContext(
        job_id=int(job["id"]), arch=arch, model=model, inputs=inputs, labels=labels, teacher=teacher,
        compressor=compressor, cost_kind=cost_kind, device=dev, build_seconds=time.perf_counter() - t0,
        info={"n_calibration": B.n_samples(inputs)}, output=output, linearized=linearized,
        holdout=holdout, proxy=proxy, base=base,
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
