"""The ORM reference behind :class:`~bocompress.service.db.store.Store`, and the SQLite backend.

:class:`OrmStore` implements every method with the guarded transitions of
:mod:`bocompress.service.db.trials`, one transaction in the thread pool each; it is the behaviour both
backends share and what they fall back to for anything unusual. :class:`HotAskTell` (both backends)
answers the usual ask, tell and empty-queue lease with the prebuilt Core statements of
:mod:`bocompress.service.db.hot`; :class:`SQLiteStore` adds the rest of the worker hot path (lease,
heartbeat, result as a few Core statements).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bocompress.spec import JobSpec
from bocompress.states import FINISHED_JOB_STATES, JobState, TrialState
from bocompress.service.db import hot
from bocompress.service.db.errors import Invalid, NotFound, TransitionError
from bocompress.service.db.exports import ExportsMixin
from bocompress.service.db.models import Blob, Job, Trial, utcnow
from bocompress.service.db.pipeline import PipelineMixin, as_requested, cancel_pipeline, first_pass_budget, start_pipeline
from bocompress.service.db.queries import BUSY, best_trial, cheap_jobs, pareto_trials, visible_job
from bocompress.service.db.records import RecordsMixin
from bocompress.service.db.session import read_session, run_conn, run_tx
from bocompress.service.db.snapshot import SnapshotMixin
from bocompress.service.db.store import JobPage, Result, Store, TrialPage, Viewer
from bocompress.service.db.strategies import CHIPNET_TASK, StrategiesMixin, check_uploads, complete_chipnet, start_chipnet
from bocompress.service.db.trials import (
    add_event,
    cancel_job,
    claim_next,
    close_job_if_done,
    complete,
    fail,
    heartbeat,
    insert_proposals,
    lock_trial,
    reap_expired,
    result_hash,
    set_job_state,
)
from bocompress.service.db.views import iso, job_light, job_out, trial_out
from bocompress.service.results import evaluate_values, unreachable_budget, validate_profile

log = logging.getLogger("bocompress.trials")
#: Workers that found nothing within this many seconds of each other are parallel demand (a
#: worker polls every second when idle, by default).
IDLE_WORKER_WINDOW_S = 2.5
#: Seconds a just-profiled compression job (``n_created == 0``) is left to the engine's first batch
#: (its initial design: the one-shot allocators' points, which random points in many dimensions are
#: not worth the budget they spend) before idle workers get cheap points of it anyway: only an
#: engine stuck behind other jobs' fits takes that long.
FIRST_BATCH_GRACE_S = 30.0
T = TypeVar("T")
#: Trial columns a page reads on SQLite (Core: no ORM row processing for thousands of rows).
_PAGE_COLS = ("id", "job_id", "seq", "number", "state", "params", "values", "sem", "attempt", "worker",
              "created_at", "started_at", "finished_at", "error", "proposal")


def lease_info(token: str | None, expires_at: Any, lease_seconds: float, attempt: int) -> dict[str, Any]:
    """The ``lease`` object of lease and heartbeat answers."""
    return {"token": token, "expires_at": iso(expires_at), "lease_seconds": lease_seconds, "attempt": attempt}


def lease_answer(trial: Any, job_view: dict[str, Any], lease_seconds: float) -> dict[str, Any]:
    return {"task": trial.kind, "trial": trial_out(trial), "job": job_view,
            "lease": lease_info(trial.lease_token, trial.lease_expires_at, lease_seconds, trial.attempt)}


def log_transition(event: str, row: Any, prev: str) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info("trial %s", event, extra={"job_id": row.job_id, "trial_id": row.id, "from_state": prev,
                                            "to_state": str(row.state), "attempt": row.attempt, "worker": row.worker})


def hot_result_ok(t: Any, tok: str | None) -> bool:
    """Whether the hot path may store this result (an evaluation, running, the caller's lease)."""
    return (t is not None and t.kind == "evaluate" and t.state == TrialState.RUNNING
            and tok is not None and t.lease_token is not None and tok == t.lease_token)


def hot_values(info: Any, t: Any, result: Result) -> tuple[dict[str, float], dict[str, float], str]:
    values = evaluate_values(info, t.params, dict(result.values))
    sem = dict(result.sem)
    return values, sem, result_hash(values, sem, None)


class OrmStore(ExportsMixin, PipelineMixin, RecordsMixin, SnapshotMixin, StrategiesMixin, Store):
    """Every :class:`Store` method through the ORM (see the module docstring)."""

    def __init__(self, engine: Engine, factory: sessionmaker[Session], jobs: hot.JobInfoCache | None = None) -> None:
        self.engine = engine
        self.factory = factory
        self.dialect = engine.dialect.name
        #: What running jobs never change, cached per process for the hot path.
        self.jobs = jobs or hot.JobInfoCache()
        #: Asks in flight per job in this process (on the event loop): more than one is parallel
        #: demand even before any of the job's trials runs.
        self._asking: dict[int, int] = {}
        #: Workers whose last lease in this process found nothing, and when (``time.monotonic``):
        #: two or more within :data:`IDLE_WORKER_WINDOW_S` are parallel demand for every job.
        self._idle: dict[str, float] = {}

    async def _tx(self, fn: Callable[[Session], T]) -> T:
        return await anyio.to_thread.run_sync(partial(run_tx, self.factory, fn))

    async def _read(self, fn: Callable[[Session], T]) -> T:
        def go() -> T:
            with read_session(self.factory) as s:
                return fn(s)

        return await anyio.to_thread.run_sync(go)

    # -------------------------------------------------------------- helpers in a session

    def _visible_job(self, s: Session, job_id: int, viewer: Viewer) -> Job:
        return visible_job(s, job_id, viewer)

    def _worker_trial(self, s: Session, trial_id: int) -> tuple[Trial, Job]:
        """The trial (locked) and its job, for a worker's call; NotFound for a trial of a
        client-evaluated (ask/tell) job, which only its owner writes, through ``tell``."""
        t = lock_trial(s, trial_id, self.dialect)
        job = s.get(Job, t.job_id)
        assert job is not None
        if t.kind == "evaluate" and job.kind != "compression":
            raise NotFound("trial", trial_id)
        return t, job

    def _source(self, out: dict[str, Any]) -> dict[str, Any]:
        """An export task's lease answer gets the trial it exports (``source``)."""
        if out["task"] == "export":
            with read_session(self.factory) as s:
                src = s.get(Trial, int(out["trial"]["params"]["trial_id"]))
                out["source"] = trial_out(src) if src is not None else None
        return out

    # -------------------------------------------------------------- workers

    def _lease_orm(self, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
        def _claim(s: Session) -> tuple[Any, dict[str, Any]] | None:
            c = claim_next(s, worker, kinds, dialect=self.dialect)
            if c is None:
                return None
            return c.trial, lease_answer(c.trial, job_out(None, c.job, light=True),
                                         JobSpec.of(c.job.spec).lease_seconds)

        return run_tx(self.factory, _claim) if kinds else None

    def _lease_sync(self, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
        """One lease attempt off the event loop (a backend's hot path may override it)."""
        return self._lease_orm(worker, kinds)

    async def _lease_once(self, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
        return await anyio.to_thread.run_sync(self._lease_sync, worker, kinds)

    # -------------------------------------------------------------- cheap proposals (an empty buffer)

    def _add_cheap(self, s: Session, job: Job, crowd: bool = False) -> bool:
        """Insert one cheap proposal for the running ``job`` (in ``s``'s transaction): whether one went in.

        ``crowd``: other asks of the job are waiting in this process right now (parallel demand
        before any trial runs: many askers starting at once).

        The point is a function of the job's ``n_created``; when another process inserted first
        (PostgreSQL, several replicas), it is made again for the new count, never inserted twice.
        """
        cheap = self.cheap
        for _ in range(4):
            if cheap is None or job.state != JobState.RUNNING or not job.search_space:
                return False
            view = JobSpec.of(job.spec)
            if view.budget_spent(job.n_created):
                return False
            if not crowd and not self._parallel_demand(s, job.id):
                return False
            best = best_trial(s, job)
            point = cheap(list(job.search_space), view.is_compression, None if best is None else dict(best.params),
                          int(job.n_created), dict(job.spec.get("optimizer") or {}))
            if not point:
                return False
            try:
                insert_proposals(s, job.id, job.n_created, [point], proposal="cheap", follow=False)
                return True
            except TransitionError:
                pass
            finally:
                s.expire(job)
        return False

    @staticmethod
    def _parallel_demand(s: Session, job_id: int) -> bool:
        """Whether another consumer holds one of the job's trials. A lone sequential consumer (a
        single worker or asker, nothing else running) waits for the engine, so its search stays
        BO, every point conditioned on every result; cheap points serve parallel demand only."""
        return s.execute(BUSY, {"job": job_id}).first() is not None

    def _idle_crowd(self, worker: str) -> bool:
        """Whether another worker's lease found nothing within :data:`IDLE_WORKER_WINDOW_S` (this process)."""
        now = time.monotonic()
        return any(w != worker and now - t < IDLE_WORKER_WINDOW_S for w, t in list(self._idle.items()))

    def _note_idle(self, worker: str, idle: bool) -> None:
        if not idle:
            self._idle.pop(worker, None)
            return
        now = time.monotonic()
        if len(self._idle) >= 4096:
            self._idle = {w: t for w, t in self._idle.items() if now - t < IDLE_WORKER_WINDOW_S}
        self._idle[worker] = now

    def _cheap_lease(self, worker: str, crowd: bool = False) -> tuple[Any, dict[str, Any]] | None:
        """A worker found nothing queued: a cheap proposal for the running compression job with
        budget left and an empty buffer that was served longest ago, leased to ``worker``, when
        there is parallel demand: a trial of the job running, or (``crowd``) other workers that
        found nothing a moment ago. A lone worker waits for the engine (sequential BO). A job whose
        engine has not answered yet (``n_created == 0``) is left to its first batch for
        :data:`FIRST_BATCH_GRACE_S`, then answered cheaply too, so an engine busy with other jobs'
        fits does not keep its workers idle for long."""
        def _go(s: Session) -> tuple[Any, dict[str, Any]] | None:
            # only jobs with parallel demand and an empty buffer, found in the query rather than job by job
            for job_id in s.execute(*cheap_jobs(crowd, utcnow(), FIRST_BATCH_GRACE_S)).scalars().all():
                job = s.get(Job, job_id)
                if job is not None and self._add_cheap(s, job, crowd):
                    c = claim_next(s, worker, ("evaluate",), job_id=job.id, dialect=self.dialect)
                    if c is not None:
                        return c.trial, lease_answer(c.trial, job_out(None, c.job, light=True),
                                                     JobSpec.of(c.job.spec).lease_seconds)
            return None

        return run_tx(self.factory, _go)

    async def _empty_lease(self, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
        """Nothing was queued: reap expired leases (and lease what they put back), else a cheap proposal."""
        got = None
        if await self._tx(lambda s: reap_expired(s, limit=50)) > 0:
            got = await self._lease_once(worker, kinds)
        if got is None and self.cheap is not None and "evaluate" in kinds:
            got = await anyio.to_thread.run_sync(self._cheap_lease, worker, self._idle_crowd(worker))
        return got

    async def lease(self, worker: str, kinds: list[str]) -> dict[str, Any] | None:
        got = await self._lease_once(worker, kinds)
        if got is None:
            got = await self._empty_lease(worker, kinds)
        if "evaluate" in kinds:
            self._note_idle(worker, got is None)
        if got is None:
            return None
        row, out = got
        if not hasattr(row, "_sa_instance_state"):  # the ORM path logs its own transitions
            log_transition("leased", row, TrialState.QUEUED)
        if out["task"] == "export":
            out = await anyio.to_thread.run_sync(self._source, out)
        return out

    async def _heartbeat_hot(self, trial_id: int, token: str | None) -> dict[str, Any] | None:
        return None

    async def heartbeat(self, trial_id: int, token: str | None) -> dict[str, Any]:
        got = await self._heartbeat_hot(trial_id, token)
        if got is not None:
            return got

        def _hb(s: Session) -> dict[str, Any]:  # the unusual cases, with their exact errors
            t, job = self._worker_trial(s, trial_id)
            heartbeat(s, t, token)
            return {"lease": lease_info(t.lease_token, t.lease_expires_at, JobSpec.of(job.spec).lease_seconds,
                                        t.attempt)}

        return await self._tx(_hb)

    async def _complete_hot(self, trial_id: int, token: str | None, result: Result) -> tuple[hot.Finished, bool] | None:
        return None

    async def complete(self, trial_id: int, token: str | None, result: Result) -> dict[str, Any]:
        fast = await self._complete_hot(trial_id, token, result)
        if fast is not None:
            return await self._stored(*fast)
        return await self._tx(partial(self._complete_orm, trial_id, token, result))

    async def _stored(self, done: hot.Finished, last: bool) -> dict[str, Any]:
        """A result the hot path stored: logged, and the job closed when it was its last open trial."""
        row = _Row(done.trial)
        log_transition("completed", row, TrialState.RUNNING)
        if last:  # the job's budget is spent and nothing is open: close it (locked, so once)
            await self._tx(lambda s: close_job_if_done(s, row.job_id, self.dialect))
        return trial_out(row)

    def _complete_orm(self, trial_id: int, tok: str | None, result: Result, s: Session) -> dict[str, Any]:
        t, job = self._worker_trial(s, trial_id)
        if t.kind == "profile":
            if t.state == TrialState.COMPLETED and job.profile is not None:
                complete(s, t, {}, {}, tok, extra={"profile": result.profile} if result.profile else None)
                return trial_out(t)
            prof, space = validate_profile(job, result.profile)
            complete(s, t, {}, {}, tok, extra={"profile": prof})
            if job.state == JobState.PROFILING:
                first_pass_budget(s, job, prof)  # a recipe's total budget -> its first pass's (before the check)
                unreachable = unreachable_budget(job, prof, space)
                if unreachable:
                    set_job_state(s, job, JobState.FAILED, (JobState.PROFILING,), reason=unreachable, profile=prof,
                                  search_space=space)
                    return trial_out(t)
                set_job_state(s, job, JobState.RUNNING, (JobState.PROFILING,), profile=prof, search_space=space)
                add_event(s, job.id, "profiled", detail=f"{len(prof['layers'])} layers, {len(space)} parameters")
                start_chipnet(s, job)
            return trial_out(t)
        if t.kind == CHIPNET_TASK:
            return trial_out(complete_chipnet(s, t, job, dict(result.values), dict(result.sem), result.artifact, tok))
        if t.kind == "export":
            complete(s, t, dict(result.values), dict(result.sem), tok, extra={"artifact": result.artifact})
            return trial_out(t)
        complete(s, t, evaluate_values(job, t.params, dict(result.values)), dict(result.sem), tok)
        return trial_out(t)

    async def fail(self, trial_id: int, token: str | None, error: str, retry: bool) -> dict[str, Any]:
        def _fail(s: Session) -> dict[str, Any]:
            t, _ = self._worker_trial(s, trial_id)
            fail(s, t, error, retry, token)
            return trial_out(t)

        return await self._tx(_fail)

    # -------------------------------------------------------------- clients

    def _prior(self, s: Session, viewer: Viewer, key: str, spec: dict[str, Any]) -> Job | None:
        prior = s.execute(select(Job).where(Job.owner == viewer.owner, Job.idempotency_key == key)).scalars().first()
        if prior is not None and as_requested(prior) != spec:
            # a reused key must come with the same job (as payment APIs answer), never the first job in silence
            raise TransitionError(f"Idempotency-Key {key[:60]!r} was already used for job {prior.id} with a "
                                  "different body: send a new key for a different job", "idempotency_mismatch")
        return prior

    async def create_job(self, viewer: Viewer, name: str, spec: dict[str, Any],
                         search_space: list[dict[str, Any]] | None, idempotency_key: str | None,
                         blobs: Sequence[tuple[str, str, str]] = ()) -> tuple[dict[str, Any], bool]:
        def _create(s: Session) -> tuple[dict[str, Any], bool]:
            if idempotency_key:
                prior = self._prior(s, viewer, idempotency_key, spec)
                if prior is not None:
                    return job_out(s, prior), False
            for fld, blob_id, kind in blobs:
                blob = s.get(Blob, blob_id)
                if blob is None or blob.kind != kind or not (viewer.sees_all or blob.owner == viewer.owner):
                    raise Invalid.field(fld, f"no uploaded {kind} {blob_id!r}")
            check_uploads(s, spec, blobs)
            now = utcnow()
            compression = search_space is None
            job = Job(name=name, owner=viewer.owner, kind="compression" if compression else "generic",
                      state=JobState.PROFILING if compression else JobState.RUNNING, spec=spec,
                      search_space=search_space, idempotency_key=idempotency_key, created_at=now, updated_at=now,
                      seq=0, n_created=0)
            s.add(job)
            s.flush()
            add_event(s, job.id, "job_created", detail=viewer.owner)
            if compression:
                s.add(Trial(job_id=job.id, kind="profile", number=0, seq=0, state=TrialState.QUEUED, params={},
                            values={}, sem={}, attempt=1, created_at=now))
                start_pipeline(s, job)
            s.flush()
            return job_out(s, job, with_best=False), True

        try:
            return await self._tx(_create)
        except IntegrityError as exc:
            # Two concurrent creates with one idempotency key: the other won; return its job.
            if not idempotency_key:
                raise
            conflict = exc

            def _other(s: Session) -> tuple[dict[str, Any], bool]:
                prior = self._prior(s, viewer, idempotency_key, spec)
                if prior is None:
                    raise conflict
                return job_out(s, prior), False

            return await self._read(_other)

    async def list_jobs(self, viewer: Viewer, limit: int, before: int | None, state: str | None) -> JobPage:
        def _list(s: Session) -> JobPage:
            q = select(Job).order_by(Job.id.desc()).limit(limit + 1)
            if not viewer.sees_all:
                q = q.where(Job.owner == viewer.owner)
            if before is not None:
                q = q.where(Job.id < before)
            if state is not None:
                q = q.where(Job.state == state)
            rows = s.execute(q).scalars().all()
            return JobPage([job_out(s, j) for j in rows[:limit]],
                           rows[limit - 1].id if len(rows) > limit else None)

        return await self._read(_list)

    async def get_job(self, job_id: int, viewer: Viewer) -> dict[str, Any]:
        return await self._read(lambda s: job_out(s, self._visible_job(s, job_id, viewer)))

    async def cancel(self, job_id: int, viewer: Viewer) -> dict[str, Any]:
        def _cancel(s: Session) -> dict[str, Any]:
            job = self._visible_job(s, job_id, viewer)
            if job.state not in FINISHED_JOB_STATES:
                cancel_job(s, job, self.dialect)
            cancel_pipeline(s, job, self.dialect)  # a pipeline's first job: what follows it too
            return job_out(s, job)

        return await self._tx(_cancel)

    def _page_rows(self, s: Session, job_id: int, since: int, n: int) -> list[Any]:
        t = Trial.__table__.c
        return list(s.connection().execute(
            select(*[t[c] for c in _PAGE_COLS]).where(t.job_id == job_id, t.kind == "evaluate", t.seq > since)
            .order_by(t.seq).limit(n)).all())

    @staticmethod
    def _page_json(rows: Sequence[Any], limit: int) -> str:
        return json.dumps([trial_out(r) for r in rows[:limit]], ensure_ascii=False, separators=(",", ":"))

    async def trial_page(self, job_id: int, viewer: Viewer, since: int, limit: int) -> TrialPage:
        def _page(s: Session) -> TrialPage:
            # The job's seq is read first: every change up to it has committed (a seq bump holds the
            # job row until its transaction ends), so the page that follows misses none of them.
            row = s.execute(select(Job.owner, Job.seq).where(Job.id == job_id)).first()
            if row is None or not viewer.may_see(row.owner):
                raise NotFound("job", job_id)
            rows = self._page_rows(s, job_id, since, limit + 1)
            return TrialPage(int(row.seq), self._page_json(rows, limit),
                             int(rows[limit - 1].seq) if len(rows) > limit else None)

        return await self._read(_page)

    async def get_trial(self, trial_id: int, viewer: Viewer) -> dict[str, Any]:
        def _get(s: Session) -> dict[str, Any]:
            t = s.get(Trial, trial_id)
            if t is None or t.kind != "evaluate":
                raise NotFound("trial", trial_id)
            self._visible_job(s, t.job_id, viewer)
            return trial_out(t)

        return await self._read(_get)

    async def pareto(self, job_id: int, viewer: Viewer) -> list[dict[str, Any]]:
        return await self._read(lambda s: [trial_out(t) for t in pareto_trials(s, self._visible_job(s, job_id, viewer))])

    def _ask_check(self, job_id: int, viewer: Viewer, s: Session) -> None:
        """Refuse an ask the job will never answer (the exact 404/409), before it waits."""
        job = self._visible_job(s, job_id, viewer)
        if job.kind != "generic":
            raise TransitionError(f"job {job_id} is a compression job: its trials are evaluated by workers",
                                  "not_generic")
        if job.state in (JobState.CANCELLED, JobState.FAILED):
            # Stopped before its budget was spent: nothing will ever be proposed. (A completed
            # job's budget is spent: it answers an empty list, the contract's "no more trials".)
            raise TransitionError(f"job {job_id} is {job.state}: it proposes no more trials", "job_finished")

    def _ask_claim(self, job_id: int, viewer: Viewer, crowd: bool, s: Session) -> tuple[dict[str, Any] | None, bool]:
        """One trial for the asker through the ORM: (trial or None, whether none will ever come)."""
        j = s.get(Job, job_id)
        assert j is not None
        s.refresh(j)
        # Read before the claim: on PostgreSQL (read committed) a batch committed between a claim that
        # found nothing and a later read of n_created would look like a spent budget with trials queued.
        spent = j.state != JobState.RUNNING or JobSpec.of(j.spec).budget_spent(j.n_created)
        c = claim_next(s, worker=f"client:{viewer.owner}", kinds=("evaluate",), lease_seconds=0, job_id=job_id,
                       dialect=self.dialect)
        if c is not None:
            return trial_out(c.trial), False
        if not spent and self._add_cheap(s, j, crowd):  # an empty buffer: answered at once, not after the next fit
            c = claim_next(s, worker=f"client:{viewer.owner}", kinds=("evaluate",), lease_seconds=0,
                           job_id=job_id, dialect=self.dialect)
            if c is not None:
                return trial_out(c.trial), False
        return None, spent

    async def ask(self, job_id: int, viewer: Viewer, count: int, wait_seconds: float,
                  wake: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        self._asking[job_id] = self._asking.get(job_id, 0) + 1
        try:
            got: list[dict[str, Any]] = []
            while len(got) < count:  # the common case: a few Core statements, no ORM session
                row = await anyio.to_thread.run_sync(self._ask_hot, job_id, viewer, self._asking[job_id] > 1)
                if row is None:
                    break
                log_transition("leased", row, TrialState.QUEUED)
                got.append(trial_out(row))
            if len(got) == count:
                return got
            await self._read(partial(self._ask_check, job_id, viewer))
            deadline = time.monotonic() + wait_seconds
            delay = 0.005
            while len(got) < count:  # waits on the event loop: clients waiting never hold the thread pool
                t, exhausted = await self._tx(partial(self._ask_claim, job_id, viewer, self._asking[job_id] > 1))
                if t is not None:
                    got.append(t)
                    delay = 0.005
                    continue
                if exhausted or time.monotonic() > deadline:
                    break
                if wake is not None:
                    wake()
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.1)
            return got
        finally:
            self._asking[job_id] -= 1
            if not self._asking[job_id]:
                del self._asking[job_id]

    def _ask_hot(self, job_id: int, viewer: Viewer, crowd: bool) -> Any | None:
        """A backend's hot ask (:class:`HotAskTell`): one trial row, or None (the ORM path answers).
        ``crowd``: other asks of the job are in flight in this process."""
        return None

    def _tell_hot(self, trial_id: int, viewer: Viewer, values: dict[str, float],
                  sem: dict[str, float]) -> tuple[hot.Finished, bool] | None:
        """A backend's hot tell (:class:`HotAskTell`): the stored result, or None (the ORM path answers)."""
        return None

    async def tell(self, trial_id: int, viewer: Viewer, values: dict[str, float], sem: dict[str, float],
                   failed: bool, error: str | None) -> dict[str, Any]:
        if not failed:
            fast = await anyio.to_thread.run_sync(self._tell_hot, trial_id, viewer, values, sem)
            if fast is not None:
                return await self._stored(*fast)

        def _tell(s: Session) -> dict[str, Any]:
            t = lock_trial(s, trial_id, self.dialect)
            if t.kind != "evaluate":
                raise NotFound("trial", trial_id)
            job = self._visible_job(s, t.job_id, viewer)
            if job.kind != "generic":
                raise TransitionError(f"trial {trial_id} belongs to a compression job: workers report it",
                                      "not_generic")
            if failed:
                fail(s, t, error or "failed", retry=False, lease_token=t.lease_token)  # the owner's own lease
                return trial_out(t)
            complete(s, t, evaluate_values(job, t.params, dict(values)), dict(sem), lease_token=t.lease_token)
            return trial_out(t)

        return await self._tx(_tell)

    # -------------------------------------------------------------- the scheduler

    def propose(self, job_id: int, expected_created: int, points: list[dict[str, float]],
                optimizer_state: dict[str, Any] | None = None) -> int:
        return run_tx(self.factory, lambda s: len(insert_proposals(s, job_id, expected_created, points,
                                                                   optimizer_state=optimizer_state)))

    def reap(self, limit: int = 500) -> int:
        return run_tx(self.factory, lambda s: reap_expired(s, limit=limit))


class _Row:
    """A dict's keys as attributes (a hot path's finished trial, for :func:`trial_out`)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


def _finish_hot(conn: Connection, t: Any, info: hot.JobInfo, result: Result) -> tuple[hot.Finished, bool]:
    """Store the evaluation ``t``'s result on the hot path: (the stored trial, whether it was the job's
    last open one); :class:`hot.Unusual` when it no longer runs that attempt (the ORM path answers)."""
    done = hot.finish(conn, t, *hot_values(info, t, result))
    if done is None:
        raise hot.Unusual
    return done, done.spends_budget(info.max_trials) and hot.open_trials(conn, t.job_id) == 0


class HotAskTell:
    """Ask and tell of a generic job as a few prebuilt Core statements in one transaction
    (:func:`bocompress.service.db.hot.ask`, :func:`~bocompress.service.db.hot.finish`), in the thread
    pool, on both backends; anything unusual goes to the ORM path of :class:`OrmStore`."""

    engine: Engine
    jobs: hot.JobInfoCache
    dialect: str
    cheap: Any

    def _hot_tx(self, fn: Callable[[Connection], T]) -> T | None:
        """``fn(conn)`` in one transaction; None (rolled back) when it raised :class:`hot.Unusual`."""
        try:
            return run_conn(self.engine, fn)
        except hot.Unusual:
            return None

    def _ask_hot(self, job_id: int, viewer: Viewer, crowd: bool) -> Any | None:
        """One trial for the asker by :func:`bocompress.service.db.hot.ask`, or None (the ORM path answers)."""
        def _fast(conn: Connection) -> Any:
            info = self.jobs.get(conn, job_id)
            if info is None or info.kind != "generic" or not viewer.may_see(info.owner):
                raise hot.Unusual
            return hot.ask(conn, info, f"client:{viewer.owner}", self.cheap, self.dialect, crowd)

        return self._hot_tx(_fast)

    def _tell_hot(self, trial_id: int, viewer: Viewer, values: dict[str, float],
                  sem: dict[str, float]) -> tuple[hot.Finished, bool] | None:
        """The usual tell (a running trial of the caller's generic job) in Core, or None (the ORM path answers)."""
        def _fast(conn: Connection) -> tuple[hot.Finished, bool] | None:
            t = hot.told_row(conn, trial_id, self.dialect)
            if t is None or t.kind != "evaluate" or t.state != TrialState.RUNNING:
                return None
            info = self.jobs.get(conn, t.job_id)
            if info is None or info.kind != "generic" or not viewer.may_see(info.owner):
                return None
            return _finish_hot(conn, t, info, Result(values, sem))

        return self._hot_tx(_fast)

    async def _empty_lease(self, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
        """The usual empty queue (no lease expired) answered by :func:`bocompress.service.db.hot.cheap_lease`."""
        if self.cheap is None or "evaluate" not in kinds:
            return await super()._empty_lease(worker, kinds)  # type: ignore[misc]
        cheap, crowd = self.cheap, self._idle_crowd(worker)
        try:
            got = await anyio.to_thread.run_sync(
                run_conn, self.engine, lambda c: hot.cheap_lease(c, self.jobs, worker, cheap, FIRST_BATCH_GRACE_S,
                                                                 crowd))
        except hot.Unusual:  # a lease expired: the ORM path reaps it first
            return await super()._empty_lease(worker, kinds)  # type: ignore[misc]
        if got is None:
            return None
        row, dyn, info = got
        return row, lease_answer(row, job_light(info, dyn), info.lease_seconds)


class SQLiteStore(HotAskTell, OrmStore):
    """SQLite: the hot path as Core statements in one ``BEGIN IMMEDIATE`` each, in the thread pool."""

    def _lease_sync(self, worker: str, kinds: list[str]) -> tuple[Any, dict[str, Any]] | None:
        got = run_conn(self.engine, lambda c: hot.lease(c, self.jobs, worker, kinds))
        if got is None:
            return None
        row, dyn, info = got
        return row, lease_answer(row, job_light(info, dyn), info.lease_seconds)

    async def _heartbeat_hot(self, trial_id: int, token: str | None) -> dict[str, Any] | None:
        got = await anyio.to_thread.run_sync(run_conn, self.engine,
                                             lambda c: hot.heartbeat(c, self.jobs, trial_id, token))
        if got is None:
            return None
        row, info = got
        return {"lease": lease_info(row.lease_token, row.lease_expires_at, info.lease_seconds, row.attempt)}

    async def _complete_hot(self, trial_id: int, token: str | None, result: Result) -> tuple[hot.Finished, bool] | None:
        def _fast(conn: Connection) -> tuple[hot.Finished, bool] | None:
            t = hot.result_row(conn, trial_id)
            if not hot_result_ok(t, token):
                return None
            info = self.jobs.get(conn, t.job_id)
            if info is None or info.kind != "compression":
                return None  # an ask/tell trial: the ORM path refuses it
            return _finish_hot(conn, t, info, result)

        return await anyio.to_thread.run_sync(self._hot_tx, _fast)


__all__ = ["HotAskTell", "OrmStore", "SQLiteStore", "hot_result_ok", "hot_values", "lease_answer", "lease_info", "log_transition"]
