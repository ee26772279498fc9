"""Liveness, metrics and token administration."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from bocompress.schemas import TokenCreate, TokenOut
from bocompress.service.api.deps import AdminDep, CtxDep, RowId
from bocompress.service.api.errors import APIError
from bocompress.service.api.jobs import ERRORS

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz(ctx: CtxDep) -> Any:
    """Liveness: the process answers and the database is reachable."""
    try:
        database = await ctx.store.ping()
    except Exception as exc:  # noqa: BLE001
        raise APIError(503, f"database unreachable: {type(exc).__name__}", "db_down") from None
    return {"status": "ok", "database": database, "auth": ctx.settings.auth}


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {
    "description": "the Prometheus text exposition format (version 0.0.4)",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(ctx: CtxDep) -> Response:
    """Prometheus metrics."""
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/api/v1/tokens", status_code=201, response_model=TokenOut, responses=ERRORS)
async def create_token(body: TokenCreate, ctx: CtxDep, p: AdminDep) -> Any:
    """Mint a token (admin only); the secret is shown once."""
    return await ctx.store.create_token(body.role, body.owner, body.name)


@router.get("/api/v1/tokens", responses=ERRORS)
async def list_tokens(ctx: CtxDep, p: AdminDep) -> Any:
    return {"items": await ctx.store.list_tokens(), "next_cursor": None}


@router.post("/api/v1/tokens/{token_id}/revoke", response_model=TokenOut, responses=ERRORS)
async def revoke_token(token_id: RowId, ctx: CtxDep, p: AdminDep) -> Any:
    out = await ctx.store.revoke_token(token_id)
    ctx._token_cache.clear()
    return out
