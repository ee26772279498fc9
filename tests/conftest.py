"""Shared fixtures: every storage test runs on SQLite and on real PostgreSQL.

PostgreSQL is at ``BOCOMPRESS_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Under CI (``CI`` set) an unreachable PostgreSQL fails the run; on a laptop it skips those tests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

PG_ADMIN_URL = os.environ.get("BOCOMPRESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = bool(os.environ.get("CI"))


def _pg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(_pg_conninfo(PG_ADMIN_URL), connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001
        return str(exc)


def make_pg_database(tag: str) -> str:
    """Create a fresh, empty PostgreSQL database and return its URL."""
    import psycopg

    err = pg_available()
    if err is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL is unreachable at {PG_ADMIN_URL} (CI requires it): {err}")
        pytest.skip(f"PostgreSQL unreachable: {err}")
    name = f"bocompress_{tag}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_pg_conninfo(PG_ADMIN_URL), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(_pg_conninfo(PG_ADMIN_URL), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:  # noqa: BLE001 - best effort cleanup
        pass


def run_coroutine(coro):  # type: ignore[no-untyped-def]
    """``asyncio.run(coro)`` in a thread of its own: safe even when this thread already runs an
    event loop (the browser tests' session-wide sync Playwright leaves one on the main thread)."""
    import asyncio

    box: dict = {}

    def target() -> None:
        try:
            box["out"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["exc"] = exc

    th = threading.Thread(target=target)
    th.start()
    th.join()
    if "exc" in box:
        raise box["exc"]
    return box["out"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_database(backend: str, tmp_path: Path, tag: str = "t") -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'{tag}.db'}"
    return make_pg_database(tag)


@dataclass
class LiveServer:
    """A real uvicorn server on a real socket, in a thread of the test process."""

    url: str
    database_url: str
    admin_token: str
    app: object
    _server: object
    _thread: threading.Thread

    def client(self, token: str | None = None, **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]

    def token(self, role: str, owner: str | None = None) -> str:
        with self.client(self.admin_token) as c:
            r = c.post("/api/v1/tokens", json={"role": role, "owner": owner or role})
            r.raise_for_status()
            return str(r.json()["token"])

    def stop(self) -> None:
        self._server.should_exit = True  # type: ignore[attr-defined]
        self._thread.join(timeout=30)


def start_server(database_url: str, auth: bool = True, **settings: object) -> LiveServer:
    import uvicorn

    from bocompress.service.app import create_app
    from bocompress.service.auth import create_token
    from bocompress.service.config import Settings
    from bocompress.service.db.migrate import upgrade

    upgrade(database_url)
    admin = create_token(database_url, "admin", "admin", "test-admin")
    port = free_port()
    s = Settings(database_url=database_url, host="127.0.0.1", port=port, auth=auth, **settings)  # type: ignore[arg-type]
    app = create_app(s)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not th.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", database_url, admin, app, server, th)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    url = new_database(backend, tmp_path)
    yield url
    if backend == "postgresql":
        drop_pg_database(url)


@pytest.fixture
def server(database_url: str) -> Iterator[LiveServer]:
    srv = start_server(database_url, scheduler_interval=0.1, ask_wait_seconds=10)
    yield srv
    srv.stop()


@pytest.fixture
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(server.admin_token) as c:
        yield c
