"""The transactional outbox and its sender: every email is written in the same transaction as what it reports,
then delivered over SMTP (or, with no SMTP host, written as an .eml file) exactly once.

A message row moves: pending -> sending -> sent, or back to pending (a transient failure, tried again later),
or failed (the server refused it for good, a template is broken, or the retry schedule ran out).

Never lost, never twice. SMTP cannot be asked whether it already took a message, so the sender keeps its own
evidence, in this order, for each message:

1. claim: one transaction sets `sending`, a lease and `attempts + 1`, and on the first claim fixes the message's
   bytes and Message-ID (derived from its key: `<recharged.receipt.R-000042@your-domain>`). Whatever happens
   later, a re-send is byte-for-byte the same message.
2. MAIL, RCPT, DATA. Only the server's 250 after DATA means "accepted".
3. journal: right after that 250, the Message-ID is appended to a local journal file and fsync'ed (no network,
   microseconds). Then the row becomes `sent` in the database.

Recovery (at the start of every run) takes rows left `sending` whose lease has run out, i.e. their sender died
or lost the database: a Message-ID in the journal was accepted -> `sent`, without sending again; one not in
the journal never got its 250 -> sent again. So a crash between the server's answer and the commit, or a
database that is unreachable at that moment, does not cause a duplicate, and a crash before the answer does
not lose the message. What remains is inherent to SMTP: a connection that breaks after the final "." but
before the 250 arrives leaves the outcome unknown; the message is then sent again with the same Message-ID,
which mail clients use to collapse duplicates. The journal is per host: run the sender on one host, or keep
the journal on storage all senders share. With .eml files the file itself is the evidence (written to a
temporary name, fsync'ed, renamed).

This module writes messages to the outbox and runs the sender's state machine. Beside it: the transports and
their SMTP errors (`transports.py`), the journal (`journal.py`), a message's Message-ID and bytes (`mime.py`),
and the outbox's health, listing and repair for operators (`admin.py`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential_jitter
from tenacity.wait import wait_base

from recharged import credentials as secrets
from recharged.clock import Clock
from recharged.config import Settings
from recharged.errors import PermanentSmtpError, TemplateRenderError, TransientSmtpError
from recharged.faults import crashpoint
from recharged.mail.admin import list_messages, outbox_health, retry_failed
from recharged.mail.journal import Journal
from recharged.mail.transports import FolderTransport, SmtpTransport, Transport
from recharged.states import OutboxStatus
from recharged.store.engine import Database, insert_once
from recharged.store.models import OutboxMessage
from recharged.store.runs import instance_name

# list_messages, outbox_health and retry_failed live in admin.py; the CLI imports them from here.
__all__ = ["OutboxSender", "SendReport", "enqueue", "gathering", "list_messages", "outbox_health", "retry_failed"]

log = structlog.get_logger("recharged.outbox")


# --- writing to the outbox ------------------------------------------------------------------------------------


def enqueue(
    session: Session,
    *,
    key: str,
    kind: str,
    to: str,
    context: dict[str, Any],
    at: datetime,
    account_id: str | None = None,
    not_before: datetime | None = None,
) -> bool:
    """Add a message to the outbox in the caller's transaction; one message per key (False: already there).

    `kind` names the template; `context` is what it renders (JSON values). Rendering happens when the message
    is first sent, so a broken template can never roll back the transaction that reports a payment. The sender
    takes it at `not_before` (default: at once); `outbox send` sends everything pending at once."""
    return insert_once(
        session,
        OutboxMessage,
        {
            "key": key,
            "kind": kind,
            "account_id": account_id,
            "to_address": to,
            "context": context,
            "created_at": at,
            "status": OutboxStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": not_before or at,
        },
        ["key"],
    )


def gathering(session: Session, *, kind: str, account_id: str, now: datetime) -> OutboxMessage | None:
    """The account's newest message of `kind` that is still waiting for its time (to be sent after `now`) and that
    no sender has taken yet (its bytes are not fixed), locked until the caller's transaction ends: what a message
    that gathers several events (the notices of admin changes) may still be changed into. None when there is none.

    A sender that takes the message first makes it `sending` (and fixes its bytes) in its own transaction; this
    query then no longer finds it, and the caller queues a new message."""
    return session.scalars(
        select(OutboxMessage)
        .where(
            OutboxMessage.kind == kind,
            OutboxMessage.account_id == account_id,
            OutboxMessage.status == OutboxStatus.PENDING,
            OutboxMessage.attempts == 0,
            OutboxMessage.raw.is_(None),
            OutboxMessage.next_attempt_at > now,
        )
        .order_by(OutboxMessage.id.desc())
        .limit(1)
        .with_for_update()
    ).first()


# --- the sender -----------------------------------------------------------------------------------------------


@dataclass
class SendReport:
    """What one delivery run did."""

    sent: list[int] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)  # found accepted after a crash, recorded as sent
    retrying: list[int] = field(default_factory=list)  # transient failure: pending again, tried later
    failed: list[int] = field(default_factory=list)  # permanent failure or the retry schedule ran out
    error: str | None = None  # the server could not be reached: the run stopped early

    @property
    def ok(self) -> bool:
        return not self.failed and self.error is None


class OutboxSender:
    """Delivers pending messages: `send_pending()` once per run (the daemon calls it on a schedule)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        clock: Clock,
        *,
        transport: Transport | None = None,
        wait: wait_base | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock
        self._outbox = settings.outbox
        self._instance = instance_name()
        self._wait = wait or wait_exponential_jitter(
            initial=self._outbox.retry_initial_seconds, max=self._outbox.retry_max_seconds
        )
        self.journal = Journal(Path(self._outbox.journal))
        self._transport = transport
        self._ssl_context = ssl_context
        self._unreachable: str | None = None

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            smtp = self._settings.smtp
            if not smtp.host:
                self._transport = FolderTransport(Path(self._outbox.folder))
            else:
                password = secrets.read_secret("smtp_password")
                self._transport = SmtpTransport(
                    smtp, self.journal, password.value if password else None, self._ssl_context
                )
        return self._transport

    def send_pending(
        self, ids: Sequence[int] | None = None, limit: int | None = None, *, due_only: bool = True
    ) -> SendReport:
        """Recover messages a dead sender left `sending`, then deliver every pending message that is due (or
        every pending one, also those waiting to be retried, with `due_only=False`; or only `ids`), at most
        `limit`. A server that cannot be reached stops the run early."""
        report = SendReport()
        self._unreachable = None
        try:
            report.recovered = self.recover()
            for done, message_id in enumerate(self._due(ids, due_only)):
                if limit is not None and done >= limit:
                    break
                outcome = self._send_one(message_id)
                if outcome == "unreachable":
                    break
                if outcome in ("sent", "retrying", "failed"):
                    getattr(report, outcome).append(message_id)
            report.error = self._unreachable
        finally:
            self.transport.close()
        if isinstance(self.transport, SmtpTransport):
            self.journal.compact(self._not_yet_sent)
        return report

    def _due(self, ids: Sequence[int] | None, due_only: bool) -> Iterator[int]:
        """Pending messages in id order, fetched 200 at a time after the last one seen (each visited once)."""
        last_id = 0
        while True:
            now = self._clock.now()
            with self._db.reading() as session:
                query = select(OutboxMessage.id).where(
                    OutboxMessage.status == OutboxStatus.PENDING, OutboxMessage.id > last_id
                )
                if ids is not None:
                    query = query.where(OutboxMessage.id.in_(list(ids)))
                elif due_only:
                    query = query.where(OutboxMessage.next_attempt_at <= now)
                batch = list(session.scalars(query.order_by(OutboxMessage.id).limit(200)))
            if not batch:
                return
            yield from batch
            last_id = batch[-1]

    def recover(self) -> list[int]:
        """Settle messages left `sending` past their lease: accepted before (journal or .eml file) -> sent;
        otherwise pending again, to be sent now with the same Message-ID."""
        now = self._clock.now()
        with self._db.transaction() as session:
            stale = session.execute(
                select(OutboxMessage.id, OutboxMessage.message_id).where(
                    OutboxMessage.status == OutboxStatus.SENDING, OutboxMessage.lease_until < now
                )
            ).all()
        recovered = []
        known = self.transport.accepted({m for _, m in stale if m is not None}) if stale else set()
        for row_id, message_id in stale:
            accepted = message_id in known
            values: dict[str, Any] = (
                {"status": OutboxStatus.SENT, "sent_at": now, "last_error": None}
                if accepted
                else {
                    "status": OutboxStatus.PENDING,
                    "next_attempt_at": now,
                    "last_error": "sender stopped before the server accepted the message; sending again",
                }
            )
            with self._db.transaction() as session:
                changed = session.execute(
                    update(OutboxMessage)
                    .where(
                        OutboxMessage.id == row_id,
                        OutboxMessage.status == OutboxStatus.SENDING,
                        OutboxMessage.lease_until < now,
                    )
                    .values(lease_until=None, claimed_by=None, **values)
                    .execution_options(synchronize_session=False)
                )
            if changed.rowcount and accepted:  # type: ignore[attr-defined]
                recovered.append(row_id)
                log.info("outbox.recovered", message=row_id, message_id=message_id, outcome="sent")
            elif changed.rowcount:  # type: ignore[attr-defined]
                log.warning("outbox.recovered", message=row_id, message_id=message_id, outcome="resend")
        return recovered

    def _claim(self, row_id: int) -> OutboxMessage | str:
        """pending -> sending under a lease; the first claim renders the message and fixes its bytes."""
        now = self._clock.now()
        with self._db.transaction() as session:
            claimed = session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == row_id, OutboxMessage.status == OutboxStatus.PENDING)
                .values(
                    status=OutboxStatus.SENDING,
                    lease_until=now + timedelta(seconds=self._outbox.lease_seconds),
                    claimed_by=self._instance,
                    attempts=OutboxMessage.attempts + 1,
                    last_attempt_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if not claimed.rowcount:  # type: ignore[attr-defined]
                return "skipped"  # another sender took it
            row = session.get(OutboxMessage, row_id, populate_existing=True)
            assert row is not None
            if row.raw is None:
                from recharged.mail.mime import build_message  # lazy: the templates, only for sending

                try:
                    row.message_id, row.subject, row.raw = build_message(self._settings, row)
                except TemplateRenderError as exc:
                    row.status, row.lease_until, row.claimed_by = OutboxStatus.FAILED, None, None
                    row.last_error = f"cannot render: {exc}"[:500]
                    log.error("outbox.template", message=row_id, error=str(exc))
                    return "failed"
            return row

    def _send_one(self, row_id: int) -> str:
        row = self._claim(row_id)
        if isinstance(row, str):
            return row
        assert row.raw is not None
        assert row.message_id is not None
        crashpoint("outbox_after_claim")
        started = self._clock.now()
        lease = self._outbox.lease_seconds
        retrying = Retrying(
            # Never hold a message longer than half its lease, so recovery cannot take it over mid-send.
            stop=stop_after_attempt(self._outbox.max_retries + 1) | stop_after_delay(lease / 2),
            wait=self._wait,
            retry=retry_if_exception_type(TransientSmtpError),
            reraise=True,
        )
        try:
            answer = retrying(
                self.transport.deliver, row.message_id, self._settings.smtp.from_address, row.to_address, row.raw
            )
        except PermanentSmtpError as exc:
            self._finish(row_id, OutboxStatus.FAILED, error=f"refused: {exc}")
            log.error("outbox.refused", message=row_id, to=row.to_address, error=str(exc))
            return "failed"
        except TransientSmtpError as exc:
            return self._postpone(row, exc)
        crashpoint("outbox_before_commit")
        self._finish(row_id, OutboxStatus.SENT, error=None)
        log.info(
            "outbox.sent",
            message=row_id,
            kind=row.kind,
            message_id=row.message_id,
            answer=answer[:120],
            seconds=round((self._clock.now() - started).total_seconds(), 3),
        )
        return "sent"

    def _postpone(self, row: OutboxMessage, exc: TransientSmtpError) -> str:
        """A transient failure after the inline retries: pending again after the next step of the schedule; a
        message the server keeps refusing (4xx) fails after the last step, while an unreachable server never
        fails a message (it stops the run)."""
        schedule = self._outbox.retry_after_minutes
        attempts = row.attempts
        if not exc.connection and attempts > len(schedule):
            self._finish(row.id, OutboxStatus.FAILED, error=f"gave up after {attempts} attempts: {exc}")
            log.error("outbox.gave_up", message=row.id, attempts=attempts, error=str(exc))
            return "failed"
        delay = timedelta(minutes=schedule[min(attempts, len(schedule)) - 1])
        self._finish(row.id, OutboxStatus.PENDING, error=str(exc), next_attempt_at=self._clock.now() + delay)
        log.warning("outbox.retry", message=row.id, attempts=attempts, error=str(exc), after_minutes=delay)
        if exc.connection:
            self._unreachable = f"mail server unreachable: {exc}"
            return "unreachable"
        return "retrying"

    def _finish(
        self, row_id: int, status: OutboxStatus, *, error: str | None, next_attempt_at: datetime | None = None
    ) -> None:
        now = self._clock.now()
        values: dict[str, Any] = {
            "status": status,
            "lease_until": None,
            "claimed_by": None,
            "last_error": error and error[:500],
        }
        if status == OutboxStatus.SENT:
            values["sent_at"] = now
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        with self._db.transaction() as session:
            changed = session.execute(
                update(OutboxMessage)
                .where(
                    OutboxMessage.id == row_id,
                    OutboxMessage.status == OutboxStatus.SENDING,
                    OutboxMessage.claimed_by == self._instance,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        if not changed.rowcount:  # type: ignore[attr-defined]
            log.warning("outbox.lease_lost", message=row_id, status=status)

    def _not_yet_sent(self, message_ids: set[str]) -> set[str]:
        with self._db.transaction() as session:
            done = set(
                session.scalars(
                    select(OutboxMessage.message_id).where(
                        OutboxMessage.message_id.in_(sorted(message_ids)),
                        OutboxMessage.status.in_(("sent", "failed", "cancelled")),
                    )
                )
            )
        return message_ids - done
