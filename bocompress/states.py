"""The states of a trial and of a job: one enum each, used by the service, the schemas and SQL.

The members are ``str`` (``TrialState.QUEUED == "queued"``), so they compare, serialize and bind
to SQL as the strings the contract shows. ``bocompress.schemas`` derives its ``Literal`` types
from these enums, and the database refuses any other value (a ``CHECK`` constraint, Alembic
revision ``0002``). Only the standard library is imported.
"""

from __future__ import annotations

from enum import StrEnum


class TrialState(StrEnum):
    """A trial (or a profiling or export task): ``queued`` → ``running`` → one of the terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"


class JobState(StrEnum):
    """A job: ``profiling`` (compression) → ``running`` → one of the terminal states."""

    PROFILING = "profiling"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


#: Trials still owed a result: queued or leased.
OPEN_TRIAL_STATES: tuple[TrialState, ...] = (TrialState.QUEUED, TrialState.RUNNING)
#: Trials that will never change again.
TERMINAL_TRIAL_STATES: tuple[TrialState, ...] = (TrialState.COMPLETED, TrialState.FAILED, TrialState.CANCELLED,
                                                 TrialState.ABANDONED)
#: Trials that ended without a result.
LOST_TRIAL_STATES: tuple[TrialState, ...] = (TrialState.FAILED, TrialState.ABANDONED)
#: Jobs that still hand out work.
ACTIVE_JOB_STATES: tuple[JobState, ...] = (JobState.PROFILING, JobState.RUNNING)
#: Jobs that are over.
FINISHED_JOB_STATES: tuple[JobState, ...] = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def sql_in(states: tuple[StrEnum, ...] | list[StrEnum]) -> str:
    """``('a', 'b')``: states as an SQL list of literals, for statements written as text."""
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


def check_sql(column: str, enum: type[StrEnum]) -> str:
    """The ``CHECK`` condition that keeps ``column`` to the values of ``enum``."""
    return f"{column} IN {sql_in(list(enum))}"


__all__ = ["ACTIVE_JOB_STATES", "FINISHED_JOB_STATES", "JobState", "LOST_TRIAL_STATES", "OPEN_TRIAL_STATES",
           "TERMINAL_TRIAL_STATES", "TrialState", "check_sql", "sql_in"]
