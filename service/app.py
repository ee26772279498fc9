"""The FastAPI application factory. Nothing happens at import time."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from service.api import errors
from service.api.deps import Context
from service.config import Settings
from service.db.migrate import SchemaOutdated, check_schema, ensure_schema
from service.db.session import make_engine, make_sessionmaker
from service.metrics import Metrics

log = logging.getLogger("bocompress.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings``: engine, schema check, routers, and the scheduler (started on startup).

    Raises:
        SchemaOutdated: the database is not at the schema this code needs (and may not migrate itself).
    """
    settings = settings or Settings()
    if settings.migrate_on_start:
        ensure_schema(settings.database_url)
    engine = make_engine(settings.database_url)
    check_schema(engine, settings.database_url)
    factory = make_sessionmaker(engine)
    metrics = Metrics(factory)
    ctx = Context(settings=settings, engine=engine, factory=factory, metrics=metrics)
    if settings.scheduler:
        from service.scheduler import Scheduler

        ctx.scheduler = Scheduler(factory, settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not settings.auth:
            log.warning("auth is OFF: every caller is admin; allowed because the service is bound to loopback",
                        extra={"host": settings.host})
        if ctx.scheduler is not None:
            ctx.scheduler.start()
        try:
            yield
        finally:
            if ctx.scheduler is not None:
                ctx.scheduler.stop()
            engine.dispose()

    app = FastAPI(title="bocompress", version="1", lifespan=lifespan,
                  description="Bayesian optimization of per-layer neural network compression.")
    app.state.ctx = ctx
    errors.install(app)

    @app.middleware("http")
    async def _count(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(request.method, getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    from service.api import exports, jobs, system, uploads, workers

    app.include_router(system.router)
    app.include_router(jobs.router)
    app.include_router(workers.router)
    app.include_router(uploads.router)
    app.include_router(exports.router)
    try:
        from service.dashboard import routes as dashboard
    except ImportError:  # the dashboard is optional at build time
        dashboard = None  # type: ignore[assignment]
    if dashboard is not None:
        app.include_router(dashboard.router)
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, database_url: str | None = None, auth: bool = True,
          log_level: str = "warning") -> None:
    """Run the service with uvicorn (``bocompress serve``)."""
    import uvicorn

    from service.logs import configure

    configure(log_level)
    kwargs: dict[str, object] = {"host": host, "port": port, "auth": auth, "log_level": log_level}
    if database_url:
        kwargs["database_url"] = database_url
    try:
        settings = Settings(**kwargs)  # type: ignore[arg-type]
        app = create_app(settings)
    except SchemaOutdated as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug", log_config=None)
