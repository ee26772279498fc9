"""trials.proposal: what made a trial's point (``engine``, ``cheap``, ...), null for older rows

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 12:45:00

A nullable column: SQLite and PostgreSQL both add it in place (no table rebuild), and rows made
before this revision keep NULL (unknown).
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("trials", sa.Column("proposal", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("proposal")
