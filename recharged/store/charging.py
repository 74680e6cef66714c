"""Charging: recharge claims and their advisory locks, leases, attempts, and which cards may be charged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recharged.states import CLOSED_PHASES, AttemptStatus, Phase
from recharged.store.ledger import lock_account
from recharged.store.models import (
    ChargeAttempt,
    FundingSource,
    Recharge,
)

# --- charging -----------------------------------------------------------------------------------------------


def insert_recharge(session: Session, values: Mapping[str, Any]) -> int | None:
    """Claim a recharge; None when the account already has an open one (the partial unique index says so)."""
    try:
        with session.begin_nested():
            recharge_id = session.execute(insert(Recharge).values(**values).returning(Recharge.id)).scalar_one()
    except IntegrityError:
        return None
    return int(recharge_id)


def lock_recharge(session: Session, recharge_id: int, account_id: str | None = None) -> Recharge:
    """Lock a recharge for a phase change: its account row first, then the recharge. Every transaction that
    changes a recharge takes the locks in this order, as claiming does, so they cannot deadlock. `account_id`
    is the recharge's account when the caller knows it (it never changes), saving a query."""
    if account_id is None:
        account_id = session.execute(select(Recharge.account_id).where(Recharge.id == recharge_id)).scalar_one()
    lock_account(session, account_id)
    recharge = session.execute(select(Recharge).where(Recharge.id == recharge_id).with_for_update()).scalar_one()
    return recharge


def take_lease(session: Session, recharge_id: int, now: datetime, until: datetime) -> bool:
    """Hold an open recharge while talking to the processor; False when another worker holds it."""
    result = session.execute(
        update(Recharge)
        .where(
            Recharge.id == recharge_id,
            Recharge.phase == Phase.CHARGING,
            (Recharge.lease_until.is_(None)) | (Recharge.lease_until < now),
        )
        .values(lease_until=until)
        .execution_options(synchronize_session=False)
    )
    return bool(cast(Any, result).rowcount)


def settle_attempt(session: Session, attempt_id: int, values: Mapping[str, Any]) -> bool:
    """Record an attempt's outcome once: False when another worker already did."""
    result = session.execute(
        update(ChargeAttempt)
        .where(ChargeAttempt.id == attempt_id, ChargeAttempt.status == AttemptStatus.PENDING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(cast(Any, result).rowcount)


def pending_attempt(session: Session, recharge_id: int) -> ChargeAttempt | None:
    return session.scalars(
        select(ChargeAttempt).where(
            ChargeAttempt.recharge_id == recharge_id, ChargeAttempt.status == AttemptStatus.PENDING
        )
    ).one_or_none()


def candidate_sources(
    session: Session, account_id: str, recharge_id: int, now: datetime, cooldown: timedelta, max_declines_30d: int
) -> list[FundingSource]:
    """Usable sources in charging order (default first), minus those this recharge tried and those resting
    after declines (at most `max_declines_30d` declines in 30 days, none within `cooldown`). An attempt set aside
    after processor trouble (abandoned: no payment was made under its key) does not count as tried."""
    tried = select(ChargeAttempt.source_id).where(
        ChargeAttempt.recharge_id == recharge_id, ChargeAttempt.status != AttemptStatus.ABANDONED
    )
    declines_30d = (
        select(func.count())
        .where(
            ChargeAttempt.source_id == FundingSource.id,
            ChargeAttempt.status == AttemptStatus.DECLINED,
            ChargeAttempt.created_at >= now - timedelta(days=30),
        )
        .scalar_subquery()
    )
    last_decline = (
        select(func.max(ChargeAttempt.created_at))
        .where(ChargeAttempt.source_id == FundingSource.id, ChargeAttempt.status == AttemptStatus.DECLINED)
        .scalar_subquery()
    )
    query = (
        select(FundingSource)
        .where(
            FundingSource.account_id == account_id,
            FundingSource.removed_at.is_(None),
            FundingSource.unusable_reason.is_(None),
            FundingSource.id.not_in(tried),
            declines_30d < max_declines_30d,
            (last_decline.is_(None)) | (last_decline < now - cooldown),
        )
        .order_by(FundingSource.is_default.desc(), FundingSource.id)
    )
    return list(session.scalars(query))


def open_recharge_ids(session: Session, now: datetime, idle_since: datetime | None = None) -> list[tuple[int, int]]:
    """Recharges left in an intermediate phase whose lease (if any) has run out and whose recovery is not backing
    off after failures, oldest first, with how many times their recovery failed in a row; with `idle_since`, only
    those not changed since then."""
    query = (
        select(Recharge.id, Recharge.recovery_failures)
        .where(Recharge.phase.not_in(CLOSED_PHASES))
        .where((Recharge.lease_until.is_(None)) | (Recharge.lease_until < now))
        .where((Recharge.recover_after.is_(None)) | (Recharge.recover_after <= now))
        .order_by(Recharge.id)
    )
    if idle_since is not None:
        query = query.where(Recharge.updated_at < idle_since)
    return [(recharge_id, int(failures)) for recharge_id, failures in session.execute(query)]


def recharge_of_payment(session: Session, payment_intent: str, recharge_hint: str | None) -> int | None:
    """The recharge a PaymentIntent belongs to: by the id recorded on the recharge or one of its attempts, or
    by the recharge id our metadata carries (an answer we never received)."""
    found = session.scalar(select(Recharge.id).where(Recharge.payment_intent == payment_intent))
    if found is None:
        found = session.scalar(
            select(ChargeAttempt.recharge_id).where(ChargeAttempt.payment_intent == payment_intent).limit(1)
        )
    if found is None and recharge_hint is not None and recharge_hint.isdigit():
        found = session.scalar(select(Recharge.id).where(Recharge.id == int(recharge_hint)))
    return None if found is None else int(found)


CLAIM_LOCK_SPACE = 0x52435244  # "RCRD": the advisory-lock key space of recharge claims


def try_claim_lock(session: Session, account_id: str, *, wait: bool) -> bool:
    """The right to claim a recharge for an account, until the transaction ends: on PostgreSQL a
    transaction-level advisory lock, so instances working through the same due accounts pass over the one
    another instance is claiming at that moment (without `wait`) instead of queueing behind it. SQLite has
    one writer at a time already."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    statement = f"SELECT {function}(:space, hashtext(:account))"
    result = session.execute(text(statement), {"space": CLAIM_LOCK_SPACE, "account": account_id}).scalar()
    return True if wait else bool(result)


def accounts_with_open_recharge(session: Session, ids: Sequence[str] | None = None) -> set[str]:
    query = select(Recharge.account_id).where(Recharge.phase.not_in(CLOSED_PHASES))
    if ids is not None:
        query = query.where(Recharge.account_id.in_(ids))
    return set(session.scalars(query))


def accounts_with_usable_source(session: Session, ids: Sequence[str] | None = None) -> set[str]:
    query = select(FundingSource.account_id).where(
        FundingSource.removed_at.is_(None), FundingSource.unusable_reason.is_(None)
    )
    if ids is not None:
        query = query.where(FundingSource.account_id.in_(ids))
    return set(session.scalars(query.distinct()))


def attempts_of(session: Session, recharge_id: int) -> int:
    query = select(func.count()).select_from(ChargeAttempt).where(ChargeAttempt.recharge_id == recharge_id)
    return int(session.scalar(query) or 0)


def last_attempt_with(session: Session, recharge_id: int, status: AttemptStatus) -> ChargeAttempt | None:
    """The recharge's latest attempt that ended with `status`, if any."""
    query = (
        select(ChargeAttempt)
        .where(ChargeAttempt.recharge_id == recharge_id, ChargeAttempt.status == status)
        .order_by(ChargeAttempt.id.desc())
        .limit(1)
    )
    return session.scalars(query).one_or_none()


def abandoned_attempts(session: Session, recharge_id: int) -> list[tuple[ChargeAttempt, FundingSource]]:
    """The recharge's abandoned attempts with their cards, newest first."""
    query = (
        select(ChargeAttempt, FundingSource)
        .join(FundingSource, FundingSource.id == ChargeAttempt.source_id)
        .where(ChargeAttempt.recharge_id == recharge_id, ChargeAttempt.status == AttemptStatus.ABANDONED)
        .order_by(ChargeAttempt.id.desc())
    )
    return [(attempt, source) for attempt, source in session.execute(query)]
