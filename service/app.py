"""The FastAPI application factory. Nothing happens at import time."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import struct
import sys
from typing import Any
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.engine import Engine

from bocompress.service.api import errors
from bocompress.service.api.deps import Context
from bocompress.service.config import Settings
from bocompress.service.db.migrate import SchemaOutdated, check_schema, check_writable, ensure_schema, explain_startup_error
from bocompress.service.db.session import make_engine, make_sessionmaker
from bocompress.service.db.store import open_store
from bocompress.service.metrics import Metrics

log = logging.getLogger("bocompress.service")


def checked_engine(settings: Settings) -> Engine:
    """The database engine, once the schema is current (migrated first where the settings allow).

    Raises:
        SchemaOutdated: the database is not at the schema this code needs (and may not migrate itself).
    """
    if settings.migrate_on_start:
        ensure_schema(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        check_schema(engine, settings.database_url)
        check_writable(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings``: engine, schema check, routers, and the scheduler (started on startup).

    Raises:
        SchemaOutdated: the database is not at the schema this code needs (and may not migrate itself).
    """
    settings = settings or Settings()
    engine = checked_engine(settings)
    factory = make_sessionmaker(engine)
    metrics = Metrics(factory)
    store = open_store(engine, factory, settings.database_url)
    ctx = Context(settings=settings, engine=engine, factory=factory, metrics=metrics, store=store)
    if settings.scheduler:
        from bocompress.service.scheduler import Scheduler

        ctx.scheduler = Scheduler(factory, settings, metrics, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not settings.auth:
            log.warning("auth is OFF: every caller is admin; allowed because the service is bound to loopback",
                        extra={"host": settings.host})
        # Requests that touch the database run in the thread pool; a small pool does more per
        # CPU-second than anyio's default of 40, whose threads mostly wait for each other's GIL.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        await store.open()
        if ctx.scheduler is not None:
            ctx.scheduler.start()
        # Everything imported and built so far (torch, BoTorch, the app) lives as long as the
        # process: out of the collector's sight, a full collection walks only what requests make.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if ctx.scheduler is not None:
                ctx.scheduler.stop()
            await store.close()
            engine.dispose()

    app = FastAPI(title="bocompress", version="1", lifespan=lifespan,
                  description="Bayesian optimization of per-layer neural network compression.")
    app.state.ctx = ctx
    errors.install(app)
    # Inside BodyLimit (added first, so it runs after it): a body over the size limit is a 413 at
    # once and is never read here.
    app.add_middleware(UploadHeaderGuard, max_header_bytes=settings.max_safetensors_header_bytes)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 1024 * 1024)

    app.add_middleware(CountRequests, metrics=metrics)

    from bocompress.service.api import exports, jobs, system, uploads, workers

    routers = [system.router, jobs.router, workers.router, uploads.router, exports.router]
    try:
        from bocompress.service.dashboard import routes as dashboard
    except ImportError:  # the dashboard is optional at build time
        dashboard = None  # type: ignore[assignment]
    if dashboard is not None:
        routers.append(dashboard.router)
    for router in routers:
        app.include_router(router)
    # Every route, as declared (the 405 handler's Allow header and the OpenAPI document read them).
    app.state.api_routes = [route for router in routers for route in router.routes if isinstance(route, APIRoute)]
    app.openapi = lambda: openapi_document(app, auth=settings.auth)  # type: ignore[method-assign]
    return app


#: Answers every operation may give, beside its own (``responses=`` on the routes): the error body
#: is always ``ErrorOut``. 401/403 go to operations that need a token (when auth is on), 413 to
#: those with a body (``BodyLimit``), 422 to those that take any input.
_SHARED_ERRORS = {
    401: "no token, or an unknown or revoked one",
    403: "the token's role may not do this",
    413: "the request body is larger than the limit",
    422: "invalid input: `detail` names the field",
    503: "the database is busy or unreachable; retry after `Retry-After` seconds",
}

#: Rules across fields that pydantic checks in validators, stated in the document too, so a body
#: the schema allows is one the service takes (JSON Schema cannot state two of them: a parameter's
#: ``low < high`` and unique parameter names; the descriptions say so).
_CROSS_FIELD_RULES: dict[str, dict[str, Any]] = {
    "JobCreate": {
        "oneOf": [
            {"title": "compression job", "required": ["compression"],
             "properties": {"compression": {"type": "object"}, "parameters": {"type": "null"},
                            "objective": {"properties": {"metric": {"type": "null"}}}},
             # a recipe runs BO in each pass: not with the ChipNet engine
             "anyOf": [{"properties": {"recipe": {"type": "null"}}},
                       {"properties": {"optimizer": {"properties": {"engine": {"not": {"const": "chipnet"}}}}}}]},
            {"title": "generic job", "required": ["parameters"],
             "properties": {"parameters": {"type": "array"}, "compression": {"type": "null"}, "recipe": {"type": "null"},
                            "objective": {"properties": {"kind": {"type": "null"}}},
                            "optimizer": {"properties": {"engine": {"enum": ["auto", "sobol", "gp"]}}}}},
        ],
        "description": "Exactly one of `compression` (a compression job, evaluated by workers) or `parameters` "
                       "(a generic job, evaluated by its client with ask/tell; its `optimizer.engine` is "
                       "'auto', 'sobol' or 'gp': the one-shot allocators need a compression profile). "
                       "A `recipe` (a pipeline) is for compression jobs whose engine is not 'chipnet'. "
                       "Parameter names must be unique.",
    },
    "Objective": {
        "anyOf": [{"properties": {"kind": {"enum": ["scalarized", "pareto", None]}}},
                  {"required": ["budget"], "properties": {"budget": {"type": "number"}}}],
        "description": "A compression objective (`kind`; 'constrained' needs `budget`) or a generic one "
                       "(`metric` + `direction`).",
    },
    "ParameterSpec": {
        "allOf": [
            {"anyOf": [{"properties": {"log": {"const": False}}},
                       {"properties": {"low": {"exclusiveMinimum": 0}}}]},
            {"anyOf": [{"properties": {"type": {"const": "float"}}},
                       {"properties": {"low": {"type": "integer"}, "high": {"type": "integer"}}}]},
        ],
        "description": "One dimension of a generic job's search space: `low` < `high` (finite); a log-scaled "
                       "one needs `low` > 0, an int one integer bounds.",
    },
    "TellRequest": {
        "anyOf": [{"required": ["failed"], "properties": {"failed": {"const": True}}},
                  {"required": ["values"], "properties": {"values": {"minProperties": 1}}}],
        "description": "A result (`values`, at least one metric, and the job's own metric) or a failure "
                       "(`failed`: true).",
    },
}


def _needs_token(route: APIRoute) -> bool:
    from bocompress.service.api.deps import get_principal

    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if dep.call is get_principal:
            return True
        stack.extend(dep.dependencies)
    return False


def openapi_document(app: FastAPI, auth: bool) -> dict[str, Any]:
    """The OpenAPI document, saying what the service enforces (schemathesis ``--checks all`` holds it to that).

    FastAPI's own document is completed here, in one place: the error body and shared error
    answers of every operation, the bearer scheme on the operations that need a token, and the
    rules across fields of :data:`_CROSS_FIELD_RULES`.
    """
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from bocompress.schemas import ErrorOut

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # our 422 body is ErrorOut
        schemas.pop(name, None)
    schemas["ErrorOut"] = ErrorOut.model_json_schema()
    for name, extra in _CROSS_FIELD_RULES.items():
        schemas[name].update(extra)
    if auth:
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "a token from `bocompress token` or POST /api/v1/tokens; the dashboard's "
                           "`bocompress_token` cookie is also taken, for GET only"}}
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for route in app.state.api_routes:
        if not route.include_in_schema:
            continue
        token = auth and _needs_token(route)
        has_input = bool(route.dependant.path_params or route.dependant.query_params
                         or route.dependant.header_params or route.body_field is not None)
        for method in route.methods:
            op = doc["paths"][route.path_format][method.lower()]
            responses = op.setdefault("responses", {})
            for status, text in _SHARED_ERRORS.items():
                if (status in (401, 403) and not token) or (status == 413 and route.body_field is None) \
                        or (status == 422 and not has_input):
                    continue
                responses.setdefault(str(status), {"description": text})
            for status, answer in responses.items():
                if status[0] in "45":
                    answer["content"] = error_body
            if token:
                op["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc


class CountRequests:
    """``bocompress_http_requests`` by method, route template and status: a plain ASGI middleware
    (Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request on the hot path)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def _send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(scope["method"], getattr(route, "path", "unmatched"), str(status)).inc()


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with a 413, before they are parsed.

    A declared ``Content-Length`` over the limit is refused at once. A body without one
    (chunked) is read here, up to the limit, and refused as soon as it passes it; under the
    limit it is handed on unchanged. (Uploads check the exact ``max_upload_bytes`` themselves;
    this bounds every other body, JSON included, at that plus 1 MiB.)
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await self._too_large(send)
                return
            await self.app(scope, receive, send)
            return
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body larger than the limit of {self.limit} bytes",
                           "code": "too_large"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class UploadHeaderGuard:
    """Refuse a safetensors upload whose header is over the bound from its first bytes.

    The uploads (``POST /api/v1/models``, ``/datasets``, ``/trials/{id}/artifact``) are multipart
    forms; their ``file`` part starts with the header's length. When that length is over
    ``max_header_bytes`` the rest of the body is read and dropped, unparsed (no multipart parsing,
    no spooling to disk), and the answer is the 422 the route would give, at once. Anything else,
    or a body whose file part does not start within the first 64 KiB, goes on unchanged (the
    route checks every bound itself; this only makes the refusal of a huge header cheap).
    """

    PATHS = re.compile(r"^/api/v1/(models|datasets|trials/[0-9]+/artifact)$")
    PEEK = 64 * 1024

    def __init__(self, app: Any, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    def _header_length(self, buf: bytes, boundary: bytes) -> int | None:
        """The safetensors header length in the ``file`` part, -1 when not known yet, None when unknowable."""
        pos = 0
        while True:
            start = buf.find(b"--" + boundary, pos)
            if start < 0:
                return -1
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                return -1
            headers = buf[start:end].lower()
            if b'name="file"' in headers:
                nxt = buf.find(b"\r\n--" + boundary, end + 4)
                if 0 <= nxt < end + 12:
                    return None  # a file of under 8 bytes: the route says what is wrong with it
                if len(buf) < end + 12:
                    return -1
                prefix = buf[end + 4:end + 12]
                if prefix[:1] == b"\x80" or prefix[:2] == b"PK":
                    return None  # a pickle or zip: the route names it as such
                return int(struct.unpack("<Q", prefix)[0])
            pos = end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.PATHS.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        ctype = dict(scope.get("headers") or ()).get(b"content-type", b"")
        m = re.search(rb'boundary="?([^";]+)"?', ctype)
        if not ctype.startswith(b"multipart/form-data") or m is None:
            await self.app(scope, receive, send)
            return
        boundary = m.group(1)
        messages: list[Any] = []
        buf = b""
        n: int | None = -1
        more = True
        while more and n == -1 and len(buf) < self.PEEK:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            buf += message.get("body", b"")
            more = bool(message.get("more_body", False))
            n = self._header_length(buf, boundary)
        if n is not None and n > self.max_header_bytes:
            while more:  # read the rest and drop it, so the client can read the answer
                message = await receive()
                if message["type"] != "http.request":
                    break
                more = bool(message.get("more_body", False))
            body = json.dumps({"detail": f"file: header of {n} bytes is larger than this service's limit of "
                                         f"{self.max_header_bytes} bytes (max_safetensors_header_bytes)",
                               "code": "invalid"}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def app_from_env() -> FastAPI:
    """The app of one server process of ``bocompress serve --processes N`` (settings from ``BOCOMPRESS_*``)."""
    from bocompress.service.logs import configure

    settings = Settings()
    configure(settings.log_level)
    return create_app(settings)


def serve(host: str = "127.0.0.1", port: int = 8000, database_url: str | None = None, auth: bool = True,
          log_level: str = "warning", processes: int = 1) -> None:
    """Run the service with uvicorn (``bocompress serve``).

    ``processes`` > 1 runs that many server processes on one port (uvicorn's workers): the
    service keeps no state outside the database, so they are replicas like those on several
    hosts, and one Python process (one GIL) no longer bounds the requests per second. The
    schema is checked (and, on SQLite, migrated) once, here, before they start.
    """
    import uvicorn

    from bocompress.service.logs import configure

    configure(log_level)
    kwargs: dict[str, object] = {"host": host, "port": port, "auth": auth, "log_level": log_level}
    if database_url:
        kwargs["database_url"] = database_url
    try:
        settings = Settings(**kwargs)  # type: ignore[arg-type]
        if processes > 1:
            checked_engine(settings).dispose()
        else:
            app = create_app(settings)
    except SchemaOutdated as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        # The database cannot be opened (a bad URL, a missing directory, a read-only file,
        # PostgreSQL down or without the database): one line saying what to do, not a traceback.
        message = explain_startup_error(exc, database_url or kwargs.get("database_url") or Settings().database_url)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    common = dict(host=host, port=port, log_level=log_level, access_log=log_level == "debug", log_config=None)
    if processes > 1:
        os.environ.update({"BOCOMPRESS_DATABASE_URL": settings.database_url, "BOCOMPRESS_AUTH": str(int(auth)),
                           "BOCOMPRESS_HOST": host, "BOCOMPRESS_PORT": str(port), "BOCOMPRESS_LOG_LEVEL": log_level,
                           "BOCOMPRESS_AUTO_MIGRATE": "0"})
        uvicorn.run("bocompress.service.app:app_from_env", factory=True, workers=processes, **common)  # type: ignore[arg-type]
    else:
        uvicorn.run(app, **common)  # type: ignore[arg-type]
