"""Uploads: model weights and calibration datasets, as safetensors only (nothing is unpickled)."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import Response
from sqlalchemy.orm import Session

from bocompress.schemas import IMPORT_PATH_RE, ZOO_MODELS, UploadOut
from service.api.deps import AnyRoleDep, ClientDep, CtxDep
from service.api.errors import APIError, bad_request
from service.api.jobs import ERRORS
from service.api.serialize import iso
from service.auth import Principal
from service.db.models import Blob, utcnow
from service.db.session import read_session, run_tx
from service.db.trials import NotFound
from service.safetensors_check import InvalidSafetensors, inspect

router = APIRouter(prefix="/api/v1", tags=["uploads"])
_ID_RE = re.compile(r"^(mdl|ds|art)_[0-9a-f]{24}$")
#: What ``arch`` may be: a zoo model or an import path (the form field's pattern in the OpenAPI document).
ARCH_PATTERN = "^(?:" + "|".join(ZOO_MODELS) + "|" + IMPORT_PATH_RE.pattern[1:-1] + ")$"
#: A safetensors download.
FILE_RESPONSE: dict[str, Any] = {"description": "the file (safetensors), its sha256 in X-Sha256",
                                 "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}


def blob_out(b: Blob) -> dict[str, Any]:
    return {"id": b.id, "kind": b.kind, "arch": b.arch, "size": b.size, "sha256": b.sha256,
            "created_at": iso(b.created_at), "tensors": {k: v["shape"] for k, v in (b.tensors or {}).items()}}


async def _read_limited(request: Request, file: UploadFile, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit + 64 * 1024:
        raise APIError(413, f"file: larger than the limit of {limit} bytes", "too_large")
    chunks, total = [], 0
    while True:
        chunk = await file.read(1024 * 1024)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"file: larger than the limit of {limit} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def new_blob(kind: str, owner: str, data: bytes, tensors: dict, arch: str | None = None,
             meta: dict | None = None) -> Blob:
    """A stored upload or artifact: a fresh id with its kind's prefix, size and sha256 of ``data``."""
    prefix = {"model": "mdl", "dataset": "ds", "artifact": "art"}[kind]
    return Blob(id=f"{prefix}_{secrets.token_hex(12)}", kind=kind, owner=owner, arch=arch, size=len(data),
                sha256=hashlib.sha256(data).hexdigest(), tensors=tensors, meta=meta, data=data, created_at=utcnow())


def _store(ctx, p: Principal, kind: str, data: bytes, arch: str | None, tensors: dict) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    blob = new_blob(kind, p.owner, data, tensors, arch=arch)

    def _add(s: Session) -> dict[str, Any]:
        s.add(blob)
        s.flush()
        return blob_out(blob)

    return run_tx(ctx.factory, _add)


@router.post("/models", status_code=201, response_model=UploadOut, responses={**ERRORS, 413: {"description": "too large"}})
async def upload_model(request: Request, ctx: CtxDep, p: ClientDep, file: UploadFile,
                       arch: Annotated[str, Form(min_length=1, max_length=200, pattern=ARCH_PATTERN)]) -> Any:
    """Upload weights (safetensors) for a zoo architecture or an import path the workers allow."""
    if arch not in ZOO_MODELS and not IMPORT_PATH_RE.match(arch):
        raise bad_request("arch", f"{arch!r} is neither a zoo model ({', '.join(ZOO_MODELS)}) "
                                  "nor an import path 'package.module:factory'")
    data = await _read_limited(request, file, ctx.settings.max_upload_bytes)
    try:
        tensors = inspect(data)
    except InvalidSafetensors as exc:
        raise bad_request("file", str(exc)) from None
    return _store(ctx, p, "model", data, arch, tensors)


@router.post("/datasets", status_code=201, response_model=UploadOut, responses={**ERRORS, 413: {"description": "too large"}})
async def upload_dataset(request: Request, ctx: CtxDep, p: ClientDep, file: UploadFile) -> Any:
    """Upload calibration inputs: safetensors with a tensor ``inputs`` (N x ...) and optional ``labels`` (N)."""
    data = await _read_limited(request, file, ctx.settings.max_upload_bytes)
    try:
        tensors = inspect(data)
    except InvalidSafetensors as exc:
        raise bad_request("file", str(exc)) from None
    if "inputs" not in tensors:
        raise bad_request("file", f"needs a tensor named 'inputs' (found {', '.join(sorted(tensors))})")
    extra = set(tensors) - {"inputs", "labels"}
    if extra:
        raise bad_request("file", f"unexpected tensors {sorted(extra)}: only 'inputs' and 'labels'")
    shape = tensors["inputs"]["shape"]
    if len(shape) < 2 or shape[0] < 1:
        raise bad_request("file", f"'inputs' must be N x ... with N >= 1, got shape {shape}")
    if tensors["inputs"]["dtype"] not in ("F32", "F16", "BF16", "F64"):
        raise bad_request("file", "'inputs' must be a floating-point tensor")
    if "labels" in tensors:
        ls = tensors["labels"]
        if ls["shape"] != [shape[0]] or ls["dtype"] not in ("I64", "I32", "I16", "I8", "U8"):
            raise bad_request("file", f"'labels' must be an integer vector of length {shape[0]}")
    return _store(ctx, p, "dataset", data, None, tensors)


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
