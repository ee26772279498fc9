"""The storage interface: every change of a job's or trial's state, behind one class.

The routers in ``bocompress.service.api`` make one call here per route and pass the answer on; they hold
no SQL and never ask which database they run on. The shape is Optuna's ``BaseStorage``: the
state machine of a trial (claim with a lease, heartbeat, finish, fail), proposals, cancel, and
pages of trials, answered as the contract's wire dicts (:mod:`bocompress.service.db.views`); and the rows
outside that state machine (uploads, tokens: :mod:`bocompress.service.db.records`; the dashboard's bulk
reads: :mod:`bocompress.service.db.snapshot`).

Backends (:func:`open_store` picks one from the engine):

- :class:`~bocompress.service.db.sql_store.SQLiteStore`: the worker hot path as a few Core statements in
  one ``BEGIN IMMEDIATE`` (:mod:`bocompress.service.db.hot`), in the thread pool;
- :class:`~bocompress.service.db.pg_store.PostgresStore`: the hot path on the event loop, one statement per
  call over psycopg's async pools (:mod:`bocompress.service.db.hot_pg`).

Both fall back to the ORM reference (:mod:`bocompress.service.db.trials`) for anything unusual, which
raises the exact :class:`~bocompress.service.db.errors.NotFound` / :class:`~bocompress.service.db.errors.TransitionError`
/ :class:`~bocompress.service.db.errors.Invalid`. The HTTP-facing methods are ``async``; the scheduler's
(:meth:`Store.propose`, :meth:`Store.reap`) are plain, for its thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from bocompress.service.auth import Principal


#: Makes one point at once for a running job whose buffer is empty (see
#: :mod:`bocompress.service.optimizer.cheap`, which the scheduler hands in): called as
#: ``cheap(search_space, compression, incumbent_params, n_created, optimizer)`` (``optimizer``: the
#: spec's optimizer options); None when the job takes no cheap proposals (a one-shot allocator).
CheapProposer = Callable[[list[dict[str, Any]], bool, "dict[str, float] | None", int, dict[str, Any]],
                         "dict[str, float] | None"]


@dataclass(frozen=True)
class Viewer:
    """Who asks: ``owner`` names the caller (the owner of what it creates); ``sees_all`` (admins,
    workers) sees every job and upload, else only the caller's own."""

    owner: str
    sees_all: bool = False

    def may_see(self, owner: str) -> bool:
        return self.sees_all or self.owner == owner


@dataclass(frozen=True)
class Result:
    """A worker's report of a trial or task (``CompleteRequest`` without the token)."""

    values: dict[str, float] = field(default_factory=dict)
    sem: dict[str, float] = field(default_factory=dict)
    #: A profiling task's layer table (JSON), checked by :func:`bocompress.service.results.validate_profile`.
    profile: dict[str, Any] | None = None
    #: An export task's artifact reference.
    artifact: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrialPage:
    """A page of a job's evaluations changed after a ``seq``: the items as JSON text (an array)."""

    job_seq: int
    items_json: str
    #: The last item's ``seq`` when more changes remain, else None.
    next_seq: int | None


@dataclass(frozen=True)
class JobPage:
    items: list[dict[str, Any]]
    #: The last item's id when more jobs remain, else None.
    next_id: int | None


@dataclass(frozen=True)
class TrialTable:
    """A job's evaluations for a CSV: the job's name, its parameter names (in order), and rows with
    the attributes ``id, number, seq, state, params, values, sem, attempt, worker, created_at,
    started_at, finished_at, error`` (the times as ISO 8601 text, or None), by number."""

    job_name: str
    param_names: list[str]
    rows: list[Any]


class Store(ABC):
    """One database's jobs and trials (see the module docstring)."""

    #: The cheap proposer a lease or an ``ask`` uses when the job's buffer is empty (set by the
    #: scheduler with :meth:`set_cheap_proposer`); None: an empty buffer answers nothing (a lease
    #: 204, an ``ask`` waits for the scheduler).
    cheap: CheapProposer | None = None

    def set_cheap_proposer(self, cheap: CheapProposer | None) -> None:
        """Answer an empty buffer at once with ``cheap``'s point, marked ``proposal = "cheap"``
        (a proposal is always ready), or (None) wait for the engine's."""
        self.cheap = cheap

    # -------------------------------------------------------------- workers: a trial's lease

    @abstractmethod
    async def lease(self, worker: str, kinds: list[str]) -> dict[str, Any] | None:
        """Claim the oldest queued trial or task of an active job for ``worker`` (expired leases
        are reaped first when none is queued): the lease answer (``task``, ``trial``, ``job``,
        ``lease``, and ``source`` for an export), or None when nothing is queued. With a
        :attr:`cheap` proposer, an empty queue is answered by a cheap proposal for a running
        compression job with budget left and parallel demand (one of its trials running, or other
        workers idle a moment ago), when there is one; a lone worker waits for the engine, and a
        just-profiled job's first batch is left to the engine (``sql_store.FIRST_BATCH_GRACE_S``)."""

    @abstractmethod
    async def heartbeat(self, trial_id: int, token: str | None) -> dict[str, Any]:
        """Extend a lease: ``{"lease": ...}``; TransitionError when it was lost or the job was cancelled."""

    @abstractmethod
    async def task_progress(self, trial_id: int, token: str | None, fraction: float,
                            message: str | None) -> dict[str, Any]:
        """A heartbeat carrying a long task's progress (ChipNet): kept with the task, shown as the
        job's ``progress``; the same answer and errors as :meth:`heartbeat`."""

    @abstractmethod
    async def complete(self, trial_id: int, token: str | None, result: Result) -> dict[str, Any]:
        """Store a result once (the same again is a no-op): the trial as it now is."""

    @abstractmethod
    async def fail(self, trial_id: int, token: str | None, error: str, retry: bool) -> dict[str, Any]:
        """A failure: re-queued when ``retry`` and attempts remain, else ``failed``: the trial."""

    # -------------------------------------------------------------- clients

    @abstractmethod
    async def create_job(self, viewer: Viewer, name: str, spec: dict[str, Any],
                         search_space: list[dict[str, Any]] | None, idempotency_key: str | None,
                         blobs: Sequence[tuple[str, str, str]] = ()) -> tuple[dict[str, Any], bool]:
        """A new job of ``viewer.owner``: compression (``search_space`` None) starts ``profiling`` with
        its profiling task queued, generic starts ``running``. Returns ``(job, created)``;
        ``created`` is False when ``idempotency_key`` names an earlier job with the same spec
        (another spec: TransitionError ``idempotency_mismatch``). ``blobs``: the uploads the spec
        names, ``(field, id, kind)``, each of which must exist, be of that kind and be visible."""

    @abstractmethod
    async def list_jobs(self, viewer: Viewer, limit: int, before: int | None, state: str | None) -> JobPage:
        """Jobs newest first, below id ``before``."""

    @abstractmethod
    async def get_job(self, job_id: int, viewer: Viewer) -> dict[str, Any]:
        """The job with its counts and best trial."""

    @abstractmethod
    async def cancel(self, job_id: int, viewer: Viewer) -> dict[str, Any]:
        """Cancel an active job (queued and running trials become ``cancelled``); a finished one is returned as is.
        A pipeline's first job cancels the pipeline: its open export or second job, and every stage to come."""

    @abstractmethod
    async def trial_page(self, job_id: int, viewer: Viewer, since: int, limit: int) -> TrialPage:
        """Up to ``limit`` of the job's evaluations changed after ``since``, oldest change first."""

    @abstractmethod
    async def get_trial(self, trial_id: int, viewer: Viewer) -> dict[str, Any]:
        """One evaluation."""

    @abstractmethod
    async def pareto(self, job_id: int, viewer: Viewer) -> list[dict[str, Any]]:
        """The job's non-dominated completed evaluations, by R."""

    @abstractmethod
    async def ask(self, job_id: int, viewer: Viewer, count: int, wait_seconds: float,
                  wake: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Up to ``count`` queued trials of a generic job, leased to its client without expiry;
        waits up to ``wait_seconds`` for the buffer (calling ``wake`` while it is empty). With a
        :attr:`cheap` proposer an empty buffer never waits: each missing trial is a cheap
        proposal, made in the claim's transaction (never past ``max_trials``)."""

    @abstractmethod
    async def tell(self, trial_id: int, viewer: Viewer, values: dict[str, float], sem: dict[str, float],
                   failed: bool, error: str | None) -> dict[str, Any]:
        """A client's result (or failure) of a trial it asked for: the trial."""

    # -------------------------------------------------------------- exports (tasks leased like trials)

    @abstractmethod
    async def request_export(self, job_id: int, trial_id: int, viewer: Viewer, finetune_steps: int,
                             lr: float, retrain: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue an export task for a completed trial; the same request again returns the same task.
        ``retrain``: the export retrains the compressed architecture (Invalid for data without the
        labels its mode needs)."""

    @abstractmethod
    async def cancel_export(self, job_id: int, trial_id: int, viewer: Viewer) -> dict[str, Any]:
        """Cancel the trial's latest export if it is still open; the export as it now is."""

    @abstractmethod
    async def get_export(self, job_id: int, trial_id: int, viewer: Viewer) -> dict[str, Any]:
        """The export asked for last of a trial."""

    @abstractmethod
    async def artifact(self, job_id: int, trial_id: int, viewer: Viewer) -> tuple[bytes, str]:
        """The exported model (bytes, sha256); TransitionError ``export_pending`` / ``export_failed``."""

    @abstractmethod
    async def store_artifact(self, task_id: int, token: str | None, viewer: Viewer, data: bytes,
                             tensors: dict[str, Any]) -> dict[str, Any]:
        """Keep the compressed model of an export task whose lease the caller holds."""

    # -------------------------------------------------------------- uploads, tokens, health (no state machine)

    @abstractmethod
    async def ping(self) -> str:
        """Check that the database answers: its name (``sqlite``, ``postgresql``); raises when it does not."""

    @abstractmethod
    async def add_upload(self, viewer: Viewer, kind: str, data: bytes, tensors: dict[str, Any],
                         arch: str | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keep a model or dataset of ``viewer.owner`` (its safetensors header checked): the upload's view."""

    @abstractmethod
    async def get_upload(self, blob_id: str, kind: str, viewer: Viewer) -> dict[str, Any]:
        """An upload of ``kind`` the viewer may see (a summary of its header); else NotFound."""

    @abstractmethod
    async def upload_file(self, blob_id: str, kind: str, viewer: Viewer) -> tuple[bytes, str]:
        """An upload's bytes and sha256; NotFound as :meth:`get_upload`."""

    @abstractmethod
    async def create_token(self, role: str, owner: str | None, name: str | None) -> dict[str, Any]:
        """Mint a token: its view, with the secret (shown this once)."""

    @abstractmethod
    async def list_tokens(self) -> list[dict[str, Any]]:
        """Every token by id, revoked ones included; no secrets."""

    @abstractmethod
    async def revoke_token(self, token_id: int) -> dict[str, Any]:
        """Revoke a token (again: a no-op): its view; NotFound for an unknown id."""

    @abstractmethod
    def principal(self, secret: str) -> Principal | None:
        """Who a token's secret names; None when unknown or revoked. Plain (blocking): the routers'
        token cache calls it from the thread pool, on a miss."""

    # -------------------------------------------------------------- the dashboard's bulk reads

    @abstractmethod
    async def job_snapshot(self, job_id: int, viewer: Viewer, with_trials: bool = True) -> str:
        """The job (without ``best``) and its whole trial history in columns, as JSON text (see
        :meth:`bocompress.service.db.snapshot.SnapshotMixin.job_snapshot`)."""

    @abstractmethod
    async def trial_table(self, job_id: int, viewer: Viewer) -> TrialTable:
        """Every evaluation of the job, by number, for a CSV."""

    # -------------------------------------------------------------- the scheduler (its own thread)

    @abstractmethod
    def propose(self, job_id: int, expected_created: int, points: list[dict[str, float]],
                optimizer_state: dict[str, Any] | None = None) -> int:
        """Add the engine's proposals as queued trials (``proposal = "engine"``): how many. The
        points were computed at ``expected_created``; when other trials were added meanwhile
        (cheap proposals) they go in after them, as many as ``max_trials`` allows, the first
        kept. TransitionError ``raced`` when none fits."""

    @abstractmethod
    def reap(self, limit: int = 500) -> int:
        """Re-queue (or abandon) trials whose lease expired: how many."""

    @abstractmethod
    def advance_pipelines(self, limit: int = 100) -> int:
        """Take the next step of every pipeline (a ``recipe`` job) whose stage has finished: how
        many moved. Idempotent and guarded in the database (:mod:`bocompress.service.db.pipeline`):
        two replicas calling it at once advance each pipeline once."""

    # -------------------------------------------------------------- lifetime

    async def open(self) -> None:
        """Start what belongs to the running event loop (connection pools)."""

    async def close(self) -> None:
        """Stop what :meth:`open` started."""


def open_store(engine: Engine, factory: sessionmaker[Session], database_url: str) -> Store:
    """The backend for ``engine``'s database."""
    if engine.dialect.name == "postgresql":
        from bocompress.service.db.pg_store import PostgresStore

        return PostgresStore(engine, factory, database_url)
    from bocompress.service.db.sql_store import SQLiteStore

    return SQLiteStore(engine, factory)


__all__ = ["CheapProposer", "JobPage", "Result", "Store", "TrialPage", "TrialTable", "Viewer", "open_store"]
