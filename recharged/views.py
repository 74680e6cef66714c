"""Read views of recharges, ledger entries and the audit trail, as plain JSON values, paged by id: what the
HTTP API lists (and what a command could print). Amounts are decimal strings in the currency's units with the
ledger's five decimals; times are ISO 8601 in UTC.

A page is `limit` rows after the row `starting_after` (an id the caller got from the page before), newest first,
with `has_more` when the next page holds any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from recharged.accounts import load_account
from recharged.cards import card_label
from recharged.errors import InputError, NotFoundError
from recharged.money import format_ledger
from recharged.states import AttemptStatus, Phase
from recharged.store.charging import last_attempt_with
from recharged.store.engine import Database
from recharged.store.models import AuditRecord, ChargeAttempt, Entry, FundingSource, Receipt, Recharge

MAX_PAGE = 100


@dataclass(frozen=True, slots=True)
class Page:
    data: list[dict[str, Any]]
    has_more: bool


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _page(session: Session, query: Select[Any], column: Any, limit: int, starting_after: int | None) -> list[Any]:
    if not 1 <= limit <= MAX_PAGE:
        raise InputError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    if starting_after is not None:
        query = query.where(column < starting_after)
    return list(session.scalars(query.order_by(column.desc()).limit(limit + 1)))


def recharge_json(session: Session, recharge: Recharge) -> dict[str, Any]:
    """One recharge: its phase, amounts, card, receipt and (automatic ones) the decision it was claimed on."""
    source = session.get(FundingSource, recharge.source_id) if recharge.source_id is not None else None
    receipt = session.scalars(select(Receipt.number).where(Receipt.recharge_id == recharge.id)).one_or_none()
    attempt = session.scalars(
        select(ChargeAttempt).where(ChargeAttempt.recharge_id == recharge.id).order_by(ChargeAttempt.id.desc())
    ).first()
    # as the recharge's failure decided it: a card needed the customer and no other could pay
    waiting = last_attempt_with(session, recharge.id, AttemptStatus.ACTION_REQUIRED)
    action = waiting is not None and recharge.phase == Phase.FAILED
    return {
        "id": recharge.id,
        "account_id": recharge.account_id,
        "kind": str(recharge.kind),
        "phase": str(recharge.phase),
        "currency": recharge.currency,
        "amount": format_ledger(recharge.amount),
        "vat": format_ledger(recharge.vat),
        "total": format_ledger(recharge.total),
        "vat_percent": str(recharge.vat_percent),
        "card": None if source is None else card_label(source),
        "funding_source": recharge.source_id,
        "payment_intent": recharge.payment_intent
        or (waiting.payment_intent if action and waiting else attempt.payment_intent if attempt else None),
        "receipt": receipt,
        "outcome": recharge.outcome,
        "actor": recharge.actor,
        "requires_action": action,
        "decision": recharge.decision,
        "limited_by": recharge.limited_by,
        "created_at": _iso(recharge.created_at),
        "updated_at": _iso(recharge.updated_at),
    }


def get_recharge(db: Database, recharge_id: int) -> dict[str, Any]:
    with db.reading() as session:
        recharge = session.get(Recharge, recharge_id)
        if recharge is None:
            raise NotFoundError(f"no recharge {recharge_id}")
        return recharge_json(session, recharge)


def list_recharges(db: Database, account_id: str, *, limit: int = 20, starting_after: int | None = None) -> Page:
    with db.reading() as session:
        load_account(session, account_id)
        query = select(Recharge).where(Recharge.account_id == account_id)
        rows = _page(session, query, Recharge.id, limit, starting_after)
        return Page([recharge_json(session, r) for r in rows[:limit]], len(rows) > limit)


def entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "type": str(entry.entry_type),
        "external_id": entry.external_id,
        "amount": format_ledger(entry.amount),
        "occurred_at": _iso(entry.occurred_at),
        "recorded_at": _iso(entry.recorded_at),
        "kind": entry.kind,
        "duration_seconds": entry.duration_seconds,
        "quantity": entry.quantity,
        "note": entry.note,
        "reference": entry.reference,
    }


def list_entries(db: Database, account_id: str, *, limit: int = 20, starting_after: int | None = None) -> Page:
    """The account's ledger, newest entry first; its currency is the account's."""
    with db.reading() as session:
        load_account(session, account_id)
        rows = _page(session, select(Entry).where(Entry.account_id == account_id), Entry.id, limit, starting_after)
        return Page([entry_json(e) for e in rows[:limit]], len(rows) > limit)


def audit_json(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "account_id": record.account_id,
        "at": _iso(record.at),
        "actor": record.actor,
        "via": record.via,
        "action": record.action,
        "before": record.before,
        "after": record.after,
    }


def list_audit(db: Database, account_id: str, *, limit: int = 20, starting_after: int | None = None) -> Page:
    """Who changed what on the account, newest first: the signer, the API token (`via`), before and after."""
    with db.reading() as session:
        load_account(session, account_id)
        query = select(AuditRecord).where(AuditRecord.account_id == account_id)
        rows = _page(session, query, AuditRecord.id, limit, starting_after)
        return Page([audit_json(r) for r in rows[:limit]], len(rows) > limit)


def page_of(rows: Sequence[dict[str, Any]], key: str, limit: int, starting_after: str | None) -> Page:
    """A page of a short list already read in full (receipts, cards), in its own order, after `starting_after`."""
    if not 1 <= limit <= MAX_PAGE:
        raise InputError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    start = 0
    if starting_after is not None:
        keys = [str(row[key]) for row in rows]
        if starting_after not in keys:
            raise InputError(f"starting_after {starting_after!r} is not in this list")
        start = keys.index(starting_after) + 1
    return Page(list(rows[start : start + limit]), start + limit < len(rows))
