"""Uploads: model weights and calibration datasets, as safetensors only (nothing is unpickled)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from bocompress.modelspec import MAX_SPEC_BYTES, ModelSpecError, parse_arch
from bocompress.schemas import IMPORT_PATH_RE, ZOO_MODELS, UploadOut
from bocompress.service.api.deps import AnyRoleDep, ClientDep, CtxDep
from bocompress.service.api.errors import APIError, bad_request
from bocompress.service.api.jobs import ERRORS
from bocompress.service.api.serialize import iso
from bocompress.service.auth import Principal
from bocompress.service.db.models import Blob, new_blob
from bocompress.service.db.session import read_session, run_tx
from bocompress.service.db.errors import NotFound
from bocompress.service.safetensors_check import InvalidSafetensors, check_bounds, check_prefix, inspect

router = APIRouter(prefix="/api/v1", tags=["uploads"])
_ID_RE = re.compile(r"^(mdl|ds|art)_[0-9a-f]{24}$")
#: What ``arch`` may be: a zoo model or an import path (the form field's pattern in the OpenAPI document).
#: A zoo name, an import path, or a JSON model spec (an object): documented in the schema; the route
#: checks it itself, so the 422 says which of the three failed and why.
ARCH_PATTERN = "^(?:" + "|".join(ZOO_MODELS) + "|" + IMPORT_PATH_RE.pattern[1:-1] + r"|\{[\s\S]*\})$"
#: A safetensors download.
FILE_RESPONSE: dict[str, Any] = {"description": "the file (safetensors), its sha256 in X-Sha256",
                                 "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}


#: An upload's answer lists at most this many tensors (name -> shape); ``n_tensors`` counts them all.
SUMMARY_TENSORS = 100


def blob_out(b: Blob) -> dict[str, Any]:
    """An upload as the API shows it: a summary of its header, never the whole of it."""
    tensors = b.tensors or {}
    shown = {k: tensors[k]["shape"] for k in sorted(tensors)[:SUMMARY_TENSORS]}
    out = {"id": b.id, "kind": b.kind, "arch": b.arch, "size": b.size, "sha256": b.sha256,
           "created_at": iso(b.created_at), "tensors": shown, "n_tensors": len(tensors),
           "tensors_truncated": len(tensors) > len(shown)}
    if b.meta and b.meta.get("arch_spec"):
        out["arch_spec"] = b.meta["arch_spec"]
    return out


async def checked_safetensors(ctx: Any, data: bytes) -> dict[str, dict]:
    """:func:`bocompress.service.safetensors_check.inspect` under the service's header bounds.

    The bounds are checked first, on the event loop (they read 8 bytes and count one key); the
    JSON header is parsed in the thread pool, so a large one never stalls other requests.
    """
    st = ctx.settings
    try:
        check_bounds(data, st.max_safetensors_header_bytes, st.max_safetensors_tensors)
        return await run_in_threadpool(inspect, data, st.max_safetensors_header_bytes, st.max_safetensors_tensors)
    except InvalidSafetensors as exc:
        raise bad_request("file", str(exc)) from None


async def _read_limited(request: Request, file: UploadFile, limit: int, ctx: Any = None) -> bytes:
    """The uploaded file's bytes, at most ``limit`` (else 413). With ``ctx``, a safetensors header
    longer than the service's bound is refused from the first chunk, before the rest is read."""
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit + 64 * 1024:
        raise APIError(413, f"file: larger than the limit of {limit} bytes", "too_large")
    chunks, total = [], 0
    while True:
        chunk = await file.read(1024 * 1024)
        if not chunk:
            break
        if not chunks and ctx is not None:
            try:
                check_prefix(chunk, ctx.settings.max_safetensors_header_bytes)
            except InvalidSafetensors as exc:
                raise bad_request("file", str(exc)) from None
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"file: larger than the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _store(ctx, p: Principal, kind: str, data: bytes, arch: str | None, tensors: dict,  # type: ignore[no-untyped-def]
           meta: dict | None = None) -> dict[str, Any]:
    blob = new_blob(kind, p.owner, data, tensors, arch=arch, meta=meta)

    def _add(s: Session) -> dict[str, Any]:
        s.add(blob)
        s.flush()
        return blob_out(blob)

    return run_tx(ctx.factory, _add)


@router.post("/models", status_code=201, response_model=UploadOut, responses={**ERRORS, 413: {"description": "too large"}})
async def upload_model(request: Request, ctx: CtxDep, p: ClientDep, file: UploadFile,
                       arch: Annotated[str, Form(min_length=1, max_length=MAX_SPEC_BYTES, json_schema_extra={"pattern": ARCH_PATTERN})]) -> Any:
    """Upload weights (safetensors) for a zoo architecture, an import path the workers allow, or a
    model spec (a JSON object: ``factory`` + ``args``/``kwargs``/``config``; validated, never imported)."""
    meta = None
    try:
        spec = parse_arch(arch)
    except ModelSpecError as exc:
        raise bad_request("arch", str(exc)) from None
    if spec is not None:
        meta = {"arch_spec": spec.model_dump(exclude_defaults=True)}
        arch = spec.factory
    elif len(arch) > 200:
        raise bad_request("arch", "at most 200 characters (or a JSON model spec)")
    elif arch not in ZOO_MODELS and not IMPORT_PATH_RE.match(arch):
        raise bad_request("arch", f"{arch!r} is neither a zoo model ({', '.join(ZOO_MODELS)}), "
                                  "an import path 'package.module:factory' nor a JSON model spec "
                                  "{\"factory\": ..., \"args\": [...], \"kwargs\": {...}}")
    data = await _read_limited(request, file, ctx.settings.max_upload_bytes, ctx)
    tensors = await checked_safetensors(ctx, data)
    return await run_in_threadpool(_store, ctx, p, "model", data, arch, tensors, meta)


@router.post("/datasets", status_code=201, response_model=UploadOut, responses={**ERRORS, 413: {"description": "too large"}})
async def upload_dataset(request: Request, ctx: CtxDep, p: ClientDep, file: UploadFile) -> Any:
    """Upload calibration inputs (safetensors) and optional ``labels`` (an integer vector of length N).

    The inputs are one tensor ``inputs`` (``N x ...``, passed to the model as its one argument), or
    several named tensors sharing ``N`` (``input_ids``, ``attention_mask``..., passed as keyword
    arguments). Floating-point or integer (token ids) dtypes.
    """
    data = await _read_limited(request, file, ctx.settings.max_upload_bytes, ctx)
    tensors = await checked_safetensors(ctx, data)
    check_dataset_tensors(tensors)
    return await run_in_threadpool(_store, ctx, p, "dataset", data, None, tensors)


#: dtypes a model input may have: floats, or integers (token ids, masks) and booleans.
_INPUT_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
#: Most named input tensors in one dataset.
MAX_INPUTS = 16


def check_dataset_tensors(tensors: dict[str, Any]) -> None:
    """The dataset rules (see :func:`upload_dataset`); a 400 naming the field and the tensor."""
    inputs = [k for k in tensors if k != "labels"]
    if not inputs:
        raise bad_request("file", "needs a tensor named 'inputs', or named input tensors such as 'input_ids' "
                                  f"(found {', '.join(sorted(tensors)) or 'none'})")
    if "inputs" in tensors and len(inputs) > 1:
        raise bad_request("file", f"'inputs' is the one positional input: with it, only 'labels' may be given "
                                  f"(found also {sorted(set(inputs) - {'inputs'})})")
    if len(inputs) > MAX_INPUTS:
        raise bad_request("file", f"at most {MAX_INPUTS} input tensors, got {len(inputs)}")
    n = None
    for name in sorted(inputs):
        if not name.isidentifier():
            raise bad_request("file", f"input tensor {name!r}: a name must be a Python identifier (it is passed "
                                      "as a keyword argument)")
        info = tensors[name]
        shape = info["shape"]
        if len(shape) < 1 or shape[0] < 1 or (name == "inputs" and len(shape) < 2):
            want = "N x ..." if name == "inputs" else "N or N x ..."
            raise bad_request("file", f"{name!r} must be {want} with N >= 1, got shape {shape}")
        if info["dtype"] not in _INPUT_DTYPES:
            raise bad_request("file", f"{name!r} has dtype {info['dtype']}: a model input is a float or integer tensor")
        if n is None:
            n = shape[0]
        elif shape[0] != n:
            raise bad_request("file", f"the input tensors disagree on N: {name!r} has {shape[0]} samples, "
                                      f"others {n}")
    if "labels" in tensors:
        ls = tensors["labels"]
        if ls["shape"] != [n] or ls["dtype"] not in ("I64", "I32", "I16", "I8", "U8"):
            raise bad_request("file", f"'labels' must be an integer vector of length {n}")


def _get_blob(ctx, blob_id: str, kind: str, p: Principal) -> Blob:  # type: ignore[no-untyped-def]
    if not _ID_RE.match(blob_id):
        raise NotFound(kind, blob_id)
    with read_session(ctx.factory) as s:
        b = s.get(Blob, blob_id)
        if b is None or b.kind != kind or (p.role == "client" and b.owner != p.owner):
            raise NotFound(kind, blob_id)
        return b


@router.get("/models/{model_id}", response_model=UploadOut, responses=ERRORS)
def get_model(model_id: str, ctx: CtxDep, p: AnyRoleDep) -> Any:
    return blob_out(_get_blob(ctx, model_id, "model", p))


@router.get("/models/{model_id}/file", response_class=Response, responses={**ERRORS, 200: FILE_RESPONSE})
def get_model_file(model_id: str, ctx: CtxDep, p: AnyRoleDep) -> Response:
    b = _get_blob(ctx, model_id, "model", p)
    return Response(b.data, media_type="application/octet-stream", headers={"X-Sha256": b.sha256})


@router.get("/datasets/{dataset_id}", response_model=UploadOut, responses=ERRORS)
def get_dataset(dataset_id: str, ctx: CtxDep, p: AnyRoleDep) -> Any:
    return blob_out(_get_blob(ctx, dataset_id, "dataset", p))


@router.get("/datasets/{dataset_id}/file", response_class=Response, responses={**ERRORS, 200: FILE_RESPONSE})
def get_dataset_file(dataset_id: str, ctx: CtxDep, p: AnyRoleDep) -> Response:
    b = _get_blob(ctx, dataset_id, "dataset", p)
    return Response(b.data, media_type="application/octet-stream", headers={"X-Sha256": b.sha256})
