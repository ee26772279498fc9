"""Rows as the contract shows them (hand-built: a 10,000-trial history must encode fast).

Storage answers in these wire dicts (as Optuna's storages answer in ``FrozenTrial``), so the
routers only pass them on. PostgreSQL can build a trial's JSON itself (:func:`trial_json_sql`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Text, bindparam, case, cast, func, literal, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from bocompress.spec import JobSpec
from bocompress.service.db.models import Job, Trial


def iso(dt: datetime | None) -> str | None:
    """UTC as pydantic writes it (``...Z``), so hand-built and model-built answers agree."""
    if dt is None:
        return None
    s = dt.isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


def trial_out(t: Any) -> dict[str, Any]:
    """A Trial (or a row of its columns) as the contract shows it."""
    return {
        "id": t.id, "job_id": t.job_id, "seq": t.seq, "number": t.number, "state": t.state,
        "params": t.params, "values": t.values or {}, "sem": t.sem or {}, "attempt": t.attempt,
        "worker": t.worker, "created_at": iso(t.created_at), "started_at": iso(t.started_at),
        "finished_at": iso(t.finished_at), "error": t.error, "proposal": t.proposal,
    }


def _iso_sql(col: Any) -> ColumnElement[Any]:
    """:func:`iso` in PostgreSQL: ``...Z``, with microseconds unless they are zero (as ``isoformat``)."""
    utc = func.timezone("UTC", col)
    return case((func.date_trunc("second", col) == col, func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
                else_=func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))


def trial_json_sql(t: Any) -> ColumnElement[str]:
    """:func:`trial_out` computed by PostgreSQL, as JSON text, for the columns ``t`` of the trials table.

    A poll of a busy job carries hundreds of trials; building their JSON in the database spares
    decoding the JSON columns into dicts, converting timestamps and encoding it all again. The
    JSON columns (``json``, kept verbatim) are spliced in as stored.
    """
    def obj(col: Any) -> ColumnElement[Any]:  # ``t.values or {}``
        return case((cast(col, Text) == "null", literal("{}").cast(col.type)), else_=col)

    return cast(func.json_build_object(
        "id", t.id, "job_id", t.job_id, "seq", t.seq, "number", t.number, "state", t.state, "params", t.params,
        "values", obj(t["values"]), "sem", obj(t.sem), "attempt", t.attempt, "worker", t.worker,
        "created_at", _iso_sql(t.created_at), "started_at", _iso_sql(t.started_at),
        "finished_at", _iso_sql(t.finished_at), "error", t.error, "proposal", t.proposal,
    ), Text)


def trial_page_sql() -> Any:
    """The poll's page on PostgreSQL: ``(seq, trial JSON)`` of a job's evaluations changed after
    ``since``, oldest change first, at most ``n`` (bind parameters ``job``, ``since``, ``n``)."""
    t = Trial.__table__.c
    return (select(t.seq, trial_json_sql(t))
            .where(t.job_id == bindparam("job"), t.kind == "evaluate", t.seq > bindparam("since"))
            .order_by(t.seq).limit(bindparam("n")))


#: A best trial whose relative distillation error is at least this has lost the model's function
#: (L = 1 is what outputs of zero, or of the wrong scale, score).
COLLAPSE_L = 0.9
#: Held-out accuracy within this many points of chance (``model_info.chance_accuracy``) is collapsed.
CHANCE_MARGIN = 0.05


def job_warnings(kind: str, spec: dict[str, Any], profile: dict[str, Any] | None,
                 best: dict[str, Any] | None) -> tuple[list[str], bool]:
    """What a user must know about a compression job's best trial: ``(warnings, collapsed)``.

    ``collapsed`` when the best trial's L is at least :data:`COLLAPSE_L`, or its held-out accuracy
    is within :data:`CHANCE_MARGIN` of chance; a warning too when a ``constrained`` job's best
    does not fit the budget.
    """
    if kind != "compression" or not best:
        return [], False
    values = best.get("values") or {}
    out: list[str] = []
    collapsed = False
    view = JobSpec.of(spec)
    L = values.get("distill_l2")
    if L is not None and float(L) >= COLLAPSE_L:
        collapsed = True
        out.append(f"collapsed: the best trial (#{best.get('number')}) has distill_l2 = {float(L):.3g} >= "
                   f"{COLLAPSE_L}: its outputs no longer resemble the original's")
    info = (profile or {}).get("model_info") or {}
    acc, chance = values.get("accuracy"), info.get("chance_accuracy")
    if acc is not None and chance is not None and float(acc) <= float(chance) + CHANCE_MARGIN:
        collapsed = True
        out.append(f"collapsed: the best trial (#{best.get('number')}) has held-out accuracy {float(acc):.3f}, "
                   f"within {CHANCE_MARGIN:.2f} of chance ({float(chance):.3f})")
    if collapsed:
        if view.objective_kind == "scalarized":
            out.append(f"with kappa = {view.kappa} a destroyed model can score better than an "
                       "uncompressed one: raise kappa, or use a 'constrained' budget (docs/objectives.md)")
        elif view.constrained:
            out.append("no trial within the budget kept the model's function: try a larger budget, fewer "
                       "layers, or another method (docs/objectives.md)")
    if view.constrained and values.get("feasible") == 0.0:
        out.append(f"the best trial's R = {float(values.get('ratio', float('nan'))):.4f} does not fit the "
                   f"budget R <= {view.budget}")
    return out, collapsed


def _job_view(static: Any, state: str, reason: str | None, updated_at: datetime, seq: int, n_created: int,
              counts: dict[str, int], best: dict[str, Any] | None) -> dict[str, Any]:
    """A job as the contract shows it, from its unchanging part (a Job or a cached JobInfo) and its state."""
    profile = static.profile or {}
    warnings, collapsed = job_warnings(static.kind, static.spec or {}, profile, best)
    return {
        "warnings": warnings, "collapsed": collapsed,
        "id": static.id, "name": static.name, "state": state, "owner": static.owner, "kind": static.kind,
        "counts": counts, "best": best, "created_at": iso(static.created_at), "updated_at": iso(updated_at),
        "reason": reason, "seq": seq, "spec": static.spec, "layers": profile.get("layers"),
        "search_space": static.search_space, "totals": profile.get("totals"), "n_created": n_created,
    }


def job_out(s: Session | None, job: Job, with_best: bool = True, light: bool = False) -> dict[str, Any]:
    """A job as the contract shows it; ``light`` skips counts and best (the lease path; no session needed)."""
    from bocompress.service.db.queries import best_trial, count_states

    assert light or s is not None, "a full job view reads counts and best: it needs a session"
    best = best_trial(s, job) if with_best and not light and s is not None else None
    counts = {} if light or s is None else count_states(s, job.id)
    out = _job_view(job, job.state, job.reason, job.updated_at, job.seq, job.n_created, counts,
                    trial_out(best) if best else None)
    if not light and s is not None:
        from bocompress.service.db.strategies import job_progress

        out["progress"] = job_progress(s, job)
        if job.pipeline is not None:
            from bocompress.service.db.pipeline import pipeline_view

            out["pipeline"] = pipeline_view(s, job)
    return out


def job_light(info: Any, dyn: Any) -> dict[str, Any]:
    """``job_out(light=True)`` from the hot path's cached :class:`~bocompress.service.db.hot.JobInfo` and the
    columns its ``seq`` bump returned."""
    return _job_view(info, dyn.job_state, dyn.job_reason, dyn.job_updated_at, dyn.job_seq, dyn.job_n_created, {},
                     None)
