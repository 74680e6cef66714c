"""What the next recharge cycle would do for each account, and why.

One pass: a GROUP BY over the per-day usage totals for each averaging window in use, the spend-cap totals,
then the accounts streamed in id order through `balance.decide`. It never reads individual calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from recharged.balance import AccountFigures, AccountPlan, Window, decide
from recharged.config import Settings
from recharged.store.charging import accounts_with_open_recharge, accounts_with_usable_source
from recharged.store.engine import Database
from recharged.store.ledger import POLICY_COLUMNS, charged_since, plan_rows, usage_totals, window_lengths
from recharged.store.models import Account


def plan_accounts(
    db: Database, settings: Settings, at: datetime, ids: Sequence[str] | None = None
) -> Iterator[AccountPlan]:
    """Decisions for every account (or the given ones) at time `at`, in account id order."""
    with db.reading() as session:
        yield from plans_in(session, settings, at, ids)


def plans_in(
    session: Session, settings: Settings, at: datetime, ids: Sequence[str] | None = None
) -> Iterator[AccountPlan]:
    """The same, inside a transaction the caller holds (the charge flow re-decides under the account lock)."""
    default = settings.recharge.policy()
    windows = {days: Window.before(at, days) for days in window_lengths(session, default.window_days, ids)}
    totals = {days: usage_totals(session, w.start.date(), w.end.date(), ids) for days, w in windows.items()}
    last_day = charged_since(session, at - timedelta(days=1), at, ids)
    last_30_days = charged_since(session, at - timedelta(days=30), at, ids)
    with_source = accounts_with_usable_source(session, ids)
    in_progress = accounts_with_open_recharge(session, ids)
    vat_percents = _vat_percents(session, ids)
    for row in plan_rows(session, ids):
        overrides = {name: getattr(row, name) for name in POLICY_COLUMNS}
        policy = default.overridden(overrides) if any(v is not None for v in overrides.values()) else default
        figures = AccountFigures(
            currency=row.currency,
            balance=row.balance,
            created_at=row.created_at,
            first_usage_at=row.first_usage_at,
            window_usage=totals[policy.window_days].get(row.id, 0),
            auto_recharge=row.auto_recharge,
            policy=policy,
            charged_last_day=last_day.get(row.id, 0),
            charged_last_30_days=last_30_days.get(row.id, 0),
            state=row.recharge_state,
            retry_at=row.retry_at,
            has_funding_source=row.id in with_source,
            in_progress=row.id in in_progress,
            vat_percent=vat_percents.get(row.id, Decimal(0)),
        )
        yield AccountPlan(
            row.id, row.currency, row.auto_recharge, policy, windows[policy.window_days], decide(figures, at)
        )


def _vat_percents(session: Session, ids: Sequence[str] | None) -> dict[str, Decimal]:
    """Each account's VAT percent (the processor's limits apply to a charge plus VAT), for those that charge VAT:
    `plan_rows` does not read it."""
    query = select(Account.id, Account.vat_percent)
    if ids is not None:
        query = query.where(Account.id.in_(ids))
    return {account_id: vat for account_id, vat in session.execute(query) if vat}
