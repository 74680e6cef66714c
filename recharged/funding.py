"""Funding sources: the cards on file an account is charged on, default first, then backups in the order
added. Every change is signed by an admin and audited like the other billing settings."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from recharged.accounts import audit_change, load_account, parse_actor
from recharged.cards import CardInfo, card_label
from recharged.clock import Clock
from recharged.config import ADMIN_NOTICE_DELAY
from recharged.errors import ConflictError, InputError, NotFoundError
from recharged.mail import notices
from recharged.states import RechargeState
from recharged.store.engine import Database
from recharged.store.models import Account, FundingSource


def describe(source: FundingSource) -> dict[str, Any]:
    """A source as shown to admins and recorded in the audit log (no full card data exists here)."""
    return {
        "source": source.id,
        "card": card_label(source),
        "customer": source.customer,
        "payment_method": source.payment_method,
        "default": source.is_default,
        "unusable": source.unusable_reason,
    }


def active_sources(session: Session, account_id: str) -> list[FundingSource]:
    query = (
        select(FundingSource)
        .where(FundingSource.account_id == account_id, FundingSource.removed_at.is_(None))
        .order_by(FundingSource.is_default.desc(), FundingSource.id)
    )
    return list(session.scalars(query))


def _load(session: Session, account_id: str, source_id: int) -> FundingSource:
    source = session.get(FundingSource, source_id)
    if source is None or source.account_id != account_id or source.removed_at is not None:
        raise NotFoundError(f"account {account_id!r} has no funding source {source_id}")
    return source


def _clear_action_required(account: Account) -> None:
    """A new or updated card is what an account waiting for customer action needs: try again."""
    if account.recharge_state == RechargeState.ACTION_REQUIRED:
        account.recharge_state, account.state_reason = RechargeState.OK, None


def add_source(
    db: Database,
    account_id: str,
    card: CardInfo,
    *,
    actor: str,
    clock: Clock,
    make_default: bool = False,
    notice_delay: timedelta = ADMIN_NOTICE_DELAY,
) -> FundingSource:
    """Add a card (re-adding a removed or unusable one restores it). The first card becomes the default. The
    customer's notice waits `notice_delay` ([outbox] admin_notice_delay_minutes) for the account's next changes;
    so do those of the functions below."""
    actor = parse_actor(actor)
    if not (1 <= card.exp_month <= 12) or len(card.last4) != 4 or not card.last4.isdigit():
        raise InputError(f"card details look wrong: {card_label(card)}")
    now = clock.now()
    with db.transaction() as session:
        account = load_account(session, account_id, lock=True)
        current = active_sources(session, account_id)
        existing = session.scalars(
            select(FundingSource).where(
                FundingSource.account_id == account_id, FundingSource.payment_method == card.payment_method
            )
        ).one_or_none()
        if existing is not None and existing.removed_at is None and existing.unusable_reason is None:
            raise ConflictError(f"{card.payment_method} is already funding source {existing.id} of {account_id}")
        before = describe(existing) if existing is not None else None
        source = existing or FundingSource(account_id=account_id, added_at=now, is_default=False)
        source.hold(card)
        if make_default or not current:  # the first card is always the default
            for other in current:
                other.is_default = False
            session.flush()
            source.is_default = True
        session.add(source)
        session.flush()
        _clear_action_required(account)
        record = audit_change(session, account_id, actor, now, "source.added", before, describe(source))
        role = " (your default card)" if source.is_default else ""
        notices.cards_changed(session, record, "Card added", "-", notices.card_words(source) + role, delay=notice_delay)
        return source


def make_default(
    db: Database,
    account_id: str,
    source_id: int,
    *,
    actor: str,
    clock: Clock,
    notice_delay: timedelta = ADMIN_NOTICE_DELAY,
) -> None:
    actor = parse_actor(actor)
    now = clock.now()
    with db.transaction() as session:
        load_account(session, account_id, lock=True)
        source = _load(session, account_id, source_id)
        if source.is_default:
            return
        previous = next((s for s in active_sources(session, account_id) if s.is_default), None)
        if previous is not None:
            previous.is_default = False
            session.flush()
        source.is_default = True
        record = audit_change(
            session,
            account_id,
            actor,
            now,
            "source.default",
            {"default": previous.id if previous else None},
            {"default": source.id},
        )
        notices.cards_changed(
            session,
            record,
            "Default card",
            notices.card_words(previous),
            notices.card_words(source),
            delay=notice_delay,
        )


def remove_source(
    db: Database,
    account_id: str,
    source_id: int,
    *,
    actor: str,
    clock: Clock,
    notice_delay: timedelta = ADMIN_NOTICE_DELAY,
) -> FundingSource | None:
    """Remove a card; if it was the default, the first backup takes its place (returned)."""
    actor = parse_actor(actor)
    now = clock.now()
    with db.transaction() as session:
        load_account(session, account_id, lock=True)
        source = _load(session, account_id, source_id)
        before = describe(source)
        source.removed_at, was_default, source.is_default = now, source.is_default, False
        session.flush()
        promoted = None
        if was_default:
            promoted = next(iter(active_sources(session, account_id)), None)
            if promoted is not None:
                promoted.is_default = True
        record = audit_change(
            session, account_id, actor, now, "source.removed", before, {"default": promoted.id if promoted else None}
        )
        now_default = f"; your default card is now {notices.card_words(promoted)}" if promoted else ""
        notices.cards_changed(
            session, record, "Card removed", notices.card_words(source), "removed" + now_default, delay=notice_delay
        )
        return promoted


def reactivate_source(
    db: Database,
    account_id: str,
    source_id: int,
    *,
    actor: str,
    clock: Clock,
    notice_delay: timedelta = ADMIN_NOTICE_DELAY,
) -> None:
    """An admin says a card that was declined for good has been fixed (e.g. the bank lifted a block)."""
    actor = parse_actor(actor)
    now = clock.now()
    with db.transaction() as session:
        account = load_account(session, account_id, lock=True)
        source = _load(session, account_id, source_id)
        if source.unusable_reason is None:
            raise InputError(f"funding source {source_id} is usable already")
        before = describe(source)
        source.unusable_reason = None
        _clear_action_required(account)
        record = audit_change(session, account_id, actor, now, "source.reactivated", before, describe(source))
        notices.cards_changed(
            session,
            record,
            "Card can be charged again",
            "paused after a decline",
            notices.card_words(source),
            delay=notice_delay,
        )


def list_sources(db: Database, account_id: str) -> list[dict[str, Any]]:
    with db.reading() as session:
        load_account(session, account_id)
        return [describe(s) for s in active_sources(session, account_id)]
