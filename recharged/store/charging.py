"""Charging: recharge claims and their advisory locks, leases, attempts, and which cards may be charged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Row, and_, func, select, text, update
from sqlalchemy.orm import Session

from recharged.clock import as_utc
from recharged.states import CLOSED_PHASES, AttemptStatus, Phase, RechargeKind
from recharged.store.engine import dialect_insert
from recharged.store.models import (
    RECHARGE_OPEN,
    Account,
    ChargeAttempt,
    FundingSource,
    Recharge,
)

# --- charging -----------------------------------------------------------------------------------------------


def insert_recharge(session: Session, values: Mapping[str, Any]) -> int | None:
    """Claim a recharge; None when the account already has an open one (the partial unique index says so: the
    insert does nothing, in one statement, with no savepoint)."""
    statement = (
        dialect_insert(session, Recharge.__table__)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["account_id"], index_where=text(RECHARGE_OPEN))
        .returning(Recharge.id)
    )
    recharge_id = session.execute(statement).scalar_one_or_none()
    return None if recharge_id is None else int(recharge_id)


@dataclass(frozen=True, slots=True)
class LockedRecharge:
    """A recharge locked for a phase change, with its account and its card (None before it has one), loaded with it.
    The session keeps loaded objects only while they are referenced: hold this, and `session.get` finds them
    without a statement."""

    recharge: Recharge
    account: Account
    source: FundingSource | None


def lock_recharge_with(session: Session, recharge_id: int) -> LockedRecharge:
    """Lock a recharge for a phase change: its account row first, then the recharge, in one statement (PostgreSQL
    locks the rows in the order FOR UPDATE OF names them; SQLite holds the write lock). Every transaction that
    changes a recharge takes the locks in this order, as claiming does, so they cannot deadlock. Its account and its
    card come with it."""
    query = (
        select(Recharge, Account, FundingSource)
        .join(Account, Account.id == Recharge.account_id)
        .outerjoin(FundingSource, FundingSource.id == Recharge.source_id)
        .where(Recharge.id == recharge_id)
        .with_for_update(of=(Account, Recharge))
    )
    recharge, account, source = session.execute(query).one()
    return LockedRecharge(recharge, account, source)


def lock_recharge(session: Session, recharge_id: int) -> Recharge:
    """`lock_recharge_with`, for a caller that needs the recharge alone."""
    return lock_recharge_with(session, recharge_id).recharge


def finish_recharge(
    session: Session, recharge_id: int, now: datetime
) -> Row[str, RechargeKind, int, int, str, str | None] | None:
    """credited -> finished, in one statement that takes the recharge's row lock alone (holding no other lock while
    it waits, it cannot deadlock with the account-then-recharge order). What the log says of the recharge; None when
    it was not credited (finished by another worker)."""
    statement = (
        update(Recharge)
        .where(Recharge.id == recharge_id, Recharge.phase == Phase.CREDITED)
        .values(phase=Phase.FINISHED, updated_at=now)
        .returning(
            Recharge.account_id,
            Recharge.kind,
            Recharge.amount,
            Recharge.total,
            Recharge.currency,
            Recharge.payment_intent,
        )
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).one_or_none()


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


def accounts_with_open_recharge(
    session: Session, ids: Sequence[str] | None = None, *, at: datetime | None = None
) -> set[str]:
    """Accounts with a recharge open now, or with `at`, open at that time: claimed by then, and still open or
    last changed (closed) after it."""
    query = select(Recharge.account_id).where(Recharge.phase.not_in(CLOSED_PHASES))
    if at is not None:
        query = select(Recharge.account_id).where(
            Recharge.created_at <= at, Recharge.phase.not_in(CLOSED_PHASES) | (Recharge.updated_at > at)
        )
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


def charged_since(
    session: Session, since: datetime, ids: Sequence[str] | None = None, *, until: datetime | None = None
) -> dict[str, int]:
    """What cards were charged (amount plus VAT) per account by automatic recharges claimed at or after `since`
    that can still take money or took it (claimed, in flight or finished; not failed): what the spend caps
    count. By claim time and, for a charge, with no upper bound, so a recharge claimed or recovered a moment ago
    counts; `until` bounds it for a view of the past."""
    query = (
        select(Recharge.account_id, func.sum(Recharge.total))
        .where(Recharge.kind == RechargeKind.AUTO, Recharge.phase != Phase.FAILED, Recharge.created_at >= since)
        .group_by(Recharge.account_id)
    )
    if until is not None:
        query = query.where(Recharge.created_at < until)
    if ids is not None:
        query = query.where(Recharge.account_id.in_(ids))
    return {account: int(total) for account, total in session.execute(query)}


def cards_resting_until(
    session: Session, at: datetime, cooldown: timedelta, max_declines_30d: int, ids: Sequence[str] | None = None
) -> dict[str, datetime]:
    """The accounts whose every usable card is resting after declines at `at` (as `candidate_sources` rests
    them: `max_declines_30d` declines in 30 days, or one within `cooldown`), with the moment after which the
    first of their cards may be charged again."""
    month = timedelta(days=30)
    declined = and_(
        ChargeAttempt.source_id == FundingSource.id,
        ChargeAttempt.status == AttemptStatus.DECLINED,
        ChargeAttempt.created_at >= at - max(month, cooldown),
    )
    query = (  # each usable card with its recent declines, oldest first (none: one row with no time)
        select(FundingSource.id, FundingSource.account_id, ChargeAttempt.created_at)
        .outerjoin(ChargeAttempt, declined)
        .where(FundingSource.removed_at.is_(None), FundingSource.unusable_reason.is_(None))
        .order_by(ChargeAttempt.created_at)
    )
    if ids is not None:
        query = query.where(FundingSource.account_id.in_(ids))
    account_of: dict[int, str] = {}
    declines: dict[int, list[datetime]] = {}
    for source_id, account_id, created_at in session.execute(query):
        account_of[source_id] = account_id
        if created_at is not None:
            declines.setdefault(source_id, []).append(as_utc(created_at))
    usable_after: dict[str, list[datetime | None]] = {}  # per account, per card: None when usable at `at`
    for source_id, account_id in account_of.items():
        times = declines.get(source_id, [])
        recent = [t for t in times if t >= at - month]
        until = [times[-1] + cooldown] if times else []
        if len(recent) >= max_declines_30d:  # rests until enough of the month's declines have aged out
            until.append(recent[len(recent) - max_declines_30d] + month)
        latest = max(until, default=None)
        usable_after.setdefault(account_id, []).append(None if latest is None or latest < at else latest)
    return {
        account_id: min(cast(list[datetime], times))
        for account_id, times in usable_after.items()
        if all(t is not None for t in times)
    }


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
