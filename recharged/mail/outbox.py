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
"""

from __future__ import annotations

import fcntl
import os
import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential_jitter
from tenacity.wait import wait_base

from recharged import credentials as secrets
from recharged.clock import Clock
from recharged.config import Settings, SmtpSettings
from recharged.faults import crashpoint
from recharged.mail.templating import TemplateRenderError, render
from recharged.store.engine import Database, insert_once
from recharged.store.models import OutboxMessage
from recharged.store.runs import instance_name

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
) -> bool:
    """Add a message to the outbox in the caller's transaction; one message per key (False: already there).

    `kind` names the template; `context` is what it renders (JSON values). Rendering happens when the message
    is first sent, so a broken template can never roll back the transaction that reports a payment."""
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
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": at,
        },
        ["key"],
    )


def message_id_for(key: str, from_address: str) -> str:
    """The stable Message-ID of the message with this key: `<recharged.receipt.R-000042@example.com>`."""
    local = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]", ".", key)).strip(".")
    domain = from_address.rpartition("@")[2]
    return f"<recharged.{local}@{domain}>"


def build_message(settings: Settings, row: OutboxMessage) -> tuple[str, str, str]:
    """Render a message and fix its bytes: (Message-ID, subject, RFC 5322 text with CRLF line ends)."""
    smtp = settings.smtp
    rendered = render(settings, row.kind, row.context)
    message = EmailMessage()
    message["Subject"] = rendered.subject
    sender_name = smtp.from_name or settings.business.name
    message["From"] = Address(sender_name, addr_spec=smtp.from_address)
    message["To"] = row.to_address
    if smtp.reply_to:
        message["Reply-To"] = smtp.reply_to
    message["Date"] = format_datetime(row.created_at)
    message_id = message_id_for(row.key, smtp.from_address)
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message["X-Recharged-Kind"] = row.kind
    message.set_content(rendered.text, cte="quoted-printable")
    message.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    try:
        raw = message.as_string(policy=SMTP)
    except (UnicodeError, ValueError):  # an address that needs SMTPUTF8
        raw = message.as_string(policy=SMTPUTF8)
    return message_id, rendered.subject, raw


# --- delivery -------------------------------------------------------------------------------------------------


class TransientSmtpError(Exception):
    """Worth trying again: the server could not be reached, dropped the connection, or answered 4xx."""

    def __init__(self, message: str, *, connection: bool) -> None:
        super().__init__(message)
        self.connection = connection  # True: nothing is wrong with the message, the server is the problem


class PermanentSmtpError(Exception):
    """The server refused the message for good (5xx): trying again would not help."""


class Transport:
    """Where accepted messages go: an SMTP server, or a folder of .eml files."""

    def deliver(self, message_id: str, sender: str, recipient: str, raw: str) -> str:
        """Hand one message over; returns the server's answer. Raises TransientSmtpError or PermanentSmtpError."""
        raise NotImplementedError

    def accepted(self, message_ids: set[str]) -> set[str]:
        """Which of these messages were accepted before (recovery after a crash)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release any connection."""


def _eml_name(message_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", message_id.strip("<>")) + ".eml"


class FolderTransport(Transport):
    """With no SMTP host: each message becomes FOLDER/<message-id>.eml, written atomically (temporary name,
    fsync, rename). The file is its own proof of delivery, so a message is never written twice."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def deliver(self, message_id: str, sender: str, recipient: str, raw: str) -> str:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            target = self.folder / _eml_name(message_id)
            if target.exists():
                return f"already written to {target}"
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with temporary.open("wb") as handle:
                handle.write(raw.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            crashpoint("outbox_before_eml_rename")
            os.replace(temporary, target)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise TransientSmtpError(f"cannot write to {self.folder}: {exc.strerror}", connection=True) from exc
        return f"written to {target}"

    def accepted(self, message_ids: set[str]) -> set[str]:
        return {m for m in message_ids if (self.folder / _eml_name(m)).exists()}


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Journal:
    """The Message-IDs an SMTP server accepted, one a line, each fsync'ed before the database records it.

    A lock file serializes writers and the compaction that drops what the database already shows as sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def record(self, message_id: str) -> None:
        with self._locked(fcntl.LOCK_EX):
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, f"{message_id}\n".encode())
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def accepted(self) -> set[str]:
        with self._locked(fcntl.LOCK_SH):
            return self._read()

    def _read(self) -> set[str]:
        try:
            return {line.strip() for line in self.path.read_text("utf-8").splitlines() if line.strip()}
        except FileNotFoundError:
            return set()

    def compact(self, still_needed: Callable[[set[str]], set[str]]) -> None:
        """Rewrite the journal with only the ids `still_needed` keeps (those not yet recorded as sent)."""
        with self._locked(fcntl.LOCK_EX):
            ids = self._read()
            if not ids:
                return
            keep = still_needed(ids)
            if keep == ids:
                return
            temporary = self.path.with_name(self.path.name + ".tmp")
            with temporary.open("w", encoding="utf-8") as handle:
                handle.writelines(f"{message_id}\n" for message_id in sorted(keep))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)


class SmtpTransport(Transport):
    """One SMTP connection, reused for a run's messages and reopened after an error. STARTTLS or implicit
    TLS with the system's trusted CAs (or the given context), and a login when a user is configured."""

    def __init__(
        self, settings: SmtpSettings, journal: Journal, password: str | None, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.settings = settings
        self.journal = journal
        self._password = password
        self._ssl_context = ssl_context
        self._smtp: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        context = self._ssl_context or ssl.create_default_context()
        smtp: smtplib.SMTP
        try:
            if s.security == "tls":
                smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_seconds, context=context)
            else:
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
            smtp.ehlo()
            if s.security == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if s.user:
                if self._password is None:
                    smtp.close()
                    raise TransientSmtpError(
                        f"smtp.user is {s.user!r} but no password: set RECHARGED_SMTP_PASSWORD or the credential "
                        "smtp_password",
                        connection=True,
                    )
                smtp.login(s.user, self._password)
        except smtplib.SMTPNotSupportedError as exc:
            raise TransientSmtpError(f"{s.host}:{s.port}: {exc}", connection=True) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientSmtpError(f"{s.host}:{s.port}: {_describe(exc)}", connection=True) from exc
        return smtp

    def deliver(self, message_id: str, sender: str, recipient: str, raw: str) -> str:
        if self._smtp is None:
            self._smtp = self._connect()
        smtp = self._smtp
        data = raw.encode("utf-8")
        options = ["SMTPUTF8"] if not raw.isascii() or not recipient.isascii() else []
        try:
            code, answer = smtp.mail(sender, options)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, answer, sender)
            code, answer = smtp.rcpt(recipient)
            if code not in (250, 251):
                raise smtplib.SMTPRecipientsRefused({recipient: (code, answer)})
            crashpoint("outbox_before_data")
            code, answer = smtp.data(data)
            if code != 250:
                raise smtplib.SMTPDataError(code, answer)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPResponseException) as exc:
            self._reset()
            code, text = _code_of(exc)
            if 400 <= code < 500:
                raise TransientSmtpError(f"{code} {text}", connection=False) from exc
            raise PermanentSmtpError(f"{code} {text}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise TransientSmtpError(_describe(exc), connection=True) from exc
        # Accepted. The journal line is the proof a restart relies on: write it before anything else can fail.
        self.journal.record(message_id)
        crashpoint("outbox_after_journal")
        return f"{code} {answer.decode('utf-8', 'replace')}"

    def accepted(self, message_ids: set[str]) -> set[str]:
        return message_ids & self.journal.accepted()

    def _reset(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                self._smtp.close()
            self._smtp = None


def _code_of(exc: Exception) -> tuple[int, str]:
    answer: bytes | str
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, answer = next(iter(exc.recipients.values()))
    else:
        assert isinstance(exc, smtplib.SMTPResponseException)
        code, answer = exc.smtp_code, exc.smtp_error
    return int(code), answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        code, text = _code_of(exc)
        return f"{code} {text}"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


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
                query = select(OutboxMessage.id).where(OutboxMessage.status == "pending", OutboxMessage.id > last_id)
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
                    OutboxMessage.status == "sending", OutboxMessage.lease_until < now
                )
            ).all()
        recovered = []
        known = self.transport.accepted({m for _, m in stale if m is not None}) if stale else set()
        for row_id, message_id in stale:
            accepted = message_id in known
            values: dict[str, Any] = (
                {"status": "sent", "sent_at": now, "last_error": None}
                if accepted
                else {
                    "status": "pending",
                    "next_attempt_at": now,
                    "last_error": "sender stopped before the server accepted the message; sending again",
                }
            )
            with self._db.transaction() as session:
                changed = session.execute(
                    update(OutboxMessage)
                    .where(
                        OutboxMessage.id == row_id, OutboxMessage.status == "sending", OutboxMessage.lease_until < now
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
                .where(OutboxMessage.id == row_id, OutboxMessage.status == "pending")
                .values(
                    status="sending",
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
                try:
                    row.message_id, row.subject, row.raw = build_message(self._settings, row)
                except TemplateRenderError as exc:
                    row.status, row.lease_until, row.claimed_by = "failed", None, None
                    row.last_error = f"cannot render: {exc}"[:500]
                    log.error("outbox.template", message=row_id, error=str(exc))
                    return "failed"
            return row

    def _send_one(self, row_id: int) -> str:
        row = self._claim(row_id)
        if isinstance(row, str):
            return row
        assert row.raw is not None and row.message_id is not None
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
            self._finish(row_id, "failed", error=f"refused: {exc}")
            log.error("outbox.refused", message=row_id, to=row.to_address, error=str(exc))
            return "failed"
        except TransientSmtpError as exc:
            return self._postpone(row, exc)
        crashpoint("outbox_before_commit")
        self._finish(row_id, "sent", error=None)
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
            self._finish(row.id, "failed", error=f"gave up after {attempts} attempts: {exc}")
            log.error("outbox.gave_up", message=row.id, attempts=attempts, error=str(exc))
            return "failed"
        delay = timedelta(minutes=schedule[min(attempts, len(schedule)) - 1])
        self._finish(row.id, "pending", error=str(exc), next_attempt_at=self._clock.now() + delay)
        log.warning("outbox.retry", message=row.id, attempts=attempts, error=str(exc), after_minutes=delay)
        if exc.connection:
            self._unreachable = f"mail server unreachable: {exc}"
            return "unreachable"
        return "retrying"

    def _finish(self, row_id: int, status: str, *, error: str | None, next_attempt_at: datetime | None = None) -> None:
        now = self._clock.now()
        values: dict[str, Any] = {
            "status": status,
            "lease_until": None,
            "claimed_by": None,
            "last_error": error and error[:500],
        }
        if status == "sent":
            values["sent_at"] = now
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        with self._db.transaction() as session:
            changed = session.execute(
                update(OutboxMessage)
                .where(
                    OutboxMessage.id == row_id,
                    OutboxMessage.status == "sending",
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
                        OutboxMessage.status.in_(("sent", "failed")),
                    )
                )
            )
        return message_ids - done


# --- operations -----------------------------------------------------------------------------------------------


def outbox_health(session: Session) -> dict[str, Any]:
    """For /healthz: messages waiting and failed for good, and the last delivery attempt and its outcome."""
    counts = dict(
        session.execute(
            select(OutboxMessage.status, func.count())
            .where(OutboxMessage.status.in_(("pending", "sending", "failed")))
            .group_by(OutboxMessage.status)
        ).all()
    )
    oldest = session.scalar(select(func.min(OutboxMessage.created_at)).where(OutboxMessage.status == "pending"))
    last = session.execute(
        select(OutboxMessage.last_attempt_at, OutboxMessage.status, OutboxMessage.last_error)
        .where(OutboxMessage.last_attempt_at.is_not(None))
        .order_by(OutboxMessage.last_attempt_at.desc(), OutboxMessage.id.desc())
        .limit(1)
    ).first()
    outcome = None
    if last is not None:
        outcome = {"sent": "sent", "failed": "failed", "sending": "sending"}.get(last.status, "will retry")
        if last.last_error and last.status != "sent":
            outcome = f"{outcome}: {last.last_error}"
    return {
        "pending": int(counts.get("pending", 0)),
        "sending": int(counts.get("sending", 0)),
        "failed": int(counts.get("failed", 0)),
        "oldest_pending_at": oldest.isoformat() if oldest else None,
        "last_attempt_at": last.last_attempt_at.isoformat() if last is not None else None,
        "last_outcome": outcome,
    }


def retry_failed(db: Database, clock: Clock, ids: Sequence[int] | None = None) -> int:
    """Put failed messages (all, or the given ones) back to pending, e.g. after fixing a template or the
    server's configuration; returns how many."""
    now = clock.now()
    with db.transaction() as session:
        query = update(OutboxMessage).where(OutboxMessage.status == "failed")
        if ids is not None:
            query = query.where(OutboxMessage.id.in_(list(ids)))
        changed = session.execute(
            query.values(status="pending", attempts=0, next_attempt_at=now, last_error=None).execution_options(
                synchronize_session=False
            )
        )
        return int(changed.rowcount)  # type: ignore[attr-defined]


def outbox_problems(session: Session) -> list[str]:
    """A sent message has its Message-ID, bytes and time; a message being sent has a lease and its bytes."""
    broken = session.execute(
        select(OutboxMessage.id, OutboxMessage.status).where(
            ((OutboxMessage.status == "sent") & (OutboxMessage.sent_at.is_(None) | OutboxMessage.raw.is_(None)))
            | ((OutboxMessage.status == "sent") & OutboxMessage.message_id.is_(None))
            | (
                (OutboxMessage.status == "sending")
                & (OutboxMessage.lease_until.is_(None) | OutboxMessage.raw.is_(None))
            )
        )
    )
    return [f"outbox message {row_id}: {status} but incomplete" for row_id, status in broken]


def list_messages(
    db: Database, *, status: str | None = None, account_id: str | None = None, limit: int = 50
) -> list[OutboxMessage]:
    """Messages newest first, optionally of one status or account (without their bytes)."""
    with db.transaction() as session:
        query = select(OutboxMessage).order_by(OutboxMessage.id.desc()).limit(limit)
        if status is not None:
            query = query.where(OutboxMessage.status == status)
        if account_id is not None:
            query = query.where(OutboxMessage.account_id == account_id)
        return list(session.scalars(query.options(defer(OutboxMessage.raw), defer(OutboxMessage.context))))
