"""verify's integrity checks: balances against the ledger, rated usage, recharge phases, uniqueness."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import String, func, select, type_coerce
from sqlalchemy.orm import Session

from recharged.states import CLOSED_PHASES, CREDIT_TYPES, AttemptStatus, EntryType, Phase, RechargeState
from recharged.store.models import (
    Account,
    ChargeAttempt,
    Entry,
    FundingSource,
    Rate,
    Recharge,
)


def balance_mismatches(session: Session) -> list[tuple[str, int, int]]:
    """Accounts whose cached balance differs from the sum of their ledger entries: (id, cached, sum)."""
    sums = select(Entry.account_id, func.sum(Entry.amount).label("total")).group_by(Entry.account_id).subquery()
    total = func.coalesce(sums.c.total, 0)
    query = (
        select(Account.id, Account.balance, total)
        .outerjoin(sums, sums.c.account_id == Account.id)
        .where(Account.balance != total)
        .order_by(Account.id)
    )
    return [(row[0], int(row[1]), int(row[2])) for row in session.execute(query)]


def usage_entries_with_rates(session: Session, chunk: int = 20_000) -> Iterator[Any]:
    """Every usage entry with the rate snapshot that priced it (NULL rate: pre-rated), streamed."""
    query = (
        select(
            Entry.external_id,
            Entry.account_id,
            Entry.kind,
            Entry.occurred_at,
            Entry.duration_seconds,
            Entry.quantity,
            Entry.billable_quantity,
            Entry.amount,
            Entry.rate_id,
            Rate.measure,
            Rate.price,
            Rate.increment_seconds,
            Rate.minimum_seconds,
            Rate.connect_fee,
            Rate.unit,
        )
        .outerjoin(Rate, Rate.id == Entry.rate_id)
        .where(Entry.entry_type == EntryType.USAGE)
    )
    yield from session.execute(query.execution_options(yield_per=chunk))


def recharge_credit_problems(session: Session) -> list[str]:
    """Charging invariants: every credited recharge has exactly its ledger credit, every charge credit
    belongs to a credited recharge, and no recharge has more than one succeeded attempt."""
    credited = select(Recharge).where(Recharge.phase.in_((Phase.CREDITED, Phase.FINISHED)))
    credits = {e.external_id: e for e in session.scalars(select(Entry).where(Entry.entry_type.in_(CREDIT_TYPES)))}
    problems = []
    for recharge in session.scalars(credited):
        entry = credits.pop(recharge.payment_intent or "", None)
        if entry is None:
            problems.append(
                f"recharge {recharge.id}: {recharge.phase} but no ledger credit for {recharge.payment_intent}"
            )
        elif (entry.account_id, entry.amount) != (recharge.account_id, recharge.amount):
            problems.append(
                f"recharge {recharge.id}: credit {entry.external_id} is {entry.amount} to {entry.account_id}"
            )
    problems += [f"credit {pi}: no credited recharge paid by it" for pi in credits]
    doubles = session.execute(
        select(ChargeAttempt.recharge_id, func.count())
        .where(ChargeAttempt.status == AttemptStatus.SUCCEEDED)
        .group_by(ChargeAttempt.recharge_id)
        .having(func.count() > 1)
    )
    problems += [f"recharge {recharge_id}: {n} succeeded attempts" for recharge_id, n in doubles]
    return problems


def recharge_phase_problems(session: Session) -> list[str]:
    """Each recharge's phase agrees with its attempts: charging has exactly one pending attempt and nothing
    else has one; paid, credited and finished have one succeeded attempt for their PaymentIntent; failed and
    claimed have none; an account's recharge state has the fields it needs."""
    problems: list[str] = []
    attempts: dict[int, list[ChargeAttempt]] = {}
    for attempt in session.scalars(select(ChargeAttempt)):
        attempts.setdefault(attempt.recharge_id, []).append(attempt)
    for recharge in session.scalars(select(Recharge).order_by(Recharge.id)):
        mine = attempts.get(recharge.id, [])
        pending = [a for a in mine if a.status == AttemptStatus.PENDING]
        succeeded = [a for a in mine if a.status == AttemptStatus.SUCCEEDED]
        where = f"recharge {recharge.id} ({recharge.phase})"
        if recharge.phase == Phase.CHARGING and len(pending) != 1:
            problems.append(f"{where}: {len(pending)} pending attempts, expected exactly one")
        if recharge.phase != Phase.CHARGING and pending:
            problems.append(f"{where}: has a pending attempt outside the charging phase")
        if recharge.phase in (Phase.PAID, Phase.CREDITED, Phase.FINISHED):
            if len(succeeded) != 1 or succeeded[0].payment_intent != recharge.payment_intent:
                problems.append(f"{where}: expected one succeeded attempt for {recharge.payment_intent}")
        elif succeeded:
            problems.append(f"{where}: a succeeded attempt but the recharge was never paid")
        if recharge.total < recharge.amount or recharge.amount <= 0:
            problems.append(f"{where}: amount {recharge.amount} and total {recharge.total} do not add up")
    # Read as plain text: a value outside the vocabulary (written around recharged) is reported, not raised.
    state = type_coerce(Account.recharge_state, String)
    for account_id, value, retry_at in session.execute(
        select(Account.id, state, Account.retry_at).where(state != RechargeState.OK.value)
    ):
        if value not in set(RechargeState):
            problems.append(f"account {account_id}: unknown recharge state {value!r}")
        elif value == RechargeState.BACKING_OFF and retry_at is None:
            problems.append(f"account {account_id}: backing off without a retry time")
    return problems


def uniqueness_problems(session: Session) -> list[str]:
    """What the database's unique indexes promise, checked again (an index dropped by hand, a restore from a
    dump without them): one ledger entry per origin, one open recharge and one default source per account."""
    problems = [
        f"ledger: {n} entries for {entry_type} {external_id}"
        for entry_type, external_id, n in session.execute(
            select(Entry.entry_type, Entry.external_id, func.count())
            .group_by(Entry.entry_type, Entry.external_id)
            .having(func.count() > 1)
        )
    ]
    problems += [
        f"account {account_id}: {n} open recharges"
        for account_id, n in session.execute(
            select(Recharge.account_id, func.count())
            .where(Recharge.phase.not_in(CLOSED_PHASES))
            .group_by(Recharge.account_id)
            .having(func.count() > 1)
        )
    ]
    problems += [
        f"account {account_id}: {n} default funding sources"
        for account_id, n in session.execute(
            select(FundingSource.account_id, func.count())
            .where(FundingSource.is_default, FundingSource.removed_at.is_(None))
            .group_by(FundingSource.account_id)
            .having(func.count() > 1)
        )
    ]
    return problems
