"""APScheduler 3 wiring only: which job runs when. The jobs' work lives in the services.

One in-memory scheduler per daemon instance, in UTC (job stores are never shared between instances; the
database decides who charges what). Every job coalesces missed runs into one and never runs twice at once;
missed and overlapping runs are logged and counted, job errors are handled by the job runner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from recharged.config import DaemonSettings

log = structlog.get_logger("recharged.scheduler")
EVENTS_INTERVAL_SECONDS = 30  # processor events are also handled right after a webhook stores them


@dataclass(frozen=True, slots=True)
class JobSpec:
    trigger: BaseTrigger
    misfire_grace_seconds: int
    first_run: datetime | None = None  # None: one interval after start


def job_specs(
    settings: DaemonSettings,
    now: datetime,
    last_cycle: datetime | None,
    *,
    mail_interval_seconds: int = 60,
    webhook_interval_seconds: int = 5,
    expire_interval_seconds: int = 30,
) -> dict[str, JobSpec]:
    """When each job runs. The first cycle runs one interval after the last successful one (whichever
    instance ran it), or at once when that is already past, so restarts never skip a cycle."""
    interval = settings.cycle_interval
    first_cycle = now if last_cycle is None or last_cycle + interval <= now else last_cycle + interval
    return {
        "cycle": JobSpec(
            IntervalTrigger(
                seconds=interval.total_seconds(), jitter=settings.cycle_jitter_seconds or None, timezone=UTC
            ),
            settings.misfire_grace_seconds,
            first_cycle,
        ),
        "completer": JobSpec(
            IntervalTrigger(seconds=settings.completer_interval_seconds, timezone=UTC),
            settings.completer_interval_seconds,
            now,
        ),
        # Events a webhook stored are handled at once; this catches those whose retry time came, and any stored
        # while no drain ran (another instance's webhook, a crash).
        "events": JobSpec(
            IntervalTrigger(seconds=EVENTS_INTERVAL_SECONDS, timezone=UTC),
            EVENTS_INTERVAL_SECONDS,
            now + timedelta(seconds=1),
        ),
        "maintenance": JobSpec(IntervalTrigger(hours=24, timezone=UTC), 3600, now + timedelta(minutes=1)),
        "mail": JobSpec(
            IntervalTrigger(seconds=mail_interval_seconds, timezone=UTC),
            mail_interval_seconds,
            now + timedelta(seconds=2),
        ),
        # Events to the CRM's webhooks: routes new ones and starts a worker per endpoint, without waiting for them.
        "webhooks": JobSpec(
            IntervalTrigger(seconds=webhook_interval_seconds, timezone=UTC),
            webhook_interval_seconds,
            now + timedelta(seconds=3),
        ),
        # Reservations of calls whose usage never came are released once their time (plus the grace) is up.
        "authorizations": JobSpec(
            IntervalTrigger(seconds=expire_interval_seconds, timezone=UTC),
            expire_interval_seconds,
            now + timedelta(seconds=4),
        ),
        # The first of each month at 06:00 UTC, so late usage imports of the last day land first; a daemon that
        # was down then issues them when it starts later that day (statements are idempotent per account and month).
        "statements": JobSpec(CronTrigger(day=1, hour=6, minute=0, timezone=UTC), 18 * 3600),
    }


class Scheduler:
    """The daemon's scheduler: `jobs` maps a job name to the function that runs it."""

    def __init__(self, on_missed: Callable[[str], None]) -> None:
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=8)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        self._on_missed = on_missed
        self._scheduler.add_listener(self._missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)

    def _missed(self, event: JobEvent) -> None:
        # A missed start is a JobExecutionEvent (`scheduled_run_time`); a run refused because the last one is still
        # going is a JobSubmissionEvent (`scheduled_run_times`, a list).
        if event.code == EVENT_JOB_MAX_INSTANCES:
            why, times = "still running from the last time", getattr(event, "scheduled_run_times", None) or []
        else:
            why, times = "missed its start", [getattr(event, "scheduled_run_time", None)]
        scheduled = ", ".join(str(t) for t in times if t is not None) or "unknown"
        log.warning("job.missed", job=event.job_id, why=why, scheduled=scheduled)
        self._on_missed(event.job_id)

    def start(self, jobs: Mapping[str, Callable[[], object]], specs: Mapping[str, JobSpec]) -> None:
        for name, function in jobs.items():
            spec = specs[name]
            options = {"next_run_time": spec.first_run} if spec.first_run is not None else {}
            self._scheduler.add_job(
                function, spec.trigger, id=name, name=name, misfire_grace_time=spec.misfire_grace_seconds, **options
            )
        self._scheduler.start()

    def reschedule(self, specs: Mapping[str, JobSpec], names: tuple[str, ...]) -> None:
        """New triggers for the named jobs (after a reload changed their settings)."""
        for name in names:
            if self._scheduler.get_job(name) is not None:
                spec = specs[name]
                self._scheduler.modify_job(name, misfire_grace_time=spec.misfire_grace_seconds)
                self._scheduler.reschedule_job(name, trigger=spec.trigger)

    def next_run(self, name: str) -> datetime | None:
        job = self._scheduler.get_job(name)
        return None if job is None else job.next_run_time

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running) and self._scheduler.state == 1  # STATE_RUNNING, not paused

    def pause(self) -> None:
        if self._scheduler.running:
            self._scheduler.pause()

    def shutdown(self) -> None:
        """Stop without waiting: the daemon itself waits for work in flight, with a time limit."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
