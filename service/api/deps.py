"""Dependencies declared once and used by every route (the service context, the caller)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from bocompress.service.api.errors import APIError
from bocompress.service.api.serialize import CURSOR_PATTERN
from bocompress.service.auth import LOCAL_ADMIN, Principal, lookup
from bocompress.service.config import Settings
from bocompress.service.db.session import read_session
from bocompress.service.db.store import Store, Viewer


@dataclass
class Context:
    """Everything a request needs; built by create_app, never at import time."""

    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    metrics: Any
    #: The jobs and trials (bocompress.service.db.store.Store): every route's one call.
    store: Store
    scheduler: Any = None
    _token_cache: dict[str, tuple[float, Principal | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def cached_principal(self, secret: str) -> tuple[bool, Principal | None]:
        """(hit, principal) from the in-process cache: no I/O, safe on the event loop."""
        hit = self._token_cache.get(secret)
        if hit and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def principal_for(self, secret: str) -> Principal | None:
        """The caller a token names (None: unknown or revoked); cached 2 s, so a revoke takes effect within 2 s."""
        hit, p = self.cached_principal(secret)
        if hit:
            return p
        with read_session(self.factory) as s:
            p = lookup(s, secret)
        with self._lock:
            if len(self._token_cache) > 10_000:
                self._token_cache.clear()
            self._token_cache[secret] = (time.monotonic() + 2.0, p)
        return p


# The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the
# thread pool, one hop per dependency per request; these do no blocking I/O (a token's database
# lookup, on a cache miss only, goes to the pool explicitly).


async def get_ctx(request: Request) -> Context:
    return request.app.state.ctx


CtxDep = Annotated[Context, Depends(get_ctx)]


async def get_principal(request: Request, ctx: CtxDep) -> Principal:
    if not ctx.settings.auth:
        return LOCAL_ADMIN
    header = request.headers.get("authorization", "")
    secret = None
    if header.lower().startswith("bearer "):
        secret = header[7:].strip()
    elif request.cookies.get("bocompress_token"):
        # The dashboard's cookie: read access only.
        if request.method not in ("GET", "HEAD"):
            raise APIError(401, "the dashboard cookie grants read access only; send a bearer token", "unauthorized")
        secret = request.cookies["bocompress_token"]
    if not secret:
        raise APIError(401, "missing bearer token: send 'Authorization: Bearer <token>'", "unauthorized",
                       {"WWW-Authenticate": "Bearer"})
    hit, p = ctx.cached_principal(secret)
    if not hit:
        p = await run_in_threadpool(ctx.principal_for, secret)
    if p is None:
        raise APIError(401, "invalid or revoked token", "unauthorized", {"WWW-Authenticate": "Bearer"})
    return p


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(*roles: str):  # type: ignore[no-untyped-def]
    async def _dep(p: PrincipalDep) -> Principal:
        if p.role not in roles:
            raise APIError(403, f"role '{p.role}' may not do this (needs {' or '.join(roles)})", "forbidden")
        return p

    return _dep


def viewer(p: Principal) -> Viewer:
    """What the caller may see: admins and workers every job, clients their own."""
    return Viewer(owner=p.owner, sees_all=p.is_admin or p.role == "worker")


ClientDep = Annotated[Principal, Depends(require("admin", "client"))]
WorkerDep = Annotated[Principal, Depends(require("admin", "worker"))]
AdminDep = Annotated[Principal, Depends(require("admin"))]
AnyRoleDep = Annotated[Principal, Depends(require("admin", "client", "worker"))]


# Path and query parameters the OpenAPI document describes exactly as the routes enforce them.

#: The largest row id: ids are 32-bit on PostgreSQL (``INTEGER``) and start at 1 on both databases.
MAX_ID = 2**31 - 1
#: A job, trial, task or token id in a path: 1 .. MAX_ID, else a 422 naming the parameter.
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description=f"a row id, 1 to {MAX_ID}")]
#: A page cursor: absent, empty, or the ``next_cursor`` of an earlier page.
Cursor = Annotated[str | None, Query(max_length=200, pattern=CURSOR_PATTERN,
                                     description="the next_cursor of the previous page (opaque)")]
