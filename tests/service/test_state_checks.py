"""States are one enum, mirrored in SQL: revision 0002 adds CHECK constraints, upgrading databases
that already hold jobs and trials, and the database itself refuses a state the enum lacks."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from bocompress import schemas
from bocompress.states import JobState, TrialState
from bocompress.service.db.migrate import current_revision, head_revision, upgrade
from bocompress.service.db.session import make_engine

NOW = "2026-12-01 10:00:00"


def _rows_at_0001(url: str) -> None:
    """A job with a profiling task, a completed and a queued evaluation, and events, written at 0001."""
    engine = make_engine(url)
    try:
        with engine.begin() as c:
            spec = json.dumps({"name": "old", "budget": {"max_trials": 4}})
            c.execute(text("INSERT INTO jobs (id, name, owner, kind, state, spec, seq, n_created, created_at, "
                           "updated_at) VALUES (1, 'old', 'me', 'generic', 'running', :spec, 3, 2, :now, :now)"),
                      {"spec": spec, "now": NOW})
            for tid, number, state, values in ((1, 0, "completed", '{"y": 0.5}'), (2, 1, "queued", "{}")):
                c.execute(text("INSERT INTO trials (id, job_id, kind, number, seq, state, params, \"values\", sem, "
                               "attempt, created_at) VALUES (:id, 1, 'evaluate', :n, :n, :state, '{\"x\": 0.1}', "
                               ":values, '{}', 1, :now)"),
                          {"id": tid, "n": number, "state": state, "values": values, "now": NOW})
            c.execute(text("INSERT INTO events (job_id, trial_id, kind, from_state, to_state, at) "
                           "VALUES (1, 1, 'completed', 'running', 'completed', :now)"), {"now": NOW})
    finally:
        engine.dispose()


def test_upgrade_keeps_rows_and_adds_the_checks(database_url: str, backend: str) -> None:
    upgrade(database_url, "0001")
    _rows_at_0001(database_url)
    assert upgrade(database_url) == head_revision()
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as c:
            trials = c.execute(text("SELECT id, state, \"values\" FROM trials ORDER BY id")).all()
            assert [(t.id, t.state) for t in trials] == [(1, "completed"), (2, "queued")]
            v = trials[0][2]
            assert (json.loads(v) if isinstance(v, str) else v) == {"y": 0.5}
            assert c.execute(text("SELECT state, seq, n_created FROM jobs")).one() == ("running", 3, 2)
            assert c.execute(text("SELECT count(*) FROM events")).scalar_one() == 1
        insp = inspect(engine)
        assert {ck["name"] for ck in insp.get_check_constraints("trials")} >= {"ck_trials_state"}
        assert {ck["name"] for ck in insp.get_check_constraints("jobs")} >= {"ck_jobs_state"}
        names = {ix["name"] for ix in insp.get_indexes("trials")}
        assert {"ix_trials_queued", "ix_trials_running_lease", "ix_trials_job_id_seq"} <= names
        if backend == "sqlite":  # the rebuilt table's partial indexes keep their WHERE
            with engine.connect() as c:
                sql = c.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_trials_queued'")).scalar_one()
            assert "WHERE state = 'queued'" in sql
    finally:
        engine.dispose()


@pytest.mark.parametrize("table", ["trials", "jobs"])
def test_the_database_refuses_an_unknown_state(database_url: str, table: str) -> None:
    upgrade(database_url)
    _rows_at_0001(database_url)
    engine = make_engine(database_url)
    try:
        with pytest.raises(IntegrityError, match="ck_" + table + "_state|CHECK constraint failed"):
            with engine.begin() as c:
                c.execute(text(f"UPDATE {table} SET state = 'paused' WHERE id = 1"))
        with engine.begin() as c:  # every state of the enum is accepted
            states = TrialState if table == "trials" else JobState
            for s in states:
                c.execute(text(f"UPDATE {table} SET state = :s WHERE id = 1"), {"s": s.value})
    finally:
        engine.dispose()


def test_schemas_literals_are_the_enums() -> None:
    assert schemas.TRIAL_STATES == tuple(TrialState)
    assert schemas.JOB_STATES == tuple(JobState)
    assert set(schemas.TrialState.__args__) == {s.value for s in TrialState}
    assert set(schemas.JobState.__args__) == {s.value for s in JobState}
    assert schemas.TERMINAL_TRIAL_STATES == ("completed", "failed", "cancelled", "abandoned")
