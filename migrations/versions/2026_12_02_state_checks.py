"""states: CHECK constraints on jobs.state and trials.state (the values of bocompress.states)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 20:45:00

SQLite cannot add a constraint to a table: batch mode rebuilds ``jobs`` and ``trials`` (copy,
drop, rename; ``migrations/env.py`` turns foreign keys off for it), and the partial indexes of
``trials`` are made again with their ``WHERE``. PostgreSQL adds the constraints in place.
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# The states as of this revision (written out: a migration must not change when the code does).
JOB_STATES = ("profiling", "running", "completed", "cancelled", "failed")
TRIAL_STATES = ("queued", "running", "completed", "failed", "cancelled", "abandoned")


def _in(states: tuple[str, ...]) -> str:
    return "state IN (" + ", ".join(f"'{s}'" for s in states) + ")"


def _partial_indexes() -> None:
    for name, col, state in (("ix_trials_queued", "id", "queued"), ("ix_trials_running_lease", "lease_expires_at", "running")):
        op.drop_index(name, table_name="trials")
        op.create_index(name, "trials", [col], unique=False, postgresql_where=sa.text(f"state = '{state}'"),
                        sqlite_where=sa.text(f"state = '{state}'"))


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.create_check_constraint("ck_jobs_state", _in(JOB_STATES))
    with op.batch_alter_table("trials") as batch:
        batch.create_check_constraint("ck_trials_state", _in(TRIAL_STATES))
    if op.get_bind().dialect.name == "sqlite":
        _partial_indexes()


def downgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.drop_constraint("ck_trials_state", type_="check")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_state", type_="check")
    if op.get_bind().dialect.name == "sqlite":
        _partial_indexes()
