"""`recharged status`: the daemon's last and next cycle, what it charged, and what needs a person's attention.

Everything comes from the database (job runs, recharges, accounts, cards, the outbox) except the next cycle and
the daemon's health checks, which only the running daemon knows: its /healthz is asked with a short timeout, with
the API token when this command has one (only then does it show the next cycle and the checks' details). When no
daemon answers, the next cycle is estimated as the last successful one plus the cycle interval, and marked as an
estimate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import requests

from recharged.authorizations import expired_since, held_per_currency, refused_since
from recharged.clock import parse_instant
from recharged.config import Settings
from recharged.credentials import read_secret
from recharged.events import WAITING_TOO_LONG
from recharged.mail.webhook_deliveries import undelivered
from recharged.money import Units, format_ledger
from recharged.payments import card_label
from recharged.states import JobStatus, OutboxStatus, RechargeState
from recharged.store.engine import Database
from recharged.store.models import JobRun
from recharged.store.reads import (
    accounts_needing_attention,
    accounts_not_ok,
    failing_recoveries,
    integration_errors_since,
    open_recharges_claimed_before,
    outbox_backlog,
    recharges_finished_since,
    undelivered_mail,
    unusable_sources,
)
from recharged.store.runs import failing_events, last_job_run, pending_events_received_before
from recharged.tokens import presented_secret
from recharged.words import plural

HEALTH_TIMEOUT_SECONDS = 1.0
MAIL_LATE = timedelta(hours=1)  # a pending email older than this needs a look (the mail server may be down)
_NEXT_CYCLE = re.compile(r"next cycle at (\S+)")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True, slots=True)
class CycleRun:
    """One recorded run of the recharge cycle."""

    started_at: datetime
    finished_at: datetime | None
    instance: str
    status: JobStatus
    summary: dict[str, Any]
    error: str | None

    @classmethod
    def of(cls, run: JobRun) -> CycleRun:
        return cls(run.started_at, run.finished_at, run.instance, run.status, dict(run.summary or {}), run.error)

    def as_json(self) -> dict[str, Any]:
        return {
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "instance": self.instance,
            "status": self.status,
            "summary": self.summary,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One of the daemon's health checks; `output` (its details) only when the daemon showed them to our token."""

    name: str
    status: str  # pass | warn | fail
    output: str | None = None


@dataclass(frozen=True, slots=True)
class DaemonAnswer:
    """What the daemon's /healthz said, or why nothing did."""

    url: str | None  # None: the HTTP server is disabled in the configuration
    answered: bool
    health: str | None = None  # pass | warn | fail
    scheduler_running: bool | None = None
    next_cycle: datetime | None = None
    error: str | None = None
    checks: tuple[HealthCheck, ...] = ()
    detailed: bool = False  # the daemon showed the checks' details (we sent it an API token it accepted)


def api_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The first of the API tokens (RECHARGED_API_TOKENS or the credential api_tokens), when this command has them:
    /healthz shows its checks' details only to a token holder."""
    secret = read_secret("api_tokens", environ)
    return None if secret is None else presented_secret(secret.value)


def ask_daemon(settings: Settings, timeout: float = HEALTH_TIMEOUT_SECONDS) -> DaemonAnswer:
    """Ask the daemon configured in [http] for its health (one GET /healthz, `timeout` seconds at most)."""
    http = settings.http
    if not http.enabled:
        return DaemonAnswer(None, False, error="the daemon's HTTP server is disabled ([http] enabled = false)")
    # A daemon listening on every interface is asked on loopback.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(http.host, http.host)  # noqa: S104
    url = f"http://{f'[{host}]' if ':' in host else host}:{http.port}/healthz"
    token = api_token()
    try:
        with requests.Session() as session:
            session.trust_env = False  # the daemon is asked directly, never through a proxy
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = session.get(url, timeout=timeout, headers=headers)
            body = response.json()
    except requests.Timeout:
        return DaemonAnswer(url, False, error=f"no answer within {timeout:g} s")
    except requests.ConnectionError:
        return DaemonAnswer(url, False, error="could not connect")
    except requests.RequestException as exc:
        return DaemonAnswer(url, False, error=type(exc).__name__)
    except ValueError:
        return DaemonAnswer(url, False, error="the answer was not recharged's health JSON")
    refused = body.get("error") if isinstance(body, dict) else None
    if isinstance(refused, dict):  # our token refused (401), or the daemon has none configured (503)
        return DaemonAnswer(url, False, error=f"the daemon answered {response.status_code}: {refused.get('message')}")
    return read_health(url, body, detailed=token is not None)


def read_health(url: str, body: Any, *, detailed: bool = False) -> DaemonAnswer:
    """The daemon's health report (application/health+json, as recharged.health writes it), read: in full when
    `detailed` (asked with a token), else its public form (each check's status only, no next cycle)."""
    checks = body.get("checks") if isinstance(body, dict) else None
    scheduler = (checks or {}).get("scheduler:running") if isinstance(checks, dict) else None
    if not isinstance(checks, dict) or not isinstance(scheduler, list) or not scheduler:
        return DaemonAnswer(url, False, error="the answer was not recharged's health JSON")
    if not all(isinstance(e, list) and all(isinstance(c, dict) for c in e) for e in checks.values()):
        return DaemonAnswer(url, False, error="the answer was not recharged's health JSON")
    check = scheduler[0]
    running = bool(check.get("observedValue", check.get("status") == "pass"))
    found = _NEXT_CYCLE.search(str(check.get("output") or ""))
    next_cycle = None
    if running and found:
        try:
            next_cycle = parse_instant(found.group(1))
        except ValueError:
            next_cycle = None
    listed = tuple(
        HealthCheck(
            str(name),
            str(entry.get("status")),
            None if entry.get("output") is None else str(entry["output"]),
        )
        for name, entries in checks.items()
        for entry in entries
    )
    return DaemonAnswer(url, True, str(body.get("status")), running, next_cycle, checks=listed, detailed=detailed)


@dataclass(frozen=True, slots=True)
class NextCycle:
    at: datetime | None
    source: Literal["daemon", "estimate", "unknown"]
    note: str


@dataclass(frozen=True, slots=True)
class Charged:
    """Recharges finished in the last 24 hours in one currency."""

    currency: str
    count: int
    credited: Units  # net, to the balances
    charged: Units  # with VAT, to the cards


@dataclass(frozen=True, slots=True)
class Attention:
    """One thing a person should look at."""

    kind: str
    subject: str
    detail: str
    account: str | None = None
    at: datetime | None = None  # when it started, or when it will be retried

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "account": self.account,
            "detail": self.detail,
            "at": _iso(self.at),
        }


ATTENTION_KINDS = {
    "cycle_failed": "the last recharge cycle failed",
    "cycle_overdue": "no successful cycle for longer than the interval and its grace",
    "scheduler_stopped": "the daemon answered but its scheduler is not running",
    RechargeState.ACTION_REQUIRED: "the customer must authenticate a payment",
    RechargeState.SUSPENDED: "automatic recharge suspended after repeated failures",
    RechargeState.BACKING_OFF: "recent recharges failed; retried later",
    "unusable_source": "a card a hard decline made unusable",
    "mail_failed": "emails that failed for good",
    "mail_late": "emails pending for over an hour",
    "recharge_stuck": "a recharge open for longer than a lease",
    RechargeState.DISPUTED: "a payment was disputed; automatic recharge paused until an admin acts",
    "integration_error": "the processor refused requests of ours (not the cards' fault); fix before charging",
    "charging_halted": "the circuit breaker stopped a cycle's charging after integration errors in a row",
    "recovery_failing": "a recharge whose recovery keeps failing (retried with backoff)",
    "event_failing": "a processor event (refund, dispute, card change, payment) that could not be handled yet",
    "events_waiting": "processor events nobody has handled: is the daemon running? `recharged events process`",
    "webhook_failed": "events the CRM's webhook endpoint never accepted (the retry schedule ran out)",
    "webhook_late": "events waiting for over an hour to reach the CRM's webhook endpoint",
}


@dataclass
class StatusReport:
    at: datetime
    last_cycle: CycleRun | None
    last_success: CycleRun | None
    next_cycle: NextCycle
    daemon: DaemonAnswer
    charged: list[Charged] = field(default_factory=list)
    attention: list[Attention] = field(default_factory=list)
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # currency -> (open authorizations, money held)
    expired_last_24h: int = 0  # reservations whose call's usage never came
    refused_last_24h: dict[str, int] = field(default_factory=dict)  # calls refused (402), per reason

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention)

    def as_json(self) -> dict[str, Any]:
        return {
            "at": _iso(self.at),
            "needs_attention": self.needs_attention,
            "last_cycle": None if self.last_cycle is None else self.last_cycle.as_json(),
            "last_successful_cycle": None if self.last_success is None else self.last_success.as_json(),
            "next_cycle": {
                "at": _iso(self.next_cycle.at),
                "source": self.next_cycle.source,
                "note": self.next_cycle.note,
            },
            "daemon": {
                "url": self.daemon.url,
                "answered": self.daemon.answered,
                "health": self.daemon.health,
                "scheduler_running": self.daemon.scheduler_running,
                "error": self.daemon.error,
                "details_shown": self.daemon.detailed,
                "checks": {c.name: {"status": c.status, "output": c.output} for c in self.daemon.checks},
            },
            "charged_last_24h": {
                "recharges": sum(c.count for c in self.charged),
                "by_currency": {
                    c.currency: {
                        "count": c.count,
                        "credited": format_ledger(c.credited),
                        "charged": format_ledger(c.charged),
                    }
                    for c in self.charged
                },
            },
            "attention": [a.as_json() for a in self.attention],
            "calls": {
                "open_authorizations": {currency: count for currency, (count, _) in self.held.items()},
                "held": {currency: format_ledger(units) for currency, (_, units) in self.held.items()},
                "expired_last_24h": self.expired_last_24h,
                "refused_last_24h": self.refused_last_24h,
            },
        }


def next_cycle(daemon: DaemonAnswer, last_success: CycleRun | None, interval: timedelta, now: datetime) -> NextCycle:
    """The next cycle as the daemon says, else estimated from the last successful one."""
    if daemon.answered and daemon.next_cycle is not None:
        return NextCycle(daemon.next_cycle, "daemon", f"as the daemon at {daemon.url} says")
    if daemon.answered and (daemon.detailed or not daemon.scheduler_running):
        return NextCycle(None, "unknown", f"the daemon at {daemon.url} answered but has no cycle scheduled")
    if daemon.answered:  # its public /healthz: statuses only
        why = f"the daemon at {daemon.url} tells its next cycle only to an API token (set RECHARGED_API_TOKENS)"
    else:
        why = f"no daemon answered at {daemon.url} ({daemon.error})" if daemon.url else str(daemon.error)
    if last_success is None or last_success.finished_at is None:
        return NextCycle(None, "unknown", f"{why}, and no cycle has succeeded yet")
    at = last_success.finished_at + interval
    late = ", already past: is the daemon running?" if at < now else ""
    hours = f"{interval.total_seconds() / 3600:g}"
    return NextCycle(at, "estimate", f"estimate: {why}; the last successful cycle + {hours} h{late}")


def status_report(db: Database, settings: Settings, now: datetime, daemon: DaemonAnswer) -> StatusReport:
    """Everything `recharged status` shows, as of `now`."""
    interval, grace = settings.daemon.cycle_interval, settings.daemon.cycle_grace
    lease = timedelta(seconds=settings.payments.lease_seconds)
    attention: list[Attention] = []
    with db.reading() as session:
        last_run = last_job_run(session, "cycle")
        last = None if last_run is None else CycleRun.of(last_run)
        last_ok = last if last is not None and last.status == JobStatus.SUCCEEDED else None
        if last_ok is None:
            found = last_job_run(session, "cycle", JobStatus.SUCCEEDED)
            last_ok = None if found is None else CycleRun.of(found)
        charged = [Charged(*row) for row in recharges_finished_since(session, now - timedelta(days=1))]

        for account in accounts_not_ok(session):
            state = account.recharge_state
            reason = account.state_reason or ATTENTION_KINDS.get(state, state)
            retry = account.retry_at if state == RechargeState.BACKING_OFF else None  # shown as its time
            attention.append(Attention(state, f"account {account.id}", reason, account.id, retry))
        for source in unusable_sources(session):
            attention.append(
                Attention(
                    "unusable_source",
                    f"account {source.account_id} source {source.id}",
                    f"{card_label(source)}: {source.unusable_reason}; replace it, or `recharged sources reactivate`",
                    source.account_id,
                )
            )
        for status, count, oldest, error in undelivered_mail(session, now - MAIL_LATE):
            what = "failed for good" if status == "failed" else "pending for over an hour"
            hint = "`recharged outbox --status failed`" if status == "failed" else "`recharged outbox`"
            detail = f"{plural(count, 'email')} {what}, the oldest queued {oldest:%Y-%m-%d %H:%M} UTC; see {hint}"
            if error:
                detail += f"; last error: {error}"
            attention.append(
                Attention("mail_failed" if status == "failed" else "mail_late", "outbox", detail, None, oldest)
            )
        refused = integration_errors_since(session, now - timedelta(days=1))
        if refused:
            attention.append(
                Attention(
                    "integration_error",
                    "payments",
                    f"the processor refused {plural(len(refused), 'charge request')} of ours in 24 h (never the cards' "
                    f"fault; no customer was told), the last: {refused[0].message or refused[0].code}",
                    None,
                    refused[0].created_at,
                )
            )
        for recharge in failing_recoveries(session):
            attention.append(
                Attention(
                    "recovery_failing",
                    f"recharge {recharge.id}",
                    f"{recharge.outcome}; retried from {recharge.recover_after:%Y-%m-%d %H:%M} UTC"
                    if recharge.recover_after
                    else str(recharge.outcome),
                    recharge.account_id,
                    recharge.updated_at,
                )
            )
        for event in failing_events(session):
            attention.append(
                Attention(
                    "event_failing",
                    f"event {event.id}",
                    f"{event.type} {event.object_id}: {plural(event.attempts, 'attempt')}, "
                    f"the last: {event.last_error}; "
                    "tried again at the time shown, or now with `recharged events process`",
                    event.account_id,
                    event.next_attempt_at,
                )
            )
        waiting, waiting_since = pending_events_received_before(session, now - WAITING_TOO_LONG)
        if waiting:
            attention.append(
                Attention(
                    "events_waiting",
                    "processor events",
                    f"{plural(waiting, 'event')} stored but not handled for over "
                    f"{WAITING_TOO_LONG.seconds // 60} minutes; "
                    "the daemon handles them, or run `recharged events process`",
                    None,
                    waiting_since,
                )
            )
        for hooks in undelivered(session, now - MAIL_LATE):
            failed = hooks.status == "failed"
            what = "failed for good" if failed else "waiting for over an hour"
            hint = f"`recharged webhooks list --status {'failed' if failed else 'pending'}`" + (
                ", then `recharged webhooks replay ID`" if failed else ""
            )
            since = f"the oldest from {hooks.oldest:%Y-%m-%d %H:%M} UTC"
            detail = f"{plural(hooks.count, 'event')} {what}, {since}; see {hint}"
            if hooks.last_error:
                detail += f"; last error: {hooks.last_error}"
            kind = "webhook_failed" if failed else "webhook_late"
            attention.append(Attention(kind, f"webhook endpoint {hooks.endpoint}", detail, None, hooks.oldest))
        for recharge in open_recharges_claimed_before(session, now - lease):
            attention.append(
                Attention(
                    "recharge_stuck",
                    f"recharge {recharge.id}",
                    f"{recharge.kind} recharge of {format_ledger(recharge.total)} {recharge.currency} still "
                    f"{recharge.phase} ({recharge.outcome or 'no outcome yet'}); `recharged recover` finishes it",
                    recharge.account_id,
                    recharge.created_at,
                ),
            )

    cycle_problems = []
    if last is not None and last.summary.get("halted"):
        stopped = f"charging stopped: {last.summary['halted']}"
        cycle_problems.append(Attention("charging_halted", f"cycle on {last.instance}", stopped, None, last.started_at))
    if last is not None and last.status == JobStatus.FAILED:
        cycle_problems.append(
            Attention("cycle_failed", f"cycle on {last.instance}", last.error or "see the log", None, last.started_at)
        )
    if last_ok is not None and last_ok.finished_at is not None and now > last_ok.finished_at + interval + grace:
        cycle_problems.append(
            Attention(
                "cycle_overdue",
                "recharge cycle",
                f"the last successful cycle finished {last_ok.finished_at:%Y-%m-%d %H:%M} UTC, more than "
                f"{(interval + grace).total_seconds() / 3600:g} h ago",
                None,
                last_ok.finished_at,
            )
        )
    if daemon.answered and daemon.scheduler_running is False:
        cycle_problems.append(
            Attention("scheduler_stopped", f"daemon at {daemon.url}", ATTENTION_KINDS["scheduler_stopped"])
        )
    return StatusReport(
        at=now,
        last_cycle=last,
        last_success=last_ok,
        next_cycle=next_cycle(daemon, last_ok, interval, now),
        daemon=daemon,
        charged=charged,
        attention=cycle_problems + attention,
        held=held_per_currency(db),
        expired_last_24h=expired_since(db, now - timedelta(days=1)),
        refused_last_24h=refused_since(db, now - timedelta(days=1)),
    )


# --- what /metrics shows of it ---------------------------------------------------------------------------------

NO_USABLE_CARD = "no_usable_card"  # automatic recharge is on, and no card on file can be charged
ATTENTION_REASONS = (
    RechargeState.BACKING_OFF,
    RechargeState.SUSPENDED,
    RechargeState.ACTION_REQUIRED,
    RechargeState.DISPUTED,
    NO_USABLE_CARD,
)
UNSENT = (OutboxStatus.PENDING, OutboxStatus.SENDING, OutboxStatus.FAILED)


@dataclass(frozen=True, slots=True)
class Backlog:
    """What waits for a person or for the mail server, as gauges: every reason and status is present (0 when none)."""

    attention: dict[str, int]  # open accounts by reason (ATTENTION_REASONS): one reason each
    outbox: dict[str, int]  # messages not sent yet, by status (UNSENT)
    oldest_pending_seconds: float  # how long the oldest pending message has waited; 0 when none waits


def backlog(db: Database, now: datetime) -> Backlog:
    """The accounts needing attention and the outbox's backlog as of `now`, in two GROUP BY queries (a scrape of
    /metrics runs it, so it never reads account by account)."""
    with db.reading() as session:
        states = accounts_needing_attention(session)
        unsent = outbox_backlog(session)
    attention = {str(reason): 0 for reason in ATTENTION_REASONS}
    for state, count in states.items():
        attention[NO_USABLE_CARD if state == RechargeState.OK else str(state)] = count
    oldest = unsent.get(OutboxStatus.PENDING, (0, None))[1]
    return Backlog(
        attention=attention,
        outbox={str(status): unsent.get(status, (0, None))[0] for status in UNSENT},
        oldest_pending_seconds=0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
    )
