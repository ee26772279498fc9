"""Tables (SQLAlchemy 2, typed). Alembic migrations are the only thing that creates them."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from bocompress.states import JobState, TrialState, check_sql

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store UTC-aware datetimes only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        CheckConstraint(check_sql("state", JobState), name="ck_jobs_state"),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_owner_id", "owner", "id"),
        Index("ix_jobs_pipeline_stage", "pipeline_stage"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # compression | generic
    state: Mapped[str] = mapped_column(String(16))  # bocompress.states, kept so by a CHECK
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    search_space: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    profile: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(Text)
    seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    n_created: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    optimizer_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    generator_owner: Mapped[str | None] = mapped_column(String(200))
    generator_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: A recipe's pipeline (:mod:`bocompress.service.db.pipeline`): on its first job the pipeline's
    #: state (jobs, export, ratios, reason), on a later job ``{"root": <first job's id>}``.
    pipeline: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The pipeline's stage, on its first job only (first | finetune | second | done | failed | cancelled).
    pipeline_stage: Mapped[str | None] = mapped_column(String(16))


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("job_id", "kind", "number"),
        CheckConstraint(check_sql("state", TrialState), name="ck_trials_state"),
        Index("ix_trials_job_id_seq", "job_id", "seq"),
        Index("ix_trials_job_id_state", "job_id", "state"),
        Index(
            "ix_trials_queued",
            "id",
            postgresql_where=text(f"state = '{TrialState.QUEUED.value}'"),
            sqlite_where=text(f"state = '{TrialState.QUEUED.value}'"),
        ),
        Index(
            "ix_trials_running_lease",
            "lease_expires_at",
            postgresql_where=text(f"state = '{TrialState.RUNNING.value}'"),
            sqlite_where=text(f"state = '{TrialState.RUNNING.value}'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # profile | evaluate | export
    number: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16))  # bocompress.states, kept so by a CHECK
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sem: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    worker: Mapped[str | None] = mapped_column(String(200))
    #: What made the point: ``engine`` (the scheduler's BO engine), ``cheap`` (made on the request
    #: path when the buffer was empty), None for tasks and for rows older than the column.
    proposal: Mapped[str | None] = mapped_column(String(16))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result_hash: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    trial_id: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Blob(Base):
    """Uploaded weights, calibration datasets and exported artifacts (bytes live in the database)."""

    __tablename__ = "blobs"
    __table_args__ = (Index("ix_blobs_owner_kind", "owner", "kind"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # model | dataset | artifact
    owner: Mapped[str] = mapped_column(String(200))
    arch: Mapped[str | None] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    tensors: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def new_blob(kind: str, owner: str, data: bytes, tensors: dict, arch: str | None = None,
             meta: dict | None = None) -> Blob:
    """A stored upload or artifact: a fresh id with its kind's prefix, size and sha256 of ``data``."""
    prefix = {"model": "mdl", "dataset": "ds", "artifact": "art"}[kind]
    return Blob(id=f"{prefix}_{secrets.token_hex(12)}", kind=kind, owner=owner, arch=arch, size=len(data),
                sha256=hashlib.sha256(data).hexdigest(), tensors=tensors, meta=meta, data=data, created_at=utcnow())


# Float is imported for migrations that may need it.
__all__ = ["Base", "Token", "Job", "Trial", "Event", "Blob", "UTCDateTime", "new_blob", "utcnow", "Float"]
