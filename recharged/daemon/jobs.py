"""The daemon's scheduled work: each job is recorded in `job_runs` (so any instance, `recharged status` and
/healthz see the last and next cycle), counted in metrics and logged as one canonical line. The work itself
lives in the services (`recharge.py`, ...); this module only runs it and keeps the record.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from recharged.clock import Clock
from recharged.daemon.metrics import Metrics
from recharged.states import JobStatus
from recharged.store.engine import Database
from recharged.store.runs import finish_job_run, running_job_runs, start_job_run

log = structlog.get_logger("recharged.jobs")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_interrupted_runs(db: Database, clock: Clock) -> int:
    """Job runs this host started in a process that is gone (kill -9, power loss) are marked interrupted."""
    host = socket.gethostname()
    closed = 0
    with db.transaction() as session:
        for run in running_job_runs(session):
            name, _, pid = run.instance.rpartition(":")
            if name == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                finish_job_run(
                    session, run.id, JobStatus.INTERRUPTED, clock.now(), run.summary, "the process ended mid-run"
                )
                closed += 1
    return closed


class JobRecorder:
    """Runs a job body, records its run, counts it, and never lets an error escape into the scheduler
    unlogged."""

    def __init__(self, db: Database, clock: Clock, metrics: Metrics, instance: str) -> None:
        self._db, self._clock, self._metrics, self._instance = db, clock, metrics, instance

    def run(
        self,
        job: str,
        body: Callable[[], Mapping[str, Any]],
        *,
        record: bool = True,
        stopped: Callable[[Mapping[str, Any]], bool] = lambda _summary: False,
    ) -> Mapping[str, Any]:
        """Run `body`; its summary is recorded with status succeeded, or stopped when `stopped(summary)` says
        the run was cut short by a shutdown (the next start then runs it again at once)."""
        started = time.perf_counter()
        run_id = None
        if record:
            with self._db.transaction() as session:
                run_id = start_job_run(session, job, self._instance, self._clock.now())
        try:
            summary = body()
        except Exception as exc:
            self._metrics.job_runs.labels(job, JobStatus.FAILED).inc()
            log.exception("job.failed", job=job, error=str(exc), seconds=round(time.perf_counter() - started, 3))
            if run_id is not None:
                try:
                    with self._db.transaction() as session:
                        finish_job_run(session, run_id, JobStatus.FAILED, self._clock.now(), None, str(exc)[:500])
                except Exception:  # the database itself may be what failed
                    log.exception("job.record_failed", job=job)
            raise
        seconds = time.perf_counter() - started
        if run_id is not None:
            status = JobStatus.STOPPED if stopped(summary) else JobStatus.SUCCEEDED
            with self._db.transaction() as session:
                finish_job_run(session, run_id, status, self._clock.now(), summary, None)
        self._metrics.job_runs.labels(job, JobStatus.SUCCEEDED).inc()
        # Recorded jobs (the cycle) always log their canonical line; the frequent ones only at debug level.
        (log.info if record else log.debug)(f"{job}.finished", job=job, seconds=round(seconds, 3), **summary)
        return summary
