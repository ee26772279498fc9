"""Rows to wire dicts (hand-built: a 10,000-trial history must encode fast)."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service.api.errors import APIError
from service.db.models import Job
from service.db.trials import best_trial, count_states


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
        "finished_at": iso(t.finished_at), "error": t.error,
    }


def job_out(s: Session | None, job: Job, with_best: bool = True, light: bool = False) -> dict[str, Any]:
    """A job as the contract shows it; ``light`` skips counts and best (the lease path; no session needed)."""
    assert light or s is not None, "a full job view reads counts and best: it needs a session"
    best = best_trial(s, job) if with_best and not light and s is not None else None
    profile = job.profile or {}
    return {
        "id": job.id, "name": job.name, "state": job.state, "owner": job.owner, "kind": job.kind,
        "counts": {} if light or s is None else count_states(s, job.id), "best": trial_out(best) if best else None,
        "created_at": iso(job.created_at), "updated_at": iso(job.updated_at), "reason": job.reason,
        "seq": job.seq, "spec": job.spec, "layers": profile.get("layers"), "search_space": job.search_space,
        "totals": profile.get("totals"), "n_created": job.n_created,
    }


def job_light(info: Any, dyn: Any) -> dict[str, Any]:
    """The lease answer's job (``job_out(light=True)``) from the hot path's cached
    :class:`~service.db.hot.JobInfo` and the columns its ``seq`` bump returned."""
    profile = info.profile or {}
    return {
        "id": info.id, "name": info.name, "state": dyn.job_state, "owner": info.owner, "kind": info.kind,
        "counts": {}, "best": None, "created_at": iso(info.created_at), "updated_at": iso(dyn.job_updated_at),
        "reason": dyn.job_reason, "seq": dyn.job_seq, "spec": info.spec, "layers": profile.get("layers"),
        "search_space": info.search_space, "totals": profile.get("totals"), "n_created": dyn.job_n_created,
    }


def encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{value}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, value = raw.split(":", 1)
        if tag != "v1":
            raise ValueError
        return int(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(422, "cursor: not a cursor this service issued", "invalid") from exc
