"""Pipelines in storage: a recipe's stages, advanced by the scheduler with guarded transitions.

A compression job whose spec carries ``recipe: {"kind": "two-pass", ...}`` (checked and filled in
by :mod:`bocompress.service.api.pipeline`) is the first job of a pipeline. Its row holds the
pipeline's stage (``jobs.pipeline_stage``) and state (``jobs.pipeline``: its jobs, the export, the
ratios, the reason it failed). The stages:

1. ``first``: the job searches its first pass (the spec's ``compression``: Conv2d, tucker2).
   When it completes, its best trial gets an export task with a ``finetune-distill`` retraining
   (``recipe.finetune``) and the stage becomes ``finetune``.
2. ``finetune``: a worker builds and fine-tunes that model. When the export completes, its
   artifact is kept as a model upload of the job's owner, and a second job is created whose
   ``compression.model`` is that upload, with the second pass's method and layers (Linear, svd)
   and the same objective and budget: the stage becomes ``second``. A worker rebuilds the
   upload with :func:`bocompress.load_compressed` (it is a bocompress export) and describes the
   second pass's exports against a fresh build of the original architecture, so the final
   model loads as one file.
3. ``second``: the second job searches. When it completes the stage is ``done`` with
   ``total_ratio`` = R₁ · R₂ (each R is exact and relative to its pass's input model, so their
   product is the final model's cost relative to the ORIGINAL model's) and ``final`` (its best).

Any stage's job or task failing fails the pipeline (``failed``, with the reason); cancelling the
first job (or the second) cancels what is open and what would follow (``cancelled``).

:func:`advance` does one step and is idempotent: it reads the stage, does nothing unless the
stage's job or task has finished, and moves the stage with ``UPDATE ... WHERE pipeline_stage =
<the stage read>``, which must match the row, in the same transaction as the step's inserts.
Two replicas (or a restarted one) that both see a finished stage therefore advance it once: the
second's guarded update matches nothing (it waited for the first's row lock on PostgreSQL; SQLite
serializes writers) and its transaction is rolled back.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bocompress.costs import searched_cost
from bocompress.spec import JobSpec
from bocompress.states import ACTIVE_JOB_STATES, FINISHED_JOB_STATES, OPEN_TRIAL_STATES, JobState, TrialState
from bocompress.service.db.errors import TransitionError
from bocompress.service.db.models import Blob, Job, Trial, new_blob, utcnow
from bocompress.service.db.queries import best_trial
from bocompress.service.db.session import read_session, run_tx
from bocompress.service.db.trials import add_event, bump_seq, cancel_job, transition

#: Stages in which the pipeline still has work to wait for.
ACTIVE_STAGES = ("first", "finetune", "second")
#: Where a pipeline ends.
FINAL_STAGES = ("done", "failed", "cancelled")


def start_pipeline(s: Session, job: Job) -> None:
    """Make a just-created job with a ``recipe`` the first job of its pipeline (stage ``first``)."""
    recipe = (job.spec or {}).get("recipe")
    if not recipe:
        return
    state = {"kind": recipe["kind"], "jobs": [job.id], "export": None, "ratios": [], "total_ratio": None,
             "final": None, "reason": None}
    s.execute(update(Job).where(Job.id == job.id).values(pipeline=state, pipeline_stage="first"))
    add_event(s, job.id, "pipeline_first", detail=f"{recipe['kind']}: first pass")
    s.refresh(job)


def first_pass_budget(s: Session, job: Job, prof: dict[str, Any]) -> None:
    """A ``constrained`` recipe's budget b is the FINAL model's R against the original. When the first
    pass is profiled, its own budget becomes ``1 - (1 - b) * C_sel / C_total``: the layers it searches
    (cost C_sel of the model's C_total) held to b of their own cost, the rest left for the second pass
    (:func:`_second_budget` gives it ``b / R1``). The stored spec's ``objective.budget`` is the pass's; the
    pipeline keeps b (``budget``), and :func:`as_requested` gives the spec as it was posted back."""
    spec = JobSpec.of(job.spec or {})
    if job.pipeline_stage != "first" or not spec.constrained or spec.budget is None or "budget" in (job.pipeline or {}):
        return
    b = spec.budget
    total = float((prof.get("totals") or {}).get(spec.cost) or 0.0)
    sel = searched_cost(prof, spec.cost)
    if total <= 0 or sel <= 0:
        return
    b1 = min(1.0, 1.0 - (1.0 - b) * min(sel, total) / total)
    job.spec = {**job.spec, "objective": {**job.spec["objective"], "budget": b1}}
    job.pipeline = {**(job.pipeline or {}), "budget": b, "budgets": [b1]}
    s.flush()  # before set_job_state's refresh of the row
    add_event(s, job.id, "pipeline_budget",
              detail=f"total R <= {b:g}: the first pass's layers ({sel / total:.1%} of the {spec.cost}) at R <= {b1:.4f}")


def as_requested(job: Job) -> dict[str, Any]:
    """The spec of a first pass as it was posted (its total budget back in ``objective.budget``)."""
    spec = dict(job.spec or {})
    b = (job.pipeline or {}).get("budget") if job.pipeline_stage is not None else None
    if b is not None and "objective" in spec:
        spec["objective"] = {**spec["objective"], "budget": b}
    return spec


def _move(s: Session, root: Job, frm: str, to: str, **changes: Any) -> None:
    """The guarded stage change ``frm`` -> ``to`` (with ``changes`` to the pipeline's state)."""
    state = {**(root.pipeline or {}), **changes}
    res = s.execute(update(Job).where(Job.id == root.id, Job.pipeline_stage == frm)
                    .values(pipeline_stage=to, pipeline=state, updated_at=utcnow()))
    if res.rowcount != 1:
        raise TransitionError(f"pipeline of job {root.id} is no longer at stage {frm!r}", "pipeline_raced")
    add_event(s, root.id, f"pipeline_{to}", detail=(changes.get("reason") or f"{frm} -> {to}")[:1000])
    s.refresh(root)


def _ratio(t: Trial) -> float:
    return float((t.values or {})["ratio"])


def _finished_job_reason(what: str, job: Job) -> tuple[str, str]:
    """The pipeline's end when a stage's job ended without completing: (stage, reason)."""
    if job.state == JobState.CANCELLED:
        return "cancelled", f"{what} (job {job.id}) was cancelled"
    return "failed", f"{what} (job {job.id}) {job.state}: {job.reason or 'no reason given'}"


def _completed_best(s: Session, root: Job, stage: str, job: Job, what: str) -> Trial | None:
    """The best trial of a pass's job that has ended; None once the pipeline is moved to its end
    (the job failed or was cancelled, or completed no trial)."""
    if job.state != JobState.COMPLETED:
        to, reason = _finished_job_reason(what, job)
        _move(s, root, stage, to, reason=reason)
        return None
    best = best_trial(s, job)
    if best is None or "ratio" not in (best.values or {}):
        _move(s, root, stage, "failed", reason=f"{what} (job {job.id}) completed no trial")
        return None
    return best


def _export_task(s: Session, root: Job, src: Trial) -> Trial:
    """The export of the first pass's best trial, fine-tuned by distillation (as ``POST …/export``
    with ``retrain: {"mode": "finetune-distill", ...}`` makes it)."""
    ft = dict((root.spec.get("recipe") or {}).get("finetune") or {})
    retrain = {"mode": "finetune-distill", **ft}
    n = len(s.execute(select(Trial.id).where(Trial.job_id == root.id, Trial.kind == "export")).all())
    task = Trial(job_id=root.id, kind="export", number=n, seq=bump_seq(s, root.id), state=TrialState.QUEUED,
                 params={"trial_id": src.id, "finetune_steps": 0, "lr": 1e-4, "retrain": retrain}, values={},
                 sem={}, attempt=1, created_at=utcnow())
    s.add(task)
    s.flush()
    add_event(s, root.id, "export_requested", task.id, None, TrialState.QUEUED, f"trial {src.id} (pipeline)")
    return task


def _model_from_export(s: Session, root: Job, task: Trial) -> Blob:
    """The fine-tuned first pass as a model upload of the job's owner (a copy of the artifact)."""
    art = s.get(Blob, ((task.extra or {}).get("artifact") or {}).get("blob_id", ""))
    if art is None:
        raise LookupError(f"the fine-tune export (task {task.id}) has no artifact")
    ref = str(root.spec["compression"]["model"])
    arch, meta = ref, {}
    if ref.startswith("mdl_"):
        orig = s.get(Blob, ref)
        arch = (orig.arch if orig is not None else None) or ref
        if orig is not None and (orig.meta or {}).get("arch_spec"):
            meta["arch_spec"] = orig.meta["arch_spec"]
    meta.update({"pipeline": root.id, "export_task": task.id, "compressed": True})
    blob = new_blob("model", root.owner, art.data, dict(art.tensors or {}), arch=arch[:200], meta=meta)
    s.add(blob)
    s.flush()
    return blob


def _second_budget(state: dict[str, Any]) -> float | None:
    """The second pass's ``constrained`` budget, ``b / R1`` (at most 1): R against the fine-tuned first
    pass, so that the final model keeps at most b of the original's cost; None without a budget."""
    b, r1 = state.get("budget"), state.get("ratios") or []
    return min(1.0, float(b) / float(r1[0])) if b is not None and r1 and float(r1[0]) > 0 else None


def _second_job(s: Session, root: Job, model_id: str, budget: float | None) -> Job:
    """The second pass: the first job's spec with the fine-tuned model, the second pass's layers and
    (``constrained``) its ``budget``."""
    spec = {k: v for k, v in root.spec.items() if k != "recipe"}
    second = root.spec["recipe"]["second"]
    spec["compression"] = {**spec["compression"], "model": model_id, "method": second["method"],
                           "layers": second["layers"]}
    if budget is not None:
        spec["objective"] = {**spec["objective"], "budget": budget}
    now = utcnow()
    job = Job(name=f"{root.name} (pass 2)"[:200], owner=root.owner, kind="compression", state=JobState.PROFILING,
              spec=spec, search_space=None, idempotency_key=None, created_at=now, updated_at=now, seq=0,
              n_created=0, pipeline={"root": root.id})
    s.add(job)
    s.flush()
    add_event(s, job.id, "job_created", detail=f"{root.owner} (pipeline of job {root.id})")
    s.add(Trial(job_id=job.id, kind="profile", number=0, seq=0, state=TrialState.QUEUED, params={}, values={},
                sem={}, attempt=1, created_at=now))
    s.flush()
    return job


def advance(s: Session, job_id: int, dry: bool = False) -> bool:
    """One step of the pipeline whose first job is ``job_id``: whether there was one to take.

    With ``dry`` nothing is written (the scheduler asks in a read transaction first, so a
    pipeline waiting on a search costs no write lock). Raises TransitionError ``pipeline_raced``
    when another process took the step first (roll back).
    """
    if dry:
        root = s.get(Job, job_id)
    else:  # the root row locked first (PostgreSQL; SQLite's writers are serialized), read fresh
        q = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
        root = s.execute(q.with_for_update() if s.get_bind().dialect.name == "postgresql" else q).scalars().first()
    if root is None or root.pipeline_stage not in ACTIVE_STAGES:
        return False
    stage, state = root.pipeline_stage, dict(root.pipeline or {})
    if stage == "first":
        if root.state in ACTIVE_JOB_STATES:
            return False
        if dry:
            return True
        best = _completed_best(s, root, stage, root, "the first pass")
        if best is None:
            return True
        task = _export_task(s, root, best)
        _move(s, root, stage, "finetune", ratios=[_ratio(best)],
              export={"job_id": root.id, "trial_id": best.id, "task_id": task.id, "model": None})
        return True
    if stage == "finetune":
        export = dict(state.get("export") or {})
        task = s.get(Trial, int(export.get("task_id", 0)))
        if task is not None and task.state in OPEN_TRIAL_STATES:
            return False
        if dry:
            return True
        if task is None or task.state != TrialState.COMPLETED:
            what = f"the fine-tune export (task {export.get('task_id')}) of trial {export.get('trial_id')}"
            if task is not None and task.state == TrialState.CANCELLED:
                _move(s, root, stage, "cancelled", reason=f"{what} was cancelled")
            else:
                err = (task.error or "").strip().splitlines()[0][:500] if task is not None and task.error else ""
                _move(s, root, stage, "failed", reason=f"{what} {task.state if task else 'vanished'}: {err}".strip())
            return True
        try:
            blob = _model_from_export(s, root, task)
        except LookupError as exc:
            _move(s, root, stage, "failed", reason=str(exc))
            return True
        b2 = _second_budget(state)
        job2 = _second_job(s, root, blob.id, b2)
        export.update(model=blob.id, values=dict(task.values or {}))
        budgets = {"budgets": [*list(state.get("budgets") or [])[:1], b2]} if b2 is not None else {}
        _move(s, root, stage, "second", jobs=[root.id, job2.id], export=export, **budgets)
        return True
    # stage == "second"
    jobs = list(state.get("jobs") or [])
    job2 = s.get(Job, int(jobs[1])) if len(jobs) > 1 else None
    if job2 is not None and job2.state in ACTIVE_JOB_STATES:
        return False
    if dry:
        return True
    if job2 is None:
        _move(s, root, stage, "failed", reason="the second pass's job vanished")
        return True
    best = _completed_best(s, root, stage, job2, "the second pass")
    if best is None:
        return True
    ratios = [*list(state.get("ratios") or [])[:1], _ratio(best)]
    total = ratios[0] * ratios[1] if len(ratios) == 2 else None
    values = best.values or {}
    final = {"job_id": job2.id, "trial_id": best.id, "ratio": _ratio(best),
             **{k: float(values[k]) for k in ("distill_l2", "accuracy", "accuracy_original") if k in values}}
    _move(s, root, stage, "done", ratios=ratios, total_ratio=total, final=final)
    return True


def cancel_pipeline(s: Session, root: Job, dialect: str) -> None:
    """Cancel what a pipeline still has open (the first job, the export, the second job) and the
    stages that would follow: the pipeline ends ``cancelled``. A finished pipeline is left as is."""
    stage = root.pipeline_stage
    if stage not in ACTIVE_STAGES:
        return
    state = dict(root.pipeline or {})
    if stage == "finetune":
        task = s.get(Trial, int((state.get("export") or {}).get("task_id", 0)))
        if task is not None and task.state in OPEN_TRIAL_STATES:
            from bocompress.service.db.trials import drop_unreported_artifact

            transition(s, task, TrialState.CANCELLED, OPEN_TRIAL_STATES, event="export_cancelled",
                       finished_at=utcnow(), lease_expires_at=None, guard_attempt=False)
            drop_unreported_artifact(s, task)
    elif stage == "second":
        jobs = list(state.get("jobs") or [])
        job2 = s.get(Job, int(jobs[1])) if len(jobs) > 1 else None
        if job2 is not None and job2.state not in FINISHED_JOB_STATES:
            cancel_job(s, job2, dialect)
    _move(s, root, stage, "cancelled", reason=f"cancelled by user at stage {stage!r}")


def root_of(s: Session, job: Job) -> Job | None:
    """The first job of the pipeline ``job`` belongs to (itself for a first job), or None."""
    if job.pipeline_stage is not None:
        return job
    root_id = (job.pipeline or {}).get("root")
    return s.get(Job, int(root_id)) if root_id is not None else None


def pipeline_view(s: Session, job: Job) -> dict[str, Any] | None:
    """The pipeline a job belongs to, as both of its jobs show it (None: no pipeline's)."""
    root = root_of(s, job)
    if root is None or root.pipeline_stage is None:
        return None
    state = dict(root.pipeline or {})
    return {"kind": state.get("kind"), "stage": root.pipeline_stage, "root": root.id,
            "pass": 1 if job.id == root.id else 2, "jobs": list(state.get("jobs") or [root.id]),
            "export": state.get("export"), "ratios": list(state.get("ratios") or []),
            "total_ratio": state.get("total_ratio"), "budget": state.get("budget"),
            "budgets": list(state.get("budgets") or []), "final": state.get("final"), "reason": state.get("reason")}


class PipelineMixin:
    """The pipeline part of :class:`~bocompress.service.db.sql_store.OrmStore` (``factory``, ``dialect``)."""

    def advance_pipelines(self, limit: int = 100) -> int:
        """Advance every pipeline with a finished stage by one step: how many moved."""
        factory = self.factory  # type: ignore[attr-defined]
        with read_session(factory) as s:
            ids = list(s.execute(select(Job.id).where(Job.pipeline_stage.in_(ACTIVE_STAGES))
                                 .order_by(Job.id).limit(limit)).scalars())
            ready = [i for i in ids if advance(s, i, dry=True)]
        moved = 0
        for job_id in ready:
            try:
                moved += int(run_tx(factory, lambda s, j=job_id: advance(s, j)))
            except TransitionError as exc:
                if exc.code != "pipeline_raced":
                    raise
        return moved


__all__ = ["ACTIVE_STAGES", "FINAL_STAGES", "PipelineMixin", "advance", "as_requested", "cancel_pipeline",
           "first_pass_budget", "pipeline_view", "root_of", "start_pipeline"]
