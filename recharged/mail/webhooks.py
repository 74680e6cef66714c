"""Events out to the CRM, the write side: each event is written in the same transaction as what it reports, by
the code that decides it (the charge flow, the inbox of processor events, receipts, statements, the recharge
plan's conditions), so a cause that rolls back takes its event with it and one that commits cannot lose it. The
sender (`webhook_sender.py`) routes each new event to the configured endpoints that take its type, one delivery
each (`webhook_deliveries.py`), then signs and delivers them.

An event's body is what the endpoint receives, fixed when the event is written:

    {"id": "evt_...", "type": "recharge.succeeded", "created_at": "2026-11-22T12:00:00Z", "account_id": "acme",
     "data": {...}}

with amounts as decimal strings in the ledger's form ("84.00000") beside their "currency", as the HTTP API
shows them.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from recharged.balance import POLICY_FIELDS, AccountPlan
from recharged.money import Units, format_ledger
from recharged.states import WebhookEventType
from recharged.store.engine import insert_once
from recharged.store.models import (
    Account,
    AuditRecord,
    ChargeAttempt,
    FundingSource,
    NoticeEpisode,
    Receipt,
    Recharge,
    WebhookEvent,
)

T = WebhookEventType


def new_event_id() -> str:
    """evt_ and 32 hex digits: the wall clock's nanoseconds, then random ones, so ids sort in the order written (as
    UUIDv7 does; the injected clock may stand still) and never repeat."""
    return f"evt_{time.time_ns():016x}{secrets.token_hex(8)}"


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def emit(
    session: Session,
    event_type: WebhookEventType,
    *,
    account_id: str,
    data: dict[str, Any],
    at: datetime,
    key: str | None = None,
) -> bool:
    """Write an event in the caller's transaction; one event per `key` (False: there is one already). Without a
    key, the event is one of a kind (its id is its key)."""
    event_id = new_event_id()
    body = {"id": event_id, "type": event_type.value, "created_at": iso(at), "account_id": account_id, "data": data}
    values = {
        "id": event_id,
        "key": key or event_id,
        "type": event_type,
        "account_id": account_id,
        "created_at": at,
        "body": json.dumps(body, separators=(",", ":")),
    }
    return insert_once(session, WebhookEvent, values, ["key"])


# --- what each event says ---------------------------------------------------------------------------------------


def _account(session: Session, account_id: str) -> Account:
    account = session.get(Account, account_id)
    assert account is not None
    return account


def _auto_recharge(account: Account) -> dict[str, Any]:
    return {"enabled": account.auto_recharge, "state": str(account.recharge_state), "reason": account.state_reason}


def _card(source: FundingSource | None) -> dict[str, Any] | None:
    if source is None:
        return None
    return {"source_id": source.id, "brand": source.brand, "last4": source.last4}


def _payment(session: Session, recharge: Recharge) -> dict[str, Any]:
    """A recharge as every event about it shows it: what was credited, its VAT and what the card was charged."""
    receipt = session.scalar(select(Receipt.number).where(Receipt.recharge_id == recharge.id))
    source = session.get(FundingSource, recharge.source_id) if recharge.source_id is not None else None
    return {
        "recharge_id": recharge.id,
        "kind": str(recharge.kind),
        "currency": recharge.currency,
        "amount": format_ledger(recharge.amount),
        "vat": format_ledger(recharge.vat),
        "total": format_ledger(recharge.total),
        "payment_intent": recharge.payment_intent,
        "receipt": receipt,
        "card": _card(source),
    }


def recharge_succeeded(session: Session, recharge: Recharge, receipt: Receipt, at: datetime) -> None:
    """A recharge was credited (automatic or a one-time purchase): with its receipt, in the credit's transaction."""
    data = {
        **_payment(session, recharge),
        "receipt": receipt.number,
        "balance_after": format_ledger(receipt.balance_after),
    }
    key = f"{T.RECHARGE_SUCCEEDED}:{recharge.id}"
    emit(session, T.RECHARGE_SUCCEEDED, account_id=recharge.account_id, data=data, at=at, key=key)


FAILURE_REASONS = {"declined": "declined", "error": "integration_error", "abandoned": "no_payment_found"}


def recharge_failed(session: Session, recharge: Recharge, at: datetime) -> None:
    """A recharge failed and nothing was charged: every card declined, none could be tried, the processor refused
    our request, or no payment was found for it. Call after the account's retry state is updated."""
    last = session.scalars(
        select(ChargeAttempt).where(ChargeAttempt.recharge_id == recharge.id).order_by(ChargeAttempt.id.desc()).limit(1)
    ).first()
    account = _account(session, recharge.account_id)
    retry_at = account.retry_at if recharge.kind == "auto" and account.recharge_state == "backing_off" else None
    data = {
        **_payment(session, recharge),
        "reason": "no_funding_source" if last is None else FAILURE_REASONS.get(str(last.status), str(last.status)),
        "decline_code": None if last is None else last.decline_code or last.code,
        "next_try_at": None if retry_at is None else iso(retry_at),
        "auto_recharge": _auto_recharge(account),
    }
    key = f"{T.RECHARGE_FAILED}:{recharge.id}"
    emit(session, T.RECHARGE_FAILED, account_id=recharge.account_id, data=data, at=at, key=key)


def recharge_action_required(session: Session, recharge: Recharge, attempt_id: int, at: datetime) -> None:
    """The card needs the customer to authenticate the payment (the CRM can let them, with the PaymentIntent)."""
    attempt = session.get(ChargeAttempt, attempt_id)
    assert attempt is not None
    data = {
        **_payment(session, recharge),
        "payment_intent": attempt.payment_intent,
        "card": _card(session.get(FundingSource, attempt.source_id)),
        "auto_recharge": _auto_recharge(_account(session, recharge.account_id)),
    }
    key = f"{T.RECHARGE_ACTION_REQUIRED}:{recharge.id}"
    emit(session, T.RECHARGE_ACTION_REQUIRED, account_id=recharge.account_id, data=data, at=at, key=key)


def auto_recharge_suspended(session: Session, recharge: Recharge, at: datetime) -> None:
    """The retry schedule ran out with the failure of `recharge`: automatic recharge waits for an admin."""
    account = _account(session, recharge.account_id)
    data = {
        "recharge_id": recharge.id,
        "failed_cycles": account.failed_cycles,
        "auto_recharge": _auto_recharge(account),
    }
    key = f"{T.AUTO_RECHARGE_SUSPENDED}:{recharge.id}"
    emit(session, T.AUTO_RECHARGE_SUSPENDED, account_id=account.id, data=data, at=at, key=key)


AUTO_RECHARGE_SETTINGS = ("auto_recharge", "recharge_state", *POLICY_FIELDS)


def auto_recharge_changed(session: Session, record: AuditRecord) -> None:
    """An admin changed automatic recharge settings (audited in `record`): each one from its value before to its
    value after (amounts as decimal strings, None: as configured). Nothing when no such setting changed."""
    before, after = record.before or {}, record.after or {}
    changes = {
        name: {"before": before.get(name), "after": after[name]}
        for name in AUTO_RECHARGE_SETTINGS
        if name in after and before.get(name) != after[name]
    }
    if not changes:
        return
    session.flush()  # the audit record's id makes the key
    account = _account(session, record.account_id)
    data = {"actor": record.actor, "changes": changes, "auto_recharge": _auto_recharge(account)}
    key = f"{T.AUTO_RECHARGE_CHANGED}:audit:{record.id}"
    emit(session, T.AUTO_RECHARGE_CHANGED, account_id=account.id, data=data, at=record.at, key=key)


def funding_source_unusable(session: Session, source: FundingSource, at: datetime) -> None:
    """A card can no longer be charged until it is replaced or reactivated: a hard decline, the processor removed
    it, or the processor does not hold it."""
    data = {
        **(_card(source) or {}),
        "exp_month": source.exp_month,
        "exp_year": source.exp_year,
        "default": source.is_default,
        "reason": source.unusable_reason,
    }
    emit(session, T.FUNDING_SOURCE_UNUSABLE, account_id=source.account_id, data=data, at=at)


def _given_back(session: Session, recharge: Recharge, amount: Units, balance_change: Units) -> dict[str, Any]:
    """Money moved after a payment: `amount` of the charge (VAT included) and what it did to the balance."""
    return {
        "currency": recharge.currency,
        "amount": format_ledger(amount),
        "balance_change": format_ledger(balance_change),
        "payment": _payment(session, recharge),
    }


def refund_created(
    session: Session, recharge: Recharge, refund_id: str, given_back: Units, balance_change: Units, at: datetime
) -> None:
    """A refund of `given_back` (VAT included) went to the card and took `balance_change` off the balance."""
    data = {"refund_id": refund_id, **_given_back(session, recharge, given_back, balance_change)}
    key = f"{T.REFUND_CREATED}:{refund_id}"
    emit(session, T.REFUND_CREATED, account_id=recharge.account_id, data=data, at=at, key=key)


def dispute_created(
    session: Session,
    recharge: Recharge,
    dispute_id: str,
    amount: Units,
    balance_change: Units,
    reason: str | None,
    at: datetime,
) -> None:
    """The cardholder disputed a payment and the bank took its funds back (automatic recharge is paused)."""
    data = {
        "dispute_id": dispute_id,
        "reason": reason,
        **_given_back(session, recharge, amount, balance_change),
        "auto_recharge": _auto_recharge(_account(session, recharge.account_id)),
    }
    key = f"{T.DISPUTE_CREATED}:{dispute_id}"
    emit(session, T.DISPUTE_CREATED, account_id=recharge.account_id, data=data, at=at, key=key)


def dispute_closed(
    session: Session,
    recharge: Recharge,
    dispute_id: str,
    status: str,
    amount: Units,
    balance_change: Units,
    at: datetime,
) -> None:
    """A dispute was decided: `won` (its funds reinstated: `balance_change` is back on the balance) or `lost`.
    Once per dispute, however often its events are handled."""
    data = {"dispute_id": dispute_id, "status": status, **_given_back(session, recharge, amount, balance_change)}
    key = f"{T.DISPUTE_CLOSED}:{dispute_id}"
    emit(session, T.DISPUTE_CLOSED, account_id=recharge.account_id, data=data, at=at, key=key)


def statement_issued(session: Session, account: Account, month: date, content: dict[str, Any], at: datetime) -> None:
    """An account's monthly statement was issued (`statement ACCOUNT --month` and the API show it)."""
    data = {
        "month": f"{month:%Y-%m}",
        "currency": account.currency,
        "opening_balance": format_ledger(content["opening"]),
        "closing_balance": format_ledger(content["closing"]),
    }
    key = f"{T.STATEMENT_ISSUED}:{account.id}:{month:%Y-%m}"
    emit(session, T.STATEMENT_ISSUED, account_id=account.id, data=data, at=at, key=key)


# --- conditions the recharge plan shows -------------------------------------------------------------------------

# Conditions told to the CRM, each an episode (a notice_episodes row) from the plan that first shows it to the one
# that shows it over. Kept apart from the customer notices' episodes by their prefix.
EPISODE_PREFIX = "webhook:"
LOW, DEPLETED, CAPPED = (f"{EPISODE_PREFIX}{t}" for t in (T.BALANCE_LOW, T.BALANCE_DEPLETED, T.CAP_REACHED))


def _plan_data(plan: AccountPlan) -> dict[str, Any]:
    d = plan.decision
    return {
        "currency": plan.currency,
        "balance": format_ledger(d.balance),
        "threshold": format_ledger(d.threshold),
        "average_daily": format_ledger(d.average_daily),
        "runway_days": None if d.runway_days is None else str(d.runway_days),
        "auto_recharge": {"enabled": plan.auto_recharge, "decision": d.reason},
    }


def _transitions(plan: AccountPlan) -> dict[str, bool | None]:
    """For each condition: True when it holds (its episode starts if none is open), False when it is over (an open
    episode ends), None when the plan says neither (a balance under its line that a charge is about to lift)."""
    d = plan.decision
    attended = d.action == "charge" or d.reason == "recharge_in_progress"
    below, depleted = d.balance < d.threshold, d.balance <= 0
    return {
        LOW: (True if not attended else None) if below else False,
        DEPLETED: (True if not attended else None) if depleted else False,
        CAPPED: d.reason == "cap_reached",
    }


def from_plans(session: Session, plans: Iterable[AccountPlan], at: datetime) -> int:
    """Events for what the recharge plans show, once per episode: balance.low (under the threshold with automatic
    recharge off or failing) and balance.recovered when back at or above it, balance.depleted (at or below zero,
    likewise), cap.reached (a spend cap stops automatic recharge). Returns the events written.

    Safe to call from several workers at once: an episode is a row with a primary key, and only the worker that
    inserts (or deletes) it writes the event."""
    # a closed account is told nothing, and its open episodes stay as they were (it may be reopened)
    wanted = {p.account_id: p for p in plans if p.decision.reason != "closed"}
    if not wanted:
        return 0
    open_episodes: dict[str, set[str]] = {}
    for account_id, kind in session.execute(
        select(NoticeEpisode.account_id, NoticeEpisode.kind).where(NoticeEpisode.kind.in_((LOW, DEPLETED, CAPPED)))
    ):
        open_episodes.setdefault(account_id, set()).add(kind)
    written = 0
    for account_id, plan in wanted.items():
        known = open_episodes.get(account_id, set())
        for kind, holds in _transitions(plan).items():
            if holds and kind not in known:
                values = {"account_id": account_id, "kind": kind, "since": at}
                if insert_once(session, NoticeEpisode, values, ["account_id", "kind"]):
                    written += _episode_started(session, plan, kind, at)
            elif holds is False and kind in known:
                gone = session.execute(
                    delete(NoticeEpisode).where(NoticeEpisode.account_id == account_id, NoticeEpisode.kind == kind)
                )
                if gone.rowcount and kind == LOW:  # type: ignore[attr-defined]
                    emit(session, T.BALANCE_RECOVERED, account_id=account_id, data=_plan_data(plan), at=at)
                    written += 1
    return written


def _episode_started(session: Session, plan: AccountPlan, kind: str, at: datetime) -> int:
    data = _plan_data(plan)
    if kind == CAPPED:
        cap = plan.decision.limited_by or "max_charged_per_30_days"
        limit = getattr(plan.policy, cap, None)
        data |= {"cap": cap, "limit": None if limit is None else format_ledger(limit)}
    event_type = WebhookEventType(kind.removeprefix(EPISODE_PREFIX))
    return int(emit(session, event_type, account_id=plan.account_id, data=data, at=at))
