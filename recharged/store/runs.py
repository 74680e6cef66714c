"""Job runs (which instance ran which job, and how it ended) and processor events handled once."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recharged.store.models import (
    JobRun,
    WebhookEvent,
)

# --- the daemon: job runs and webhook events --------------------------------------------------------------


def start_job_run(session: Session, job: str, instance: str, at: datetime) -> int:
    run = JobRun(job=job, instance=instance, status="running", started_at=at)
    session.add(run)
    session.flush()
    return run.id


def finish_job_run(
    session: Session, run_id: int, status: str, at: datetime, summary: Mapping[str, Any] | None, error: str | None
) -> None:
    session.execute(
        update(JobRun)
        .where(JobRun.id == run_id)
        .values(status=status, finished_at=at, summary=dict(summary) if summary else None, error=error)
    )


def last_job_run(session: Session, job: str, status: str | None = None) -> JobRun | None:
    query = select(JobRun).where(JobRun.job == job)
    if status is not None:
        query = query.where(JobRun.status == status)
    return session.scalars(query.order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(1)).first()


def running_job_runs(session: Session) -> list[JobRun]:
    return list(session.scalars(select(JobRun).where(JobRun.status == "running")))


def record_webhook_event(session: Session, values: Mapping[str, Any]) -> bool:
    """Remember a handled processor event; False when its id was handled before."""
    try:
        with session.begin_nested():
            session.execute(insert(WebhookEvent).values(**values))
    except IntegrityError:
        return False
    return True


def webhook_event_seen(session: Session, event_id: str) -> bool:
    return session.get(WebhookEvent, event_id) is not None


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:120]
