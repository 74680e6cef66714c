"""/healthz in the `application/health+json` format (draft-inadarei-api-health-check): status pass, warn or
fail, and a `checks` object. Each check sits beside what it checks; none calls the payment processor or the
mail server: their last real call's outcome is remembered and shown instead.

/healthz needs no token, so what anyone may read (`public`) is each check's name and status and nothing else:
the details (errors, card and payment ids, the database's address, account ids) are for the holders of an API
token (`recharged status` sends one) and for the log, where each change of a check is written once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import structlog

from recharged.clock import Clock
from recharged.states import AttemptStatus, JobStatus
from recharged.store.engine import Database
from recharged.store.reads import last_settled_attempt
from recharged.store.runs import last_job_run

log = structlog.get_logger("recharged.health")

Status = Literal["pass", "warn", "fail"]
CONTENT_TYPE = "application/health+json"
_ORDER: dict[Status, int] = {"pass": 0, "warn": 1, "fail": 2}
UNREAD = "unknown: the database cannot be read"


@dataclass(frozen=True, slots=True)
class CallOutcome:
    at: datetime
    call: str
    error: str | None


class LastCall:
    """The outcome of the last call to an outside service, recorded by whoever made it."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.last: CallOutcome | None = None
        self.skew: timedelta | None = None  # our wall clock minus the processor's, from its last answer

    def record(self, call: str, error: str | None) -> None:
        with self._lock:
            self.last = CallOutcome(self._clock.now(), call, error)

    def record_skew(self, skew: timedelta) -> None:
        self.skew = skew


CLOCK_SKEW_WARN = timedelta(minutes=1)  # /healthz warns past this much skew against the processor's clock


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def worst(statuses: list[Status]) -> Status:
    return max(statuses, key=_ORDER.__getitem__, default="pass")


@dataclass
class Health:
    """Everything /healthz reads. `next_cycle` and `scheduler_running` come from the scheduler; `mail` from the
    outbox (None until there is one)."""

    db: Database
    clock: Clock
    started_at: datetime
    cycle_interval: Callable[[], timedelta]
    cycle_grace: Callable[[], timedelta]
    max_clock_skew: Callable[[], timedelta]
    scheduler_running: Callable[[], bool]
    next_cycle: Callable[[], datetime | None]
    processor: LastCall
    mail: Callable[[], Mapping[str, Any] | None] | None = None
    events: Callable[[], Mapping[str, Any]] | None = None  # the inbox of processor events
    disputes: Callable[[], Mapping[str, Any]] | None = None  # accounts paused by a dispute
    webhooks: Callable[[], Mapping[str, Any]] | None = None  # deliveries of events to the CRM
    service_id: str = ""
    version: str = ""
    _logged: dict[str, tuple[tuple[Status, Any], ...]] = field(default_factory=dict, init=False, repr=False)
    _log_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def ping_database(self) -> tuple[Status, float, str | None]:
        started = time.perf_counter()
        try:
            self.db.ping()
        except Exception as exc:
            return "fail", (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"[:300]
        return "pass", (time.perf_counter() - started) * 1000, None

    def report(self) -> dict[str, Any]:
        now = self.clock.now()
        checks: dict[str, list[dict[str, Any]]] = {}

        db_status, elapsed_ms, db_error = self.ping_database()
        checks["database:responseTime"] = [
            {
                "componentType": "datastore",
                "observedValue": round(elapsed_ms, 2),
                "observedUnit": "ms",
                "status": db_status,
                "time": _iso(now),
                **({"output": db_error} if db_error else {}),
            }
        ]

        running = self.scheduler_running()
        checks["scheduler:running"] = [
            {
                "componentType": "component",
                "observedValue": running,
                "status": "pass" if running else "fail",
                "time": _iso(now),
                "output": f"next cycle at {_iso(self.next_cycle())}" if running else "the scheduler is not running",
            }
        ]

        # Age of the last successful cycle, whichever instance ran it; before the first one, the time since start.
        last = None
        if db_status == "pass":
            with self.db.reading() as session:
                run = last_job_run(session, "cycle", JobStatus.SUCCEEDED)
                last = None if run is None else run.finished_at
        since = last or self.started_at
        age = (now - since).total_seconds()
        allowed = self.cycle_interval() + self.cycle_grace()
        age_status: Status = "pass"
        if age > 2 * allowed.total_seconds():
            age_status = "fail"
        elif age > allowed.total_seconds():
            age_status = "warn"
        checks["cycle:age"] = [
            {
                "componentType": "component",
                "observedValue": round(age, 1),
                "observedUnit": "s",
                "status": age_status if db_status == "pass" else "warn",
                "time": _iso(last),
                "output": UNREAD
                if db_status != "pass"
                else ("no successful cycle yet since start" if last is None else "last successful cycle"),
            }
        ]

        call = self.processor.last
        checks["payments:lastCall"] = [
            {
                "componentType": "system",
                "status": "pass" if call is None or call.error is None else "warn",
                "time": _iso(None if call is None else call.at),
                "output": "no call yet"
                if call is None
                else (f"{call.call} ok" if call.error is None else f"{call.call} failed: {call.error}"[:300]),
            }
        ]

        skew = self.processor.skew
        seconds = None if skew is None else skew.total_seconds()
        skew_status: Status = "pass"
        if seconds is not None and abs(seconds) > self.max_clock_skew().total_seconds():
            skew_status = "fail"
        elif seconds is not None and abs(seconds) > CLOCK_SKEW_WARN.total_seconds():
            skew_status = "warn"
        checks["payments:clockSkew"] = [
            {
                "componentType": "system",
                "observedValue": None if seconds is None else round(seconds, 1),
                "observedUnit": "s",
                "status": skew_status,
                "output": "not measured yet"
                if seconds is None
                else (
                    "our clock against the processor's"
                    if skew_status == "pass"
                    else "our clock is off the processor's (charging stops past the configured tolerance)"
                ),
            }
        ]

        if db_status == "pass":
            with self.db.reading() as session:
                latest = last_settled_attempt(session)
                halted = last_job_run(session, "cycle")
            refused = latest is not None and latest.status == AttemptStatus.ERROR
            stopped = halted is not None and bool((halted.summary or {}).get("halted"))
            checks["payments:integration"] = [
                {
                    "componentType": "system",
                    "status": "fail" if refused or stopped else "pass",
                    "time": _iso(None if latest is None else latest.finished_at),
                    # Details (the processor's words) go to the log and `recharged status`, not to this page.
                    "output": "charging stopped by the circuit breaker"
                    if stopped
                    else ("the processor refused our last charge request" if refused else "no integration error"),
                }
            ]

        if self.events is not None:  # events failing or waiting: money after the charge is not followed
            inbox: Mapping[str, Any] = (
                self.events()
                if db_status == "pass"
                else {"componentType": "component", "status": "warn", "output": UNREAD}
            )
            checks["events:inbox"] = [{**inbox, "time": _iso(now)}]
        if self.disputes is not None and db_status == "pass":
            checks["accounts:disputed"] = [{**self.disputes(), "time": _iso(now)}]
        if self.webhooks is not None and db_status == "pass":  # failed deliveries: the CRM missed events
            checks["webhooks:deliveries"] = [{**self.webhooks(), "time": _iso(now)}]

        mail = None
        if self.mail is not None:  # the outbox is in the database: not read while the database fails its ping
            mail = (
                self.mail() if db_status == "pass" else {"componentType": "system", "status": "warn", "output": UNREAD}
            )
        if mail is not None:
            checks["smtp:lastDelivery"] = [dict(mail)]

        self._log_changes(checks)
        statuses: list[Status] = [entry["status"] for entries in checks.values() for entry in entries]
        return {
            "status": worst(statuses),
            "version": "1",
            "releaseId": self.version,
            "serviceId": self.service_id,
            "description": "recharged: prepaid balances and automatic recharges",
            "checks": checks,
        }

    def _log_changes(self, checks: Mapping[str, list[dict[str, Any]]]) -> None:
        """Log a check when its status changes, or what it says while it is not passing: the details /healthz shows
        only to token holders reach the log once per change, not once per probe."""
        with self._log_lock:
            for name, entries in checks.items():
                seen = tuple((entry["status"], entry.get("output")) for entry in entries)
                before = self._logged.get(name, tuple(("pass", None) for _ in entries))
                self._logged[name] = seen
                for index, (status, output) in enumerate(seen):
                    was = before[index][0] if index < len(before) else "pass"
                    if status != was or (status != "pass" and seen != before):
                        (log.info if status == "pass" else log.warning)(
                            "health.check", check=name, status=status, was=was, output=output
                        )


def public(report: Mapping[str, Any]) -> dict[str, Any]:
    """What /healthz shows without a token: the status, and each check's name and status. Nothing else: a check's
    output, values and times may name a card, an error, an account or the database's host and port."""
    return {
        "status": report["status"],
        "version": report["version"],
        "description": report["description"],
        "checks": {
            name: [{"status": entry["status"]} for entry in entries] for name, entries in report["checks"].items()
        },
    }
