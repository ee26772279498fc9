"""The process harness: free ports, service and worker subprocesses, health waits, a load client.

One module for everything that starts ``bocompress serve`` or ``bocompress worker`` as a
subprocess and talks to it: the demo (``bocompress demo``), the deployment and reliability
tests, and the benchmarks under ``bench/``. It imports the standard library and httpx only; the
two helpers that touch a database (:func:`prepare_database`, :func:`check_one_stream`) import the
service when they are called, never at import.

- :class:`ProcessGroup`: named subprocesses, each logging to a file; which died (with the end
  of its log); stopped together, SIGTERM first, SIGKILL for what lingers.
- :class:`ServiceProcess`: one ``bocompress serve`` on a fixed port, so it can be stopped
  (gracefully, or killed as in a crash) and started again in place.
- :func:`wait_healthy`: poll ``/healthz`` until it answers 200.
- :class:`RawClient`, :func:`make_running_job`, :func:`run_race`: drive a service the way workers do.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

#: The checkout this package was imported from: the working directory of the subprocesses.
ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "HTTPError", "NotHealthy", "ProcessExited", "ProcessGroup", "RawClient", "ServiceProcess",
           "bocompress_cmd", "check_one_stream", "descendants", "free_port", "make_running_job",
           "prepare_database", "run_race", "stop_process", "synthetic_profile", "tail", "wait_gone",
           "wait_healthy"]


# --------------------------------------------------------------------------- ports, commands, logs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bocompress_cmd() -> list[str]:
    """The ``bocompress`` command of this interpreter (its script, else ``python -m bocompress.cli``)."""
    exe = Path(sys.executable).with_name("bocompress")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bocompress.cli"]


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ("" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- processes


class ProcessExited(RuntimeError):
    """A subprocess of a :class:`ProcessGroup` exited while it should run."""


class NotHealthy(RuntimeError):
    """The service did not answer ``/healthz`` in time."""


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send ``sig`` (SIGTERM: graceful; SIGKILL: a crash) and wait; SIGKILL what outlives ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def descendants(pid: int) -> list[int]:
    """The pids of a process's live descendants (Linux ``/proc``)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *descendants(k)]
    return out


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); returns those still running."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def wait_healthy(url: str, timeout: float = 60.0, check: Callable[[], None] | None = None,
                 interval: float = 0.1) -> dict[str, Any]:
    """Poll ``url``/healthz until it answers 200: its JSON.

    Args:
        url: the service, ``http://host:port``.
        timeout: seconds to wait in all.
        check: called before each poll; raises to stop waiting (a process that died).
        interval: seconds between polls.

    Raises:
        NotHealthy: no 200 within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last: object = "no answer"
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            r = httpx.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200:
                return dict(r.json())
            last = f"status {r.status_code}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(interval)
    raise NotHealthy(f"{url} did not answer /healthz within {timeout:.0f} s ({last})")


class ProcessGroup:
    """Named subprocesses, each logging (stdout and stderr) to ``<logdir>/<name>.log``.

    Args:
        logdir: where the logs go (an existing folder).
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = Path(logdir)
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path, IO[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | str | None = None,
              new_session: bool = False) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``name`` (``new_session``: in a session of its own, away from the terminal's Ctrl-C)."""
        log_path = self.logdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                stdin=subprocess.DEVNULL, cwd=None if cwd is None else str(cwd),
                                start_new_session=new_session)
        self.procs.append((name, proc, log_path, log))
        return proc

    def log(self, name: str) -> str:
        """The whole log of ``name``."""
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def died(self, lines: int = 15) -> list[str]:
        """Descriptions of the processes that exited, each with the last ``lines`` lines of its log."""
        return [f"{name} exited with status {p.returncode}:\n{tail(path, lines)}"
                for name, p, path, _ in self.procs if p.poll() is not None]

    def check_alive(self) -> None:
        """Raise :class:`ProcessExited` (with the end of its log) when a process exited."""
        dead = self.died(lines=60)
        if dead:
            raise ProcessExited("\n".join(dead))

    def stop(self, timeout: float = 25.0, only: Callable[[str], bool] | None = None) -> None:
        """SIGTERM the processes (those whose name ``only`` accepts), wait up to ``timeout`` s for
        all of them together, SIGKILL what is still alive, and close their logs."""
        group = [(p, log) for name, p, _, log in self.procs if only is None or only(name)]
        for proc, _ in group:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc, log in group:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()


@dataclass
class ServiceProcess:
    """``bocompress serve`` in a subprocess, on a fixed port so it can be restarted in place.

    It runs in :data:`ROOT` with this environment plus ``BOCOMPRESS_SCHEDULER_INTERVAL=0.1`` and
    ``env``; auth is on (the CLI's default).

    Args:
        database_url: The database (already migrated for PostgreSQL: :func:`prepare_database`).
        port: TCP port (a free one by default).
        env: Extra ``BOCOMPRESS_*`` settings for the service.
        log_path: the file its output is appended to (default: dropped).
        processes: server processes (``serve --processes``).
        pythonpath: a folder put first on its ``PYTHONPATH`` (serve another checkout).
    """

    database_url: str
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    processes: int = 1
    proc: subprocess.Popen[bytes] | None = None
    pythonpath: str = ""

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, wrap: list[str] | None = None) -> "ServiceProcess":
        """Start the service and wait until ``/healthz`` answers (``wrap``: e.g. a py-spy prefix)."""
        env = {**os.environ, "BOCOMPRESS_SCHEDULER_INTERVAL": "0.1", **self.env}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [*(wrap or []), *bocompress_cmd(), "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--database-url", self.database_url, "--log-level", "warning",
               *(["--processes", str(self.processes)] if self.processes > 1 else [])]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
        proc = self.proc

        def exited() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode} (log: {self.log_path})")

        try:
            wait_healthy(self.url, timeout, check=exited, interval=0.1)
        except NotHealthy:
            raise RuntimeError(f"service on port {self.port} did not become healthy in {timeout} s") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop it (SIGTERM: graceful; SIGKILL: a crash) and wait for the process to end."""
        if self.proc is not None:
            stop_process(self.proc, sig, timeout)


# --------------------------------------------------------------------------- a prepared service


def prepare_database(database_url: str) -> str:
    """Migrate ``database_url`` and mint an admin token; returns the token (imports the service)."""
    from bocompress.service.auth import create_token
    from bocompress.service.db.migrate import upgrade

    upgrade(database_url)
    return create_token(database_url, "admin", "admin", "load-admin")


def synthetic_profile(d: int, size: int, high: float = 1.0) -> dict[str, Any]:
    """A layer table for ``d`` square Linear layers of width ``size`` compressed by SVD (theta up to ``high``)."""
    layers, params = [], []
    for i in range(d):
        name = f"fc{i}"
        dense = float(size * size + size)
        layers.append({"name": name, "type": "Linear", "method": "svd", "shape": [size, size], "params": [name],
                       "costs": {"params": {"terms": [{"coef": float(2 * size),
                                                       "factors": [{"param": name, "size": size}]},
                                                      {"coef": float(size), "factors": []}], "cap": dense}},
                       "dense": {"params": dense}})
        params.append({"name": name, "low": 0.05, "high": high, "size": size})
    return {"layers": layers, "params": params, "totals": {"params": float(d * (size * size + size))}}


def make_running_job(url: str, token: str, max_trials: int, max_parallel: int, lease_seconds: float,
                     d: int = 8, size: int = 64, max_attempts: int = 3, name: str = "load",
                     optimizer: dict[str, Any] | None = None, worker_token: str | None = None,
                     high: float = 1.0) -> int:
    """Create a compression job (Sobol only unless ``optimizer`` says otherwise), play its profiling
    task with a synthetic layer table (as ``worker_token``, default ``token``), and return its id."""

    def client(tok: str) -> httpx.Client:
        return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tok}"}, timeout=60)

    with client(token) as c:
        r = c.post("/api/v1/jobs", json={
            "name": name, "compression": {"model": "digits-mlp", "data": "digits", "method": "svd"},
            "objective": {"kind": "scalarized", "kappa": 1.0},
            "budget": {"max_trials": max_trials, "max_parallel": max_parallel, "lease_seconds": lease_seconds,
                       "max_attempts": max_attempts},
            "optimizer": optimizer or {"n_initial": 10_000, "seed": 0, "engine": "sobol"}})
        r.raise_for_status()
        job_id = int(r.json()["id"])
    with client(worker_token or token) as c:
        deadline = time.time() + 30
        while True:
            r = c.post("/api/v1/workers/lease", json={"worker": "profiler", "kinds": ["profile"]})
            if r.status_code == 200 and r.json()["job"]["id"] == job_id:
                break
            if time.time() > deadline:
                raise RuntimeError(f"no profiling task for job {job_id}: {r.status_code} {r.text[:200]}")
            time.sleep(0.05)
        got = r.json()
        r = c.post(f"/api/v1/trials/{got['trial']['id']}/complete",
                   json={"profile": synthetic_profile(d, size, high), "lease_token": got["lease"]["token"]})
        r.raise_for_status()
    return job_id


# --------------------------------------------------------------------------- a cheap HTTP client, a lease race


class HTTPError(Exception):
    """The connection failed (refused, reset, closed mid-response)."""


class RawClient:
    """One keep-alive HTTP/1.1 connection; JSON in, (status, headers, body bytes) out.

    Costs little CPU per request (no httpx machinery), so one process can play many workers
    against a service on the same small machine.

    Args:
        url: ``http://host:port`` of the service.
        token: Bearer token sent with every request.
    """

    def __init__(self, url: str, token: str | None) -> None:
        hostport = url.removeprefix("http://").rstrip("/")
        host, _, port = hostport.partition(":")
        self.host, self.port = host, int(port or 80)
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._r, self._w = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self._w is not None:
            self._w.close()
            try:
                await self._w.wait_closed()
            except OSError:
                pass
        self._r = self._w = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
        """Send one request; reconnects once if the kept-alive connection was closed."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.auth}"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
        for attempt in (0, 1):
            try:
                if self._w is None:
                    await self._connect()
                assert self._r is not None and self._w is not None
                self._w.write(head + payload)
                await self._w.drain()
                return await self._read()
            except (OSError, asyncio.IncompleteReadError, HTTPError) as exc:
                await self.close()
                if attempt == 1:
                    raise HTTPError(f"{method} {path}: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def _read(self) -> tuple[int, dict[str, str], bytes]:
        assert self._r is not None
        line = await self._r.readuntil(b"\r\n")
        if not line:
            raise HTTPError("connection closed")
        status = int(line.split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while True:
            h = await self._r.readuntil(b"\r\n")
            if h == b"\r\n":
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await self._r.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await self._r.readuntil(b"\r\n")).strip(), 16)
                chunk = await self._r.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            data = b"".join(parts)
        else:
            data = b""
        if headers.get("connection") == "close":
            await self.close()
        return status, headers, data


async def run_race(urls: list[str], token: str, leasers: int, total: int, timeout: float = 600.0
                   ) -> dict[str, Any]:
    """``leasers`` concurrent leasers take ``total`` leases, spread over the replicas in ``urls``.

    Returns the leased ``(trial id, attempt)`` pairs, errors, and the rate.
    """
    got: list[tuple[int, int]] = []
    errors: Counter = Counter()
    remaining = [total]
    deadline = time.perf_counter() + timeout

    async def one(i: int) -> None:
        c = RawClient(urls[i % len(urls)], token)
        try:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                st, _, body = await c.request("POST", "/api/v1/workers/lease",
                                              {"worker": f"r{i}", "kinds": ["evaluate"]})
                if st == 200:
                    t = json.loads(body)["trial"]
                    got.append((int(t["id"]), int(t["attempt"])))
                    continue
                remaining[0] += 1
                if st == 204:
                    await asyncio.sleep(0.01)
                else:
                    errors[str(st)] += 1
                    await asyncio.sleep(0.05)
        finally:
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(leasers)))
    elapsed = time.perf_counter() - t0
    return {"leases": got, "errors": dict(errors), "seconds": elapsed, "per_s": len(got) / elapsed}


def check_one_stream(database_url: str, job_id: int) -> dict[str, Any]:
    """Read the job's trials and events (imports the service): the facts a lease race is judged on."""
    from sqlalchemy import func, select

    from bocompress.service.db.models import Event, Job, Trial
    from bocompress.service.db.session import make_engine, make_sessionmaker, read_session

    engine = make_engine(database_url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            job = s.get(Job, job_id)
            assert job is not None
            rows = s.execute(select(Trial.id, Trial.number, Trial.params, Trial.state)
                             .where(Trial.job_id == job_id, Trial.kind == "evaluate")).all()
            leased = dict(s.execute(select(Event.trial_id, func.count()).where(
                Event.job_id == job_id, Event.kind == "leased").group_by(Event.trial_id)).all())
            proposed = s.execute(select(func.count()).select_from(Event).where(
                Event.job_id == job_id, Event.kind == "proposed")).scalar_one()
            n_created = job.n_created
    finally:
        engine.dispose()
    numbers = sorted(r.number for r in rows)
    params = Counter(json.dumps(r.params, sort_keys=True) for r in rows)
    return {"n_trials": len(rows), "n_created": n_created, "numbers_consecutive": numbers == list(range(len(rows))),
            "duplicate_params": sum(n - 1 for n in params.values() if n > 1),
            "leased_twice": sorted(t for t, n in leased.items() if n > 1),
            "proposed_events": int(proposed), "states": dict(Counter(r.state for r in rows))}
