"""Errors as ``{"detail": ..., "code": ...}``: 4xx for what the caller did wrong, never a 500 for bad input."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from bocompress.service.db.errors import Invalid, NotFound, StorageError, TransitionError

log = logging.getLogger("bocompress.api")


class APIError(Exception):
    """An error with an HTTP status, a human message and a stable machine code."""

    def __init__(self, status: int, detail: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code
        self.headers = headers


def bad_request(field: str, reason: str) -> APIError:
    return APIError(422, f"{field}: {reason}", "invalid")


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def _validation_detail(exc: RequestValidationError) -> str:
    msgs = []
    for e in exc.errors()[:10]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        loc = tuple(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            msgs.append(f"body: invalid JSON ({e.get('ctx', {}).get('error', msg)})")
        elif e.get("type") == "missing":
            msgs.append(f"{_loc(loc)}: field required")
        elif e.get("type") == "extra_forbidden":
            msgs.append(f"{_loc(loc)}: unknown field")
        else:
            msgs.append(f"{_loc(loc)}: {msg}")
    return "; ".join(msgs)


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: the methods of every route on the request's path.

    Starlette names only the first route that matched the path, so a path served by two
    routes (``GET`` and ``POST /api/v1/jobs``) would advertise one of them (RFC 9110 §15.5.6).
    """
    methods: set[str] = set()
    for route in getattr(request.app.state, "api_routes", ()):
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "code": exc.code}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc), "code": "invalid"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400:
            # FastAPI's "There was an error parsing the body" (a body that is not UTF-8, a broken
            # multipart form): bad input like any other, so the same 422 as invalid JSON.
            return JSONResponse({"detail": "body: could not be parsed (not UTF-8 JSON, or a malformed form)",
                                 "code": "invalid"},
                                status_code=422, headers=headers or None)
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                413: "too_large"}.get(exc.status_code, "error")
        return JSONResponse({"detail": str(exc.detail), "code": code}, status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "code": "not_found"}, status_code=404)

    @app.exception_handler(Invalid)
    async def _invalid(_: Request, exc: Invalid) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "code": exc.code}, status_code=422)

    @app.exception_handler(TransitionError)
    async def _conflict(_: Request, exc: TransitionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=409, headers=exc.headers)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        log.warning("storage busy", extra={"error": str(exc)})
        return JSONResponse({"detail": "the database is busy, retry", "code": "busy"}, status_code=503,
                            headers={"Retry-After": "1"})

    try:  # the PostgreSQL hot path talks to psycopg directly, without SQLAlchemy
        from psycopg.errors import DataError as PgDataError
    except ImportError:  # pragma: no cover - psycopg is installed with the PostgreSQL extra only
        PgDataError = DataError  # noqa: N806

    @app.exception_handler(OverflowError)
    @app.exception_handler(DataError)
    @app.exception_handler(PgDataError)
    async def _out_of_range(_: Request, exc: Exception) -> JSONResponse:
        # The database refused a value the request carried: an id beyond its integer range
        # (SQLite: OverflowError; PostgreSQL: numeric_value_out_of_range), or text it cannot
        # store (PostgreSQL: a NUL character). The caller's input, so a 4xx, never a 500.
        log.info("database refused a request value", extra={"error": str(exc)[:300]})
        return JSONResponse({"detail": "a value in the request is out of range or not storable "
                                       "(an id too large, or a NUL character in text)", "code": "invalid"},
                            status_code=422)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error", "code": "internal"}, status_code=500)
