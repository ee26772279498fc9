"""Liveness, metrics and token administration."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from bocompress.schemas import TokenCreate, TokenOut
from bocompress.service.api.deps import AdminDep, CtxDep, RowId
from bocompress.service.api.errors import APIError
from bocompress.service.api.jobs import ERRORS
from bocompress.service.api.serialize import iso
from bocompress.service.auth import issue, revoke
from bocompress.service.db.models import Token
from bocompress.service.db.session import read_session, run_tx
from bocompress.service.db.errors import NotFound

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(ctx: CtxDep) -> Any:
    """Liveness: the process answers and the database is reachable."""
    try:
        with read_session(ctx.factory) as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        raise APIError(503, f"database unreachable: {type(exc).__name__}", "db_down") from None
    return {"status": "ok", "database": ctx.dialect, "auth": ctx.settings.auth}


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {
    "description": "the Prometheus text exposition format (version 0.0.4)",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(ctx: CtxDep) -> Response:
    """Prometheus metrics."""
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _token_out(t: Token, secret: str | None = None) -> dict[str, Any]:
    return {"id": t.id, "role": t.role, "owner": t.owner, "name": t.name, "created_at": iso(t.created_at),
            "revoked_at": iso(t.revoked_at), "token": secret}


@router.post("/api/v1/tokens", status_code=201, response_model=TokenOut, responses=ERRORS)
def create_token(body: TokenCreate, ctx: CtxDep, p: AdminDep) -> Any:
    """Mint a token (admin only); the secret is shown once."""

    def _mk(s: Session) -> dict[str, Any]:
        tok, secret = issue(s, body.role, body.owner, body.name)
        return _token_out(tok, secret)

    return run_tx(ctx.factory, _mk)


@router.get("/api/v1/tokens", responses=ERRORS)
def list_tokens(ctx: CtxDep, p: AdminDep) -> Any:
    with read_session(ctx.factory) as s:
        return {"items": [_token_out(t) for t in s.execute(select(Token).order_by(Token.id)).scalars()],
                "next_cursor": None}


@router.post("/api/v1/tokens/{token_id}/revoke", response_model=TokenOut, responses=ERRORS)
def revoke_token(token_id: RowId, ctx: CtxDep, p: AdminDep) -> Any:
    def _rv(s: Session) -> dict[str, Any]:
        t = s.get(Token, token_id)
        if t is None:
            raise NotFound("token", token_id)
        revoke(s, token_id)
        s.refresh(t)
        return _token_out(t)

    out = run_tx(ctx.factory, _rv)
    ctx._token_cache.clear()
    return out
