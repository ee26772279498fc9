"""A service on a temporary SQLite database and one worker subprocess, for the product-level benchmarks."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bocompress import Client
from bocompress.procs import ROOT, ProcessGroup, free_port, wait_healthy


@contextmanager
def local_service(prefix: str) -> Iterator[tuple[Client, Path]]:
    """``(client, work directory)`` of a ``bocompress serve --no-auth`` and a ``python -m worker`` on it;
    both are stopped on exit."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    procs = ProcessGroup(work)
    try:
        procs.start("service", [sys.executable, "-m", "bocompress.cli", "serve", "--no-auth", "--port", str(port),
                                "--database-url", f"sqlite:///{work / 'b.db'}", "--log-level", "warning"], env)
        wait_healthy(url, 60.0)
        procs.start("worker", [sys.executable, "-m", "worker", "--url", url, "--poll", "0.2"], env)
        yield Client(url, token=None), work
    finally:
        procs.stop()
