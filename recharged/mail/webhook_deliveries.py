"""Deliveries of events to the CRM's webhook endpoints, as the database keeps them: routing each new event to the
configured endpoints that take its type (one delivery each), replaying an event, and what operators see of them
(`webhooks list`, `recharged status`, /healthz, /metrics). Writing events: `webhooks.py`; delivering them:
`webhook_sender.py`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from recharged.errors import ConflictError, NotFoundError
from recharged.mail.webhooks import iso
from recharged.states import WebhookStatus
from recharged.store.engine import Database, insert_once
from recharged.store.models import WebhookDelivery, WebhookEvent

# --- routing, listing and replaying ---------------------------------------------------------------------------


class Route(Protocol):
    """A configured endpoint, as routing sees it."""

    @property
    def name(self) -> str: ...

    def wants(self, event_type: str) -> bool: ...


def _deliveries(session: Session, event: WebhookEvent, routes: Sequence[Route], now: datetime) -> list[str]:
    """A pending delivery of `event` to every endpoint that takes its type and has none yet: their names."""
    values = {"event_id": event.id, "status": WebhookStatus.PENDING, "attempts": 0, "created_at": now}
    return [
        route.name
        for route in routes
        if route.wants(event.type)
        and insert_once(
            session,
            WebhookDelivery,
            {**values, "endpoint": route.name, "next_attempt_at": now},
            ["event_id", "endpoint"],
        )
    ]


def route_events(db: Database, routes: Sequence[Route], now: datetime, *, batch: int = 500) -> int:
    """Give every event not routed yet a delivery to each configured endpoint that takes its type (an endpoint
    receives the events written from when it is configured). Several senders may route at once: a delivery is
    unique per event and endpoint. Returns the deliveries made."""
    made = 0
    while True:
        with db.reading() as session:  # most runs find nothing: no write lock taken for that
            if session.scalar(select(WebhookEvent.id).where(WebhookEvent.routed_at.is_(None)).limit(1)) is None:
                return made
        with db.transaction() as session:
            events = list(
                session.scalars(
                    select(WebhookEvent)
                    .where(WebhookEvent.routed_at.is_(None))
                    .order_by(WebhookEvent.created_at, WebhookEvent.id)
                    .limit(batch)
                    .with_for_update()
                )
            )
            for event in events:
                made += len(_deliveries(session, event, routes, now))
                event.routed_at = now
        if len(events) < batch:
            return made


def replay(db: Database, event_id: str, routes: Sequence[Route], now: datetime) -> list[str]:
    """Queue an event again, with the same id and body, to every configured endpoint that takes its type: its
    deliveries become pending with a fresh retry schedule (one being sent right now is left to finish). Returns the
    endpoints it was queued to."""
    with db.transaction() as session:
        event = session.get(WebhookEvent, event_id, with_for_update=True)
        if event is None:
            raise NotFoundError(f"no webhook event {event_id!r}")
        wanted = [route for route in routes if route.wants(event.type)]
        if not wanted:
            raise ConflictError(f"no configured webhook endpoint takes {event.type} events; nothing was queued")
        created = _deliveries(session, event, wanted, now)
        event.routed_at = event.routed_at or now
        again = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.event_id == event_id,
                WebhookDelivery.endpoint.in_([r.name for r in wanted if r.name not in created]),
                WebhookDelivery.status != WebhookStatus.SENDING,
            )
            .values(
                status=WebhookStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                lease_until=None,
                claimed_by=None,
                last_error=None,
                last_status_code=None,
            )
            .returning(WebhookDelivery.endpoint)
        )
        return sorted([*created, *again.scalars()])


@dataclass(frozen=True, slots=True)
class DeliveryView:
    """One delivery with its event, as `webhooks list` shows it."""

    id: int
    event_id: str
    type: str
    account_id: str
    created_at: datetime
    endpoint: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        def when(value: datetime | None) -> str | None:
            return None if value is None else iso(value)

        return {
            "id": self.id,
            "event_id": self.event_id,
            "type": self.type,
            "account_id": self.account_id,
            "created_at": iso(self.created_at),
            "endpoint": self.endpoint,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": when(self.next_attempt_at),
            "last_attempt_at": when(self.last_attempt_at),
            "delivered_at": when(self.delivered_at),
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
        }


def list_deliveries(
    db: Database, *, status: str | None = None, account_id: str | None = None, limit: int = 50
) -> list[DeliveryView]:
    """Deliveries newest first, optionally of one status or account."""
    d, e = WebhookDelivery, WebhookEvent
    query = (
        select(
            d.id, d.event_id, e.type, e.account_id, e.created_at, d.endpoint, d.status, d.attempts, d.next_attempt_at,
            d.last_attempt_at, d.delivered_at, d.last_status_code, d.last_error,
        )
        .join(e, e.id == d.event_id)
        .order_by(d.id.desc())
        .limit(limit)
    )  # fmt: skip
    if status is not None:
        query = query.where(d.status == status)
    if account_id is not None:
        query = query.where(e.account_id == account_id)
    with db.reading() as session:
        rows = session.execute(query).all()
    views = [DeliveryView(**row._asdict()) for row in rows]
    return [v if v.status == WebhookStatus.PENDING else replace(v, next_attempt_at=None) for v in views]


# --- what operators see: status, /healthz and /metrics ----------------------------------------------------------

UNSENT = (WebhookStatus.PENDING, WebhookStatus.SENDING, WebhookStatus.FAILED)


def delivery_backlog(db: Database, endpoints: Sequence[str] = ()) -> dict[tuple[str, str], int]:
    """Deliveries not delivered, by (endpoint, status): what /metrics shows; 0 for each of `endpoints` without any."""
    with db.reading() as session:
        rows = session.execute(
            select(WebhookDelivery.endpoint, WebhookDelivery.status, func.count())
            .where(WebhookDelivery.status.in_(UNSENT))
            .group_by(WebhookDelivery.endpoint, WebhookDelivery.status)
        ).all()
    zeros = {(endpoint, str(status)): 0 for endpoint in endpoints for status in UNSENT}
    return zeros | {(endpoint, str(status)): int(count) for endpoint, status, count in rows}


@dataclass(frozen=True, slots=True)
class Undelivered:
    """Deliveries of one endpoint that failed for good, or that have waited too long (`recharged status`)."""

    endpoint: str
    status: str  # failed | late
    count: int
    oldest: datetime  # the oldest of their events
    last_error: str | None


def undelivered(session: Session, late_before: datetime) -> list[Undelivered]:
    """Per endpoint: deliveries failed for good, and deliveries still pending whose event was written before
    `late_before` (the endpoint has been failing or the daemon is not sending)."""
    found = []
    for status, condition in (
        ("failed", WebhookDelivery.status == WebhookStatus.FAILED),
        (
            "late",
            WebhookDelivery.status.in_((WebhookStatus.PENDING, WebhookStatus.SENDING))
            & (WebhookEvent.created_at < late_before),
        ),
    ):
        rows = session.execute(
            select(
                WebhookDelivery.endpoint, func.count(), func.min(WebhookEvent.created_at), func.max(WebhookDelivery.id)
            )
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(condition)
            .group_by(WebhookDelivery.endpoint)
            .order_by(WebhookDelivery.endpoint)
        ).all()
        for endpoint, count, oldest, last_id in rows:
            error = session.scalar(select(WebhookDelivery.last_error).where(WebhookDelivery.id == last_id))
            found.append(Undelivered(endpoint, status, int(count), oldest, error))
    return found


def webhooks_check(db: Database, now: datetime) -> dict[str, Any]:
    """/healthz's `webhooks:deliveries` check: deliveries that failed for good (warn: the CRM missed events) and
    those waiting, from the database (no call to any endpoint)."""
    counts = delivery_backlog(db)
    failed = sum(n for (_, status), n in counts.items() if status == WebhookStatus.FAILED)
    waiting = sum(n for (_, status), n in counts.items() if status != WebhookStatus.FAILED)
    with db.reading() as session:
        late = [u for u in undelivered(session, now - timedelta(hours=1)) if u.status == "late"]
    endpoints = sorted({endpoint for (endpoint, status) in counts if status == WebhookStatus.FAILED})
    output = f"{failed} failed for good" + (f" (endpoints {', '.join(endpoints)})" if endpoints else "")
    output += f", {waiting} waiting" + (f", {sum(u.count for u in late)} for over an hour" if late else "")
    return {
        "componentType": "system",
        "status": "warn" if failed or late else "pass",
        "observedValue": failed,
        "observedUnit": "deliveries failed",
        "output": output,
    }
