"""Keeps each running job's proposal buffer full and reaps expired leases, off the request path.

One background thread per service process. Proposals are computed here (a GP fit can take a
second) and written to the database as ``queued`` trials, so a worker's lease or a client's
``ask`` is answered from the database. With several replicas on one PostgreSQL, a job's
proposal stream is guarded by a lock in the database (``jobs.generator_owner``/``generator_until``)
and by the guarded ``n_created`` update: at most one generator per job, never two batches.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bocompress.spec import JobSpec
from bocompress.states import OPEN_TRIAL_STATES, JobState, TrialState
from bocompress.service.db.errors import TransitionError
from bocompress.service.db.models import Job, Trial, utcnow
from bocompress.service.db.pipeline import ACTIVE_STAGES
from bocompress.service.db.queries import EXPIRED_LEASE
from bocompress.service.db.session import read_session, run_tx
from bocompress.service.db.store import Store
from bocompress.service.db.trials import acquire_generator, jobs_needing_proposals, release_generator, set_job_state

log = logging.getLogger("bocompress.scheduler")
_torch_configured = False
MIN_TICK_GAP = 0.1


def _configure_torch() -> None:
    """One intra-op thread for proposals, set once per process before the first ``propose``.

    Measured on 2 cores: torch's default pool (one thread per core) made a scrambled-Sobol point
    cost 19 ms instead of 0.9 ms and a GP proposal 12 s instead of 1 s, because its threads
    contend with the request threads of this same process. Proposals are small tensors; one
    thread is both faster and leaves the other core to the API.
    """
    global _torch_configured
    if not _torch_configured:
        import torch

        torch.set_num_threads(1)
        _torch_configured = True


def job_problem(job: Job) -> Any:
    from bocompress.service.optimizer import Problem

    spec = job.spec
    opt = spec.get("optimizer", {})
    return Problem(
        params=list(job.search_space or []),
        objective=dict(spec["objective"]),
        profile=job.profile if job.kind == "compression" else None,
        n_initial=int(opt.get("n_initial", 8)),
        seed=int(opt.get("seed", 0)),
        engine=str(opt.get("engine", "auto")),
    )


def _metric(job: Job) -> str:
    return JobSpec.of(job.spec).modelled_metric


def _as_input(metric: str, state: str, params: dict, values: dict | None, sem: dict | None) -> Any:
    """What the engine sees of one trial: an Observation, pending params, or None (not its business)."""
    import math

    from bocompress.service.optimizer import Observation

    if state in OPEN_TRIAL_STATES:
        return dict(params)
    if state != TrialState.COMPLETED:
        return None
    v = (values or {}).get(metric)
    if v is None or not math.isfinite(float(v)):
        return None  # failed and non-finite results never reach the GP
    e = (sem or {}).get(metric)
    return Observation(params=dict(params), value=float(v), sem=None if e is None else float(e))


def _split(inputs: list[Any]) -> tuple[list[Any], list[dict[str, float]]]:
    obs = [x for x in inputs if x is not None and not isinstance(x, dict)]
    pending = [x for x in inputs if isinstance(x, dict)]
    return obs, pending


def observations(s: Session, job: Job) -> tuple[list[Any], list[dict[str, float]]]:
    """Completed finite results (what the GP sees) and the params of queued/running trials."""
    rows = s.execute(
        select(Trial.state, Trial.params, Trial.values, Trial.sem)
        .where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.state.in_((*OPEN_TRIAL_STATES, TrialState.COMPLETED)))
        .order_by(Trial.number)
    ).all()
    metric = _metric(job)
    return _split([_as_input(metric, *r) for r in rows])


class History:
    """A job's trials as the engine sees them, kept per process and read incrementally.

    Each fill reads only the trials whose ``seq`` passed the last one seen: every change of a
    trial bumps its job's ``seq`` under the job's row lock, so any snapshot holds every change
    up to the largest ``seq`` it shows. A 10,000-trial job's refill then reads a few rows, not
    10,000 (measured: the full read was most of a refill's cost in ``bench/load.py``).
    """

    def __init__(self, key: Any) -> None:
        self.seq = 0
        self.key = key
        self.inputs: dict[int, tuple[Any, Any]] = {}

    def read(self, s: Session, job: Job) -> tuple[list[Any], list[dict[str, float]], tuple[list[Any], list[Any]]]:
        """(observations, pending) in trial order, as :func:`observations` reads them, and their
        point keys in the same order (``propose(keys=)``)."""
        metric = _metric(job)
        rows = s.execute(
            select(Trial.number, Trial.seq, Trial.state, Trial.params, Trial.values, Trial.sem)
            .where(Trial.job_id == job.id, Trial.kind == "evaluate", Trial.seq > self.seq)
        ).all()
        for number, seq, state, params, values, sem in rows:
            x = _as_input(metric, state, params, values, sem)
            self.inputs[int(number)] = (x, None if x is None else self.key(params))
            self.seq = max(self.seq, int(seq))
        items = [self.inputs[k] for k in sorted(self.inputs)]
        obs, pending = _split([x for x, _ in items])
        keys = ([k for x, k in items if x is not None and not isinstance(x, dict)],
                [k for x, k in items if isinstance(x, dict)])
        return obs, pending, keys


def _child_init(service_pid: int, nice: int = 0) -> None:
    import bocompress.service.optimizer  # noqa: F401 - imported once, before the first proposal

    if nice:
        # Below the requests in the CPU's queue: a fit on a busy machine slows the next batch,
        # never an ask, a lease or a result (those are answered from the buffer or a cheap point).
        os.nice(nice)
    _configure_torch()
    threading.Thread(target=_exit_with, args=(service_pid,), name="bocompress-engine-watch", daemon=True).start()


def _exit_with(pid: int, period: float = 1.0) -> None:
    """End this engine process once the service process ``pid`` is gone.

    A service killed outright (SIGKILL, the OOM killer) cannot shut its engine down, and nothing
    else would: the engine's parent is the fork server, which itself waits for the engine (the
    engine holds the fork server's "service alive" pipe). So the engine watches the service.
    """
    while True:
        time.sleep(period)
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid reused by another user's process)
            os._exit(0)


def _child_ready() -> bool:
    return True


class EngineProcess:
    """``propose`` in a child process of the service, so a GP fit never holds the GIL of the
    process that answers requests (measured: with the fit in a thread of the server, the lease
    p95 of 16 workers was 216 ms; see ``bench/bo_latency.py``).

    The child comes from a fork server that has imported the engine once (``forkserver`` with
    ``bocompress.service.optimizer`` preloaded), so a new child, after a crash or in the next app of one
    Python process, starts in milliseconds rather than re-importing torch. A crashed child is
    replaced and the proposal retried once; a child whose service was killed ends itself (and
    so lets the fork server end).
    """

    def __init__(self, nice: int = 0) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["bocompress.service.optimizer"])
        self._new = lambda: ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_child_init,
                                                initargs=(os.getpid(), nice))
        self._pool = self._new()

    def warm(self) -> None:
        """Start the child and wait until it has imported the engine."""
        self._pool.submit(_child_ready).result()

    def propose(self, *args: Any) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        from bocompress.service.optimizer import propose

        for attempt in (0, 1):
            try:
                return self._pool.submit(propose, *args).result()
            except BrokenProcessPool:
                log.error("the engine process died; starting a new one")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def dead_local_owner(owner: str, me: str) -> bool:
    """Whether the generator-lock owner ``owner`` (``host:pid:id``, this module's default name)
    is another process on this host (``me``'s) that no longer runs."""
    parts, mine = owner.split(":"), me.split(":")
    if len(parts) != 3 or len(mine) != 3 or parts[0] != mine[0] or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive (another user's), or not a pid of this machine
    return False


def cheap_proposer(strategy: str) -> Any:
    """The :data:`~bocompress.service.db.store.CheapProposer` storage calls on an empty buffer:
    :func:`bocompress.service.optimizer.cheap.propose_cheap` with ``strategy``."""
    from bocompress.service.optimizer.allocators import ALLOCATORS
    from bocompress.service.optimizer.cheap import STRATEGIES, propose_cheap

    if strategy not in STRATEGIES:
        raise ValueError(f"cheap_proposals must be 'off' or one of {STRATEGIES}, got {strategy!r}")

    def cheap(space: list[dict[str, Any]], compression: bool, incumbent: dict[str, float] | None,
              n_created: int, optimizer: dict[str, Any]) -> dict[str, float] | None:
        if str(optimizer.get("engine", "auto")) in ALLOCATORS:
            return None  # a one-shot allocation: its points, then done
        return propose_cheap(space, compression, incumbent, n_created, int(optimizer.get("seed", 0)), strategy)

    return cheap


class Scheduler:
    """The background loop of one replica.

    A proposal is always ready: each job's buffer is kept deeper than its active consumers
    (:meth:`bocompress.spec.JobSpec.buffer_target`) and refilled before it runs dry; when a burst
    empties it anyway, storage answers at once with a cheap proposal (the proposer set here,
    ``settings.cheap_proposals``), and the engine's next batch lands after it. With one engine
    process for every job, each tick fills the jobs that wait most first
    (:func:`~bocompress.service.db.proposals.jobs_needing_proposals`' order), one engine call each, so a
    job's refill waits for at most one fit of each other job that needs one.
    """

    def __init__(self, factory: sessionmaker[Session], settings: Any, metrics: Any, store: Store) -> None:
        self.factory = factory
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.me = settings.replica or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self._histories: dict[int, History] = {}
        self.engine: EngineProcess | None = None
        #: Consecutive failed proposals per job (see :meth:`_proposal_failed`).
        self._failures: dict[int, int] = {}
        strategy = str(getattr(settings, "cheap_proposals", "auto"))
        if strategy != "off":
            store.set_cheap_proposer(cheap_proposer(strategy))

    def start(self) -> None:
        """Import the BO engine (torch, BoTorch), then start the loop.

        The import happens here, during the app's startup and before it accepts requests: done
        lazily in the loop's first fill it took 20 s and more on 2 cores, starved of the GIL
        by request threads, while workers found the queue empty.
        """
        import bocompress.service.optimizer  # noqa: F401 - the import is the point

        _configure_torch()
        if self.settings.engine_process:
            self.engine = EngineProcess(self.settings.engine_nice)
            self.engine.warm()
        self._thread = threading.Thread(target=self._run, name="bocompress-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        try:  # import the BO engine (torch, BoTorch) now, not on the first proposal
            import bocompress.service.optimizer  # noqa: F401
        except Exception:  # noqa: BLE001
            log.exception("the optimizer failed to import")
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive a bad tick (DB restart, ...)
                self.errors += 1
                log.exception("scheduler tick failed")
            # Woken by each result and empty lease, but at most one tick per MIN_TICK_GAP: under
            # hundreds of results per second, a tick (two reads and a refill) per result would
            # cost more than the results themselves.
            self._stop.wait(min(MIN_TICK_GAP, self.settings.scheduler_interval))
            self._wake.wait(self.settings.scheduler_interval)
            self._wake.clear()

    def tick(self) -> int:
        """Reap expired leases and refill every short buffer once. Returns proposals made."""
        with read_session(self.factory) as s:  # one read for the three questions
            expired = s.execute(EXPIRED_LEASE, {"now": utcnow()}).first()
            todo = jobs_needing_proposals(s)
            piped = s.execute(select(Job.id).where(Job.pipeline_stage.in_(ACTIVE_STAGES)).limit(1)).first()
        if expired is not None:
            self.store.reap()
        if piped is not None:  # a pipeline whose stage finished takes its next step (guarded: once across replicas)
            try:
                self.store.advance_pipelines()
            except Exception:  # noqa: BLE001 - the proposals below must still be made
                self.errors += 1
                log.exception("advancing pipelines failed")
        made = 0
        for job_id, _, _ in todo:
            if self._stop.is_set():
                break
            try:
                made += self.fill(job_id)
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("proposal failed", extra={"job_id": job_id})
        return made

    def _proposal_failed(self, job_id: int, exc: Exception) -> None:
        """Count a failed proposal; after ``max_proposal_failures`` in a row the job is ``failed``
        with the error as its reason, instead of being retried twice a second for ever.

        A dead engine process is not the job's fault and is not counted.
        """
        from concurrent.futures.process import BrokenProcessPool

        if isinstance(exc, BrokenProcessPool):
            return
        n = self._failures[job_id] = self._failures.get(job_id, 0) + 1
        if n < self.settings.max_proposal_failures:
            return
        self._failures.pop(job_id, None)
        reason = f"the optimizer failed {n} times in a row: {type(exc).__name__}: {exc}"[:1000]

        def _fail_job(s: Session) -> None:
            job = s.get(Job, job_id)
            if job is not None and job.state == JobState.RUNNING:
                set_job_state(s, job, JobState.FAILED, (JobState.RUNNING,), reason=reason)

        run_tx(self.factory, _fail_job)
        log.error("job failed: its proposals keep failing", extra={"job_id": job_id, "error": reason})

    def _acquire(self, job_id: int, secs: float) -> bool:
        """Take the job's generator lock: free, expired, ours, or left by a dead process of ours.

        A lock held under this host's name by a pid that no longer runs was left by a crashed
        service on this machine (``kill -9`` mid-refill): it is taken over at once, not after
        ``generator_lease_seconds``. Locks of other hosts (replicas) still wait for their expiry.
        """
        if run_tx(self.factory, lambda s: acquire_generator(s, job_id, self.me, secs)):
            return True
        with read_session(self.factory) as s:
            owner = s.execute(select(Job.generator_owner).where(Job.id == job_id)).scalar_one_or_none()
        if owner is None or not dead_local_owner(owner, self.me):
            return False
        log.warning("taking over a generator lock left by a dead process", extra={"job_id": job_id, "owner": owner})
        return run_tx(self.factory, lambda s: acquire_generator(s, job_id, self.me, secs, stale_owner=owner))

    def fill(self, job_id: int) -> int:
        """Top up one job's buffer of queued proposals, if this replica holds its generator lock."""
        from bocompress.service.optimizer import initial_design_only, point_key, propose
        from bocompress.service.optimizer.allocators import ALLOCATORS

        secs = self.settings.generator_lease_seconds
        if not self._acquire(job_id, secs):
            return 0
        try:
            with read_session(self.factory) as s:
                job = s.get(Job, job_id)
                if job is None or job.state != JobState.RUNNING:
                    self._histories.pop(job_id, None)
                    return 0
                counts = dict(s.execute(select(Trial.state, func.count()).where(
                    Trial.job_id == job_id, Trial.kind == "evaluate",
                    Trial.state.in_((TrialState.QUEUED, TrialState.RUNNING))).group_by(Trial.state)).all())
                view = JobSpec.of(job.spec)
                n = view.engine_batch(view.buffer_need(int(counts.get(TrialState.QUEUED.value, 0)), job.n_created,
                                                       int(counts.get(TrialState.RUNNING.value, 0))))
                if n <= 0:
                    return 0
                problem = job_problem(job)
                hist = self._histories.get(job_id)
                if hist is None:
                    if len(self._histories) >= 256:
                        self._histories.clear()
                    hist = self._histories[job_id] = History(point_key(problem))
                obs, pending, keys = hist.read(s, job)
                created, state = job.n_created, job.optimizer_state
            _configure_torch()
            t0 = time.perf_counter()
            args = (problem, obs, pending, created, n, state, keys)
            # Initial-design points are cheap (no GP) and need no history sent to the child:
            # made here; everything that may reach the GP stage goes to the engine process.
            use_child = self.engine is not None and not initial_design_only(problem, created, n)
            try:
                points, new_state = self.engine.propose(*args) if use_child else propose(*args)
            except Exception as exc:
                self._proposal_failed(job_id, exc)
                raise
            self._failures.pop(job_id, None)
            engine = (new_state or {}).get("last_engine", problem.engine)
            self.metrics.observe_proposal(time.perf_counter() - t0, str(engine))
            if not points:
                if not pending:
                    # A finite (grid) space with every point tried: nothing left to propose.
                    def _exhausted(s: Session) -> int:
                        job = s.get(Job, job_id)
                        assert job is not None
                        if job.state == JobState.RUNNING:
                            reason = (f"one-shot allocator {problem.engine!r}: its {created} point(s) proposed"
                                      if problem.engine in ALLOCATORS
                                      else f"search space exhausted after {created} trials")
                            set_job_state(s, job, JobState.COMPLETED, (JobState.RUNNING,), reason=reason)
                        return 0

                    run_tx(self.factory, _exhausted)
                return 0

            try:
                k = self.store.propose(job_id, created, points, new_state)
            except TransitionError:
                return 0
            log.debug("proposed", extra={"job_id": job_id, "n": k})
            return k
        finally:
            run_tx(self.factory, lambda s: release_generator(s, job_id, self.me))
