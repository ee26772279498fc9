"""jobs.pipeline and jobs.pipeline_stage: a recipe's pipeline (two-pass), driven by the scheduler

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 21:00:00

Nullable columns: SQLite and PostgreSQL both add them in place, and jobs made before this
revision are no pipeline's (NULL). ``pipeline_stage`` is set on a pipeline's first job only, so
the scheduler finds the pipelines to advance by it (indexed) and moves each by a guarded
``UPDATE ... WHERE pipeline_stage = <the stage it read>``.
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("pipeline", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("pipeline_stage", sa.String(length=16), nullable=True))
    op.create_index("ix_jobs_pipeline_stage", "jobs", ["pipeline_stage"])


def downgrade() -> None:
    op.drop_index("ix_jobs_pipeline_stage", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pipeline_stage")
        batch.drop_column("pipeline")
