"""The outbox as operators see it: its health (for /healthz and `recharged outbox`), its integrity (for
`recharged verify`), the message list, putting failed messages back in the queue, and cancelling a message not
sent yet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer

from recharged.clock import Clock
from recharged.errors import ConflictError, InputError, NotFoundError
from recharged.states import OutboxStatus
from recharged.store.engine import Database
from recharged.store.models import AuditRecord, OutboxMessage

log = structlog.get_logger("recharged.outbox")


def outbox_health(session: Session) -> dict[str, Any]:
    """For /healthz: messages waiting and failed for good, and the last delivery attempt and its outcome."""
    counts = dict(
        session.execute(
            select(OutboxMessage.status, func.count())
            .where(OutboxMessage.status.in_((OutboxStatus.PENDING, OutboxStatus.SENDING, OutboxStatus.FAILED)))
            .group_by(OutboxMessage.status)
        ).all()
    )
    oldest = session.scalar(
        select(func.min(OutboxMessage.created_at)).where(OutboxMessage.status == OutboxStatus.PENDING)
    )
    last = session.execute(
        select(OutboxMessage.last_attempt_at, OutboxMessage.status, OutboxMessage.last_error)
        .where(OutboxMessage.last_attempt_at.is_not(None))
        .order_by(OutboxMessage.last_attempt_at.desc(), OutboxMessage.id.desc())
        .limit(1)
    ).first()
    outcome = None
    if last is not None:
        shown = {"sent": "sent", "failed": "failed", "sending": "sending", "cancelled": "cancelled"}
        outcome = shown.get(last.status, "will retry")
        if last.last_error and last.status != OutboxStatus.SENT:
            outcome = f"{outcome}: {last.last_error}"
    return {
        "pending": int(counts.get(OutboxStatus.PENDING, 0)),
        "sending": int(counts.get(OutboxStatus.SENDING, 0)),
        "failed": int(counts.get(OutboxStatus.FAILED, 0)),
        "oldest_pending_at": oldest.isoformat() if oldest else None,
        "last_attempt_at": last.last_attempt_at.isoformat() if last is not None else None,
        "last_outcome": outcome,
    }


def last_delivery_check(db: Database) -> dict[str, Any]:
    """/healthz's `smtp:lastDelivery` check: the last delivery attempt's outcome and what waits, from the outbox
    (no call to the mail server)."""
    with db.reading() as session:
        mail = outbox_health(session)
    outcome = mail["last_outcome"]
    # A message that failed for good needs a person, not a restart: warn, never fail the whole daemon.
    status = "warn" if mail["failed"] or (outcome and outcome != "sent") else "pass"
    return {
        "componentType": "system",
        "status": status,
        "time": mail["last_attempt_at"],
        "observedValue": mail["pending"],
        "observedUnit": "messages waiting",
        "output": f"last delivery: {outcome or 'none yet'}; {mail['failed']} failed for good"
        + (f", oldest waiting since {mail['oldest_pending_at']}" if mail["oldest_pending_at"] else ""),
    }


def retry_failed(db: Database, clock: Clock, ids: Sequence[int] | None = None) -> int:
    """Put failed messages (all, or the given ones) back to pending, e.g. after fixing a template or the
    server's configuration; returns how many."""
    now = clock.now()
    with db.transaction() as session:
        query = update(OutboxMessage).where(OutboxMessage.status == OutboxStatus.FAILED)
        if ids is not None:
            query = query.where(OutboxMessage.id.in_(list(ids)))
        changed = session.execute(
            query.values(
                status=OutboxStatus.PENDING, attempts=0, next_attempt_at=now, last_error=None
            ).execution_options(synchronize_session=False)
        )
        return int(changed.rowcount)  # type: ignore[attr-defined]


def outbox_problems(session: Session) -> list[str]:
    """A sent message has its Message-ID, bytes and time; a message being sent has a lease and its bytes."""
    broken = session.execute(
        select(OutboxMessage.id, OutboxMessage.status).where(
            (
                (OutboxMessage.status == OutboxStatus.SENT)
                & (OutboxMessage.sent_at.is_(None) | OutboxMessage.raw.is_(None))
            )
            | ((OutboxMessage.status == OutboxStatus.SENT) & OutboxMessage.message_id.is_(None))
            | (
                (OutboxMessage.status == OutboxStatus.SENDING)
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


MAX_CANCEL_REASON = 200


def cancel_message(
    db: Database, clock: Clock, message_id: int, *, reason: str, actor: str
) -> tuple[OutboxMessage, bool]:
    """Cancel a message not sent yet (pending, or failed): it is never sent, `outbox list` shows it as cancelled,
    and the cancellation is audited on its account with `actor` (a name `accounts.parse_actor` accepted) and
    `reason`. Returns the message and whether this call cancelled it (False: it was cancelled already, and is
    left as it was). A message sent, or being sent, is a ConflictError."""
    reason = " ".join(reason.split())
    if not reason or len(reason) > MAX_CANCEL_REASON or not reason.isprintable():
        raise InputError(f"--reason must be 1 to {MAX_CANCEL_REASON} printable characters, got {reason!r}")
    now = clock.now()
    with db.transaction() as session:
        message = session.get(OutboxMessage, message_id, with_for_update=True)
        if message is None:
            raise NotFoundError(f"no outbox message {message_id}")
        if message.status == OutboxStatus.SENT:
            when = f" at {message.sent_at.isoformat()}" if message.sent_at else ""
            raise ConflictError(f"outbox message {message_id} was sent{when}; it cannot be cancelled")
        if message.status == OutboxStatus.SENDING:
            raise ConflictError(
                f"outbox message {message_id} was being sent (by {message.claimed_by}, held until "
                f"{message.lease_until.isoformat() if message.lease_until else 'its lease ends'}); it cannot be "
                "cancelled: the server may have it already"
            )
        if message.status == OutboxStatus.CANCELLED:
            return message, False
        before = {"status": str(message.status), "kind": message.kind, "to": message.to_address}
        message.status, message.last_error = OutboxStatus.CANCELLED, f"cancelled by {actor}: {reason}"[:500]
        if message.account_id is not None:
            after = {"status": "cancelled", "reason": reason, "message": message.id, "key": message.key}
            session.add(
                AuditRecord(
                    account_id=message.account_id,
                    actor=actor,
                    at=now,
                    action="outbox.cancelled",
                    before=before,
                    after=after,
                )
            )
        log.info("outbox.cancelled", message=message_id, key=message.key, actor=actor, reason=reason)
        return message, True
