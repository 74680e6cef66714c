"""The reads behind `recharged status`, `accounts history`, statements and `reconcile`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, literal_column, select
from sqlalchemy.orm import Session

from recharged.clock import midnight
from recharged.states import (
    CLOSED_PHASES,
    CREDIT_TYPES,
    REVERSAL_TYPES,
    AttemptStatus,
    EntryType,
    OutboxStatus,
    Phase,
    RechargeState,
)
from recharged.store.models import (
    Account,
    ChargeAttempt,
    DailyUsage,
    Entry,
    FundingSource,
    OutboxMessage,
    Receipt,
    Recharge,
)

# --- status, account history and reconciliation (`recharged status`, `accounts history`, `reconcile`) ---------

# Inline, so the partial index on non-usage entries applies.
_USAGE_INLINE: Any = literal_column(f"'{EntryType.USAGE.value}'")
_IN_CHUNK = 500  # ids per IN (...) list


def recharges_finished_since(session: Session, since: datetime) -> list[tuple[str, int, int, int]]:
    """Recharges finished at or after `since`, per currency: (currency, count, credited, charged)."""
    query = (
        select(Recharge.currency, func.count(), func.sum(Recharge.amount), func.sum(Recharge.total))
        .where(Recharge.phase == Phase.FINISHED, Recharge.updated_at >= since)
        .group_by(Recharge.currency)
        .order_by(Recharge.currency)
    )
    return [(row[0], int(row[1]), int(row[2]), int(row[3])) for row in session.execute(query)]


def accounts_not_ok(session: Session) -> list[Account]:
    """Accounts whose automatic recharge is not in the ok state, in id order."""
    return list(session.scalars(select(Account).where(Account.recharge_state != RechargeState.OK).order_by(Account.id)))


def accounts_needing_attention(session: Session) -> dict[RechargeState, int]:
    """Open accounts that need a person, counted in one GROUP BY: by the state of their automatic recharge when it
    is not ok; under RechargeState.OK, those with automatic recharge on and no card that can be charged."""
    usable_card = (
        select(FundingSource.id)
        .where(
            FundingSource.account_id == Account.id,
            FundingSource.removed_at.is_(None),
            FundingSource.unusable_reason.is_(None),
        )
        .exists()
    )
    query = (
        select(Account.recharge_state, func.count())
        .where(
            Account.closed_at.is_(None),
            (Account.recharge_state != RechargeState.OK) | (Account.auto_recharge.is_(True) & ~usable_card),
        )
        .group_by(Account.recharge_state)
    )
    return {RechargeState(state): int(count) for state, count in session.execute(query)}


def outbox_backlog(session: Session) -> dict[OutboxStatus, tuple[int, datetime | None]]:
    """Messages not sent yet, in one GROUP BY: per status (pending, sending, failed), how many and when the oldest
    was queued."""
    unsent = (OutboxStatus.PENDING, OutboxStatus.SENDING, OutboxStatus.FAILED)
    query = (
        select(OutboxMessage.status, func.count(), func.min(OutboxMessage.created_at))
        .where(OutboxMessage.status.in_(unsent))
        .group_by(OutboxMessage.status)
    )
    return {OutboxStatus(status): (int(count), oldest) for status, count, oldest in session.execute(query)}


def accounts_in_state(session: Session, state: RechargeState) -> list[str]:
    """The ids of the accounts whose automatic recharge is in `state`, in id order."""
    return list(session.scalars(select(Account.id).where(Account.recharge_state == state).order_by(Account.id)))


def unusable_sources(session: Session) -> list[FundingSource]:
    """Cards on file (not removed) that a hard decline made unusable, by account."""
    query = (
        select(FundingSource)
        .where(FundingSource.removed_at.is_(None), FundingSource.unusable_reason.is_not(None))
        .order_by(FundingSource.account_id, FundingSource.id)
    )
    return list(session.scalars(query))


def undelivered_mail(session: Session, pending_before: datetime) -> list[tuple[str, int, datetime, str | None]]:
    """Emails failed for good, and emails still pending that were queued before `pending_before`:
    (status, count, oldest queued at, the latest error) per status."""

    late = (OutboxMessage.status == OutboxStatus.FAILED) | (
        (OutboxMessage.status == OutboxStatus.PENDING) & (OutboxMessage.created_at < pending_before)
    )
    groups = session.execute(
        select(OutboxMessage.status, func.count(), func.min(OutboxMessage.created_at))
        .where(late)
        .group_by(OutboxMessage.status)
        .order_by(OutboxMessage.status)
    ).all()
    found = []
    for status, count, oldest in groups:
        error = session.scalar(
            select(OutboxMessage.last_error)
            .where(late, OutboxMessage.status == status, OutboxMessage.last_error.is_not(None))
            .order_by(OutboxMessage.last_attempt_at.desc(), OutboxMessage.id.desc())
            .limit(1)
        )
        found.append((str(status), int(count), oldest, error))
    return found


def open_recharges_claimed_before(session: Session, created_before: datetime) -> list[Recharge]:
    """Recharges still open that were claimed before `created_before`, oldest first."""
    query = (
        select(Recharge)
        .where(Recharge.phase.not_in(CLOSED_PHASES), Recharge.created_at < created_before)
        .order_by(Recharge.created_at, Recharge.id)
    )
    return list(session.scalars(query))


def usage_days(session: Session, account_id: str, start: date, end: date) -> list[DailyUsage]:
    """An account's per-day usage totals over the UTC days [start, end), by day and kind."""
    query = (
        select(DailyUsage)
        .where(DailyUsage.account_id == account_id, DailyUsage.day >= start, DailyUsage.day < end)
        .order_by(DailyUsage.day, DailyUsage.kind)
    )
    return list(session.scalars(query))


def ledger_sum_before(session: Session, account_id: str, day: date) -> int:
    """The sum of an account's ledger entries that occurred before the UTC day `day`: its balance at that
    midnight. Usage entries are summed through their per-day totals (which `verify` proves equal), the others
    read through their own index."""
    start = midnight(day)
    others = session.scalar(
        select(func.coalesce(func.sum(Entry.amount), 0)).where(
            Entry.account_id == account_id, Entry.entry_type != _USAGE_INLINE, Entry.occurred_at < start
        )
    )
    usage = session.scalar(
        select(func.coalesce(func.sum(DailyUsage.amount), 0)).where(
            DailyUsage.account_id == account_id, DailyUsage.day < day
        )
    )
    return int(others or 0) - int(usage or 0)


def non_usage_entries(session: Session, account_id: str, since: datetime, until: datetime) -> list[Entry]:
    """An account's credits, adjustments and opening balance entries that occurred in [since, until)."""
    query = (
        select(Entry)
        .where(
            Entry.account_id == account_id,
            Entry.entry_type != _USAGE_INLINE,
            Entry.occurred_at >= since,
            Entry.occurred_at < until,
        )
        .order_by(Entry.occurred_at, Entry.id)
    )
    return list(session.scalars(query))


def account_recharges(session: Session, account_id: str, since: datetime, until: datetime) -> list[Recharge]:
    """An account's recharges claimed in [since, until), oldest first."""
    query = (
        select(Recharge)
        .where(Recharge.account_id == account_id, Recharge.created_at >= since, Recharge.created_at < until)
        .order_by(Recharge.created_at, Recharge.id)
    )
    return list(session.scalars(query))


def account_currencies(session: Session, ids: Sequence[str]) -> dict[str, str]:
    """The currency of each of the given accounts that exists."""
    return dict(session.execute(select(Account.id, Account.currency).where(Account.id.in_(ids))).all())


def processor_customers(session: Session) -> list[str]:
    """The processor's customers behind our funding sources (removed ones included: they were charged)."""
    return list(session.scalars(select(FundingSource.customer).distinct().order_by(FundingSource.customer)))


def customers_in_use(session: Session, since: datetime) -> set[str]:
    """The processor's customers we may still charge (a usable card on file) or charged since `since`."""
    usable = select(FundingSource.customer).where(
        FundingSource.removed_at.is_(None), FundingSource.unusable_reason.is_(None)
    )
    charged = (
        select(FundingSource.customer)
        .join(Recharge, Recharge.source_id == FundingSource.id)
        .where(Recharge.created_at >= since)
    )
    return set(session.scalars(usable.union(charged)))


def source_customers(session: Session, source_ids: Sequence[int]) -> dict[int, str]:
    """The processor's customer of each of the given funding sources."""
    wanted = sorted(set(source_ids))
    found: dict[int, str] = {}
    for i in range(0, len(wanted), _IN_CHUNK):
        query = select(FundingSource.id, FundingSource.customer).where(FundingSource.id.in_(wanted[i : i + _IN_CHUNK]))
        found.update((int(source), customer) for source, customer in session.execute(query))
    return found


def credits_for(session: Session, since: datetime, payment_intents: Sequence[str]) -> list[Entry]:
    """Ledger credits of charges (recharge and top-up entries) that occurred at or after `since`, and those of
    the given PaymentIntents whenever they occurred."""
    found = {
        e.id: e
        for e in session.scalars(select(Entry).where(Entry.entry_type.in_(CREDIT_TYPES), Entry.occurred_at >= since))
    }
    ids = sorted(set(payment_intents))
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        query = select(Entry).where(Entry.entry_type.in_(CREDIT_TYPES), Entry.external_id.in_(chunk))
        found.update((e.id, e) for e in session.scalars(query))
    return sorted(found.values(), key=lambda e: (e.occurred_at, e.id))


def adjustments_referencing(session: Session, since: datetime, payment_intents: Sequence[str]) -> list[Entry]:
    """Manual adjustments whose reference (`recharged adjust --reference pi_...`) is a PaymentIntent: those of the
    given ones whenever they occurred, and any that occurred at or after `since` whose reference looks like one."""
    looks_like = Entry.reference.like("pi\\_%", escape="\\")
    found = {
        e.id: e
        for e in session.scalars(
            select(Entry).where(Entry.entry_type == EntryType.ADJUSTMENT, Entry.occurred_at >= since, looks_like)
        )
    }
    ids = sorted(set(payment_intents))
    for i in range(0, len(ids), _IN_CHUNK):
        query = select(Entry).where(
            Entry.entry_type == EntryType.ADJUSTMENT, Entry.reference.in_(ids[i : i + _IN_CHUNK])
        )
        found.update((e.id, e) for e in session.scalars(query))
    return sorted(found.values(), key=lambda e: (e.occurred_at, e.id))


def reversals_for(session: Session, since: datetime, object_ids: Sequence[str]) -> list[Entry]:
    """Ledger reversals (refund, dispute, reinstated entries) that occurred at or after `since`, and those of the
    given refunds and disputes (`re_...`, `re_...:failed`, `du_...`) whenever they occurred."""
    found = {
        e.id: e
        for e in session.scalars(select(Entry).where(Entry.entry_type.in_(REVERSAL_TYPES), Entry.occurred_at >= since))
    }
    ids = sorted({*object_ids, *(f"{i}:failed" for i in object_ids)})
    for i in range(0, len(ids), _IN_CHUNK):
        query = select(Entry).where(Entry.entry_type.in_(REVERSAL_TYPES), Entry.external_id.in_(ids[i : i + _IN_CHUNK]))
        found.update((e.id, e) for e in session.scalars(query))
    return sorted(found.values(), key=lambda e: (e.occurred_at, e.id))


def recharges_by_id(session: Session, ids: Sequence[int]) -> dict[int, Recharge]:
    """The recharges with the given ids that exist."""
    wanted = sorted(set(ids))
    found: dict[int, Recharge] = {}
    for i in range(0, len(wanted), _IN_CHUNK):
        query = select(Recharge).where(Recharge.id.in_(wanted[i : i + _IN_CHUNK]))
        found.update((r.id, r) for r in session.scalars(query))
    return found


def recharges_paid_by(session: Session, payment_intents: Sequence[str]) -> dict[str, Recharge]:
    """The recharges recorded as paid by the given PaymentIntents, by PaymentIntent."""
    ids = sorted(set(payment_intents))
    found: dict[str, Recharge] = {}
    for i in range(0, len(ids), _IN_CHUNK):
        query = select(Recharge).where(Recharge.payment_intent.in_(ids[i : i + _IN_CHUNK]))
        found.update((r.payment_intent or "", r) for r in session.scalars(query))
    return found


def balances(session: Session, ids: Sequence[str] | None = None) -> dict[str, int]:
    """Each account's cached balance (verify proves it equals the sum of its entries)."""
    query = select(Account.id, Account.balance)
    if ids is not None:
        query = query.where(Account.id.in_(ids))
    return {account_id: int(balance) for account_id, balance in session.execute(query)}


@dataclass(frozen=True, slots=True)
class Activity:
    """What happened to each account, for the demo's summary: finished recharges (count and total charged),
    declined attempts, receipts, notices (every email but receipts), the recharge state, and each finished
    recharge's (account, time, amount credited) in order."""

    charges: dict[str, int]
    charged: dict[str, int]
    declines: dict[str, int]
    receipts: dict[str, int]
    notices: dict[str, int]
    states: dict[str, RechargeState]
    lifts: list[tuple[str, datetime, int]]


def account_activity(session: Session) -> Activity:
    def per_account(query: Any) -> dict[str, Any]:
        return dict(session.execute(query).all())

    finished = Recharge.phase == Phase.FINISHED
    by_account = Recharge.account_id
    return Activity(
        charges=per_account(select(by_account, func.count()).where(finished).group_by(by_account)),
        charged=per_account(select(by_account, func.sum(Recharge.total)).where(finished).group_by(by_account)),
        declines=per_account(
            select(by_account, func.count())
            .join(ChargeAttempt, ChargeAttempt.recharge_id == Recharge.id)
            .where(ChargeAttempt.status == AttemptStatus.DECLINED)
            .group_by(by_account)
        ),
        receipts=per_account(select(Receipt.account_id, func.count()).group_by(Receipt.account_id)),
        notices=per_account(
            select(OutboxMessage.account_id, func.count())
            .where(OutboxMessage.kind != "receipt")
            .group_by(OutboxMessage.account_id)
        ),
        states=per_account(select(Account.id, Account.recharge_state)),
        lifts=[
            (account, at, int(amount))
            for account, at, amount in session.execute(
                select(by_account, Recharge.created_at, Recharge.amount).where(finished).order_by(Recharge.id)
            )
        ],
    )


def integration_errors_since(session: Session, since: datetime) -> list[ChargeAttempt]:
    """Charge attempts since `since` that the processor refused as malformed (ours, not the card's), newest first."""
    query = (
        select(ChargeAttempt)
        .where(ChargeAttempt.status == AttemptStatus.ERROR, ChargeAttempt.created_at >= since)
        .order_by(ChargeAttempt.id.desc())
    )
    return list(session.scalars(query))


def last_settled_attempt(session: Session) -> ChargeAttempt | None:
    """The charge attempt settled last, whatever its outcome (it tells whether charging works right now)."""
    query = (
        select(ChargeAttempt)
        .where(ChargeAttempt.finished_at.is_not(None))
        .order_by(ChargeAttempt.finished_at.desc(), ChargeAttempt.id.desc())
        .limit(1)
    )
    return session.scalars(query).one_or_none()


def failing_recoveries(session: Session) -> list[Recharge]:
    """Open recharges whose recovery failed and is backing off."""
    query = select(Recharge).where(Recharge.recovery_failures > 0, Recharge.phase.not_in(CLOSED_PHASES))
    return list(session.scalars(query.order_by(Recharge.id)))


# --- the accounts' life cycle (`accounts list`, `search`, `export`, `close`; what a closed account is spared) ---

ACCOUNT_LISTING = (
    Account.id,
    Account.email,
    Account.plan,
    Account.currency,
    Account.balance,
    Account.auto_recharge,
    Account.recharge_state,
    Account.closed_at,
    Account.closed_reason,
)


def like_pattern(text: str) -> str:
    """A LIKE pattern matching values that contain `text` as it is: its `%`, `_` and `\\` match themselves
    (escape character `\\`)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def account_listing(
    session: Session,
    *,
    closed: bool | None = None,
    plan: str | None = None,
    currency: str | None = None,
    containing: str | None = None,
    chunk: int = 1_000,
) -> Iterator[Any]:
    """Accounts as plain rows (ACCOUNT_LISTING's columns), streamed in id order: open or closed ones only
    (`closed`), on one plan, in one currency, or whose id or email contains `containing` (any case)."""
    query = select(*ACCOUNT_LISTING).order_by(Account.id)
    if closed is not None:
        query = query.where(Account.closed_at.is_not(None) if closed else Account.closed_at.is_(None))
    if plan is not None:
        query = query.where(Account.plan == plan)
    if currency is not None:
        query = query.where(Account.currency == currency)
    if containing is not None:
        pattern = like_pattern(containing)
        query = query.where(Account.id.ilike(pattern, escape="\\") | Account.email.ilike(pattern, escape="\\"))
    yield from session.execute(query.execution_options(yield_per=chunk))


def accounts_to_export(
    session: Session, chunk: int = 1_000
) -> Iterator[tuple[Account, int | None, FundingSource | None]]:
    """Every account with its opening balance (None: none brought over) and its default card on file (None: none),
    streamed in id order, `chunk` accounts at a time."""
    query = (
        select(Account, Entry.amount, FundingSource)
        .outerjoin(
            Entry,
            (Entry.entry_type == EntryType.OPENING)
            & (Entry.external_id == Account.id)
            & (Entry.account_id == Account.id),
        )
        .outerjoin(
            FundingSource,
            (FundingSource.account_id == Account.id) & FundingSource.is_default & FundingSource.removed_at.is_(None),
        )
        .order_by(Account.id)
    )
    yield from session.execute(query.execution_options(yield_per=chunk))


def open_recharge_of(session: Session, account_id: str) -> Recharge | None:
    """The account's open recharge (there is at most one), if any."""
    query = select(Recharge).where(Recharge.account_id == account_id, Recharge.phase.not_in(CLOSED_PHASES))
    return session.scalars(query).one_or_none()


# --- the configuration against the data (`check-config`, the daemon's start and reload) -----------------------


def plans_in_use(session: Session) -> list[tuple[str, str, int, str]]:
    """(plan, currency, accounts, first account id) for each plan and currency the accounts use."""
    query = (
        select(Account.plan, Account.currency, func.count(), func.min(Account.id))
        .group_by(Account.plan, Account.currency)
        .order_by(Account.plan, Account.currency)
    )
    return [(plan, currency, int(count), first) for plan, currency, count, first in session.execute(query)]


def kinds_in_use(session: Session, since: date) -> list[tuple[str, str, str]]:
    """(plan, kind, an account id) for each usage kind recorded on or after `since`, per plan of the accounts."""
    query = (
        select(Account.plan, DailyUsage.kind, func.min(Account.id))
        .join(Account, Account.id == DailyUsage.account_id)
        .where(DailyUsage.day >= since)
        .group_by(Account.plan, DailyUsage.kind)
        .order_by(Account.plan, DailyUsage.kind)
    )
    return [(plan, kind, account) for plan, kind, account in session.execute(query)]
