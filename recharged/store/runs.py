"""Job runs (which instance ran which job, and how it ended) and the inbox of processor events."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from recharged.states import EventStatus, JobStatus
from recharged.store.engine import insert_once
from recharged.store.models import (
    JobRun,
    ProcessorEvent,
)

# --- the daemon: job runs -----------------------------------------------------------------------------------


def start_job_run(session: Session, job: str, instance: str, at: datetime) -> int:
    run = JobRun(job=job, instance=instance, status=JobStatus.RUNNING, started_at=at)
    session.add(run)
    session.flush()
    return run.id


def finish_job_run(
    session: Session, run_id: int, status: JobStatus, at: datetime, summary: Mapping[str, Any] | None, error: str | None
) -> None:
    session.execute(
        update(JobRun)
        .where(JobRun.id == run_id)
        .values(status=status, finished_at=at, summary=dict(summary) if summary else None, error=error)
    )


def last_job_run(session: Session, job: str, status: JobStatus | None = None) -> JobRun | None:
    query = select(JobRun).where(JobRun.job == job)
    if status is not None:
        query = query.where(JobRun.status == status)
    return session.scalars(query.order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(1)).first()


def running_job_runs(session: Session) -> list[JobRun]:
    return list(session.scalars(select(JobRun).where(JobRun.status == JobStatus.RUNNING)))


# --- processor events: the inbox ----------------------------------------------------------------------------


def insert_event(session: Session, values: Mapping[str, Any]) -> bool:
    """Store a processor event once; False when its id is already in the inbox (a redelivery)."""
    return insert_once(session, ProcessorEvent, values, ["id"])


def due_event_ids(session: Session, now: datetime, limit: int) -> list[str]:
    """Pending events whose time has come and that no worker holds, oldest first."""
    query = (
        select(ProcessorEvent.id)
        .where(
            ProcessorEvent.status == EventStatus.PENDING,
            ProcessorEvent.next_attempt_at <= now,
            (ProcessorEvent.lease_until.is_(None)) | (ProcessorEvent.lease_until < now),
        )
        .order_by(ProcessorEvent.received_at, ProcessorEvent.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def claim_event(session: Session, event_id: str, now: datetime, until: datetime) -> ProcessorEvent | None:
    """Hold a pending event while it is handled (one attempt more); None when it is handled or another worker
    holds it. Its retry time is not checked here: `due_event_ids` does, and an admin may ask for one sooner."""
    claim = update(ProcessorEvent).where(
        ProcessorEvent.id == event_id,
        ProcessorEvent.status == EventStatus.PENDING,
        (ProcessorEvent.lease_until.is_(None)) | (ProcessorEvent.lease_until < now),
    )
    result = session.execute(
        claim.values(lease_until=until, attempts=ProcessorEvent.attempts + 1).execution_options(
            synchronize_session=False
        )
    )
    if not cast(Any, result).rowcount:
        return None
    return session.get(ProcessorEvent, event_id, populate_existing=True)


def finish_event(
    session: Session, event_id: str, status: EventStatus, outcome: str, at: datetime, account_id: str | None
) -> None:
    session.execute(
        update(ProcessorEvent)
        .where(ProcessorEvent.id == event_id)
        .values(
            status=status,
            outcome=outcome[:200],
            handled_at=at,
            lease_until=None,
            last_error=None,
            account_id=account_id,
        )
        .execution_options(synchronize_session=False)
    )


def fail_event(session: Session, event_id: str, error: str, retry_at: datetime) -> int:
    """Record a failed attempt: the event stays pending until `retry_at`. Returns its attempts so far."""
    session.execute(
        update(ProcessorEvent)
        .where(ProcessorEvent.id == event_id)
        .values(last_error=error[:500], next_attempt_at=retry_at, lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return int(session.scalar(select(ProcessorEvent.attempts).where(ProcessorEvent.id == event_id)) or 0)


def failing_events(session: Session) -> list[ProcessorEvent]:
    """Pending events whose last attempt failed, oldest first."""
    query = select(ProcessorEvent).where(
        ProcessorEvent.status == EventStatus.PENDING, ProcessorEvent.last_error.is_not(None)
    )
    return list(session.scalars(query.order_by(ProcessorEvent.received_at, ProcessorEvent.id)))


def pending_events_received_before(session: Session, before: datetime) -> tuple[int, datetime | None]:
    """How many events have waited since before `before` without a failure (nobody is draining the inbox), and
    the oldest one's time."""
    count, oldest = session.execute(
        select(func.count(), func.min(ProcessorEvent.received_at)).where(
            ProcessorEvent.status == EventStatus.PENDING,
            ProcessorEvent.last_error.is_(None),
            ProcessorEvent.received_at < before,
        )
    ).one()
    return int(count or 0), oldest


def list_events(
    session: Session, status: EventStatus | None = None, account_id: str | None = None, limit: int = 100
) -> list[ProcessorEvent]:
    """Events newest first, optionally of one status or account."""
    query = select(ProcessorEvent)
    if status is not None:
        query = query.where(ProcessorEvent.status == status)
    if account_id is not None:
        query = query.where(ProcessorEvent.account_id == account_id)
    return list(
        session.scalars(query.order_by(ProcessorEvent.received_at.desc(), ProcessorEvent.id.desc()).limit(limit))
    )


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:120]
