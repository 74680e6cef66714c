"""What the next recharge cycle would do for each account, and why.

One pass: a GROUP BY over the per-day usage totals for each averaging window in use, the spend-cap totals,
the cards resting after declines, then the accounts streamed in id order through `balance.decide`, each with
its plan's policy (config's [recharge], its currency's amounts, the plan's own settings) and its own overrides.
It never reads individual calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from recharged.balance import AccountFigures, AccountPlan, Policy, Window, decide
from recharged.clock import as_utc
from recharged.config import Settings
from recharged.errors import ConfigError
from recharged.store.charging import (
    accounts_with_open_recharge,
    accounts_with_usable_source,
    cards_resting_until,
    charged_since,
)
from recharged.store.engine import Database
from recharged.store.ledger import POLICY_COLUMNS, plan_rows, posted_after, usage_totals, window_lengths
from recharged.store.models import Account
from recharged.store.reads import closed_by


def plan_accounts(
    db: Database, settings: Settings, at: datetime, ids: Sequence[str] | None = None, *, as_of: bool = False
) -> Iterator[AccountPlan]:
    """Decisions for every account (or the given ones) at time `at`, in account id order."""
    with db.reading() as session:
        yield from plans_in(session, settings, at, ids, as_of=as_of)


def plans_in(
    session: Session, settings: Settings, at: datetime, ids: Sequence[str] | None = None, *, as_of: bool = False
) -> Iterator[AccountPlan]:
    """The same, inside a transaction the caller holds (the charge flow re-decides under the account lock, so
    the spend caps count every recharge claimed before it, up to now).

    With `as_of`, the plan as it stood at `at` (a view of the past, never a charge): balances from the ledger as
    of `at` (entries that occurred later taken off), the caps counting recharges claimed before `at`, the
    recharges open then, and only the accounts that existed then. Without it, the decision a charge takes: today's
    balance and every recharge claimed so far, with the usage window as of `at`."""
    plan_policies = {name: _plan_policy(settings, name) for name in settings.plans}
    lengths = {settings.recharge.window_days}
    lengths |= {policy.window_days for policy in plan_policies.values() if policy is not None}
    lengths |= set(window_lengths(session, settings.recharge.window_days, ids))
    windows = {days: Window.before(at, days) for days in sorted(lengths)}
    totals = {days: usage_totals(session, w.start.date(), w.end.date(), ids) for days, w in windows.items()}
    until = at if as_of else None
    last_day = charged_since(session, at - timedelta(days=1), ids, until=until)
    last_30_days = charged_since(session, at - timedelta(days=30), ids, until=until)
    later = posted_after(session, at, ids) if as_of else {}
    with_source = accounts_with_usable_source(session, ids)
    payments = settings.payments
    resting = cards_resting_until(
        session,
        at,
        timedelta(hours=payments.card_retry_after_decline_hours),
        payments.max_declines_per_card_30_days,
        ids,
    )
    in_progress = accounts_with_open_recharge(session, ids, at=until)
    vat_percents = _vat_percents(session, ids)
    closed = closed_by(session, at, ids)
    for row in plan_rows(session, ids):
        if as_of and as_utc(row.created_at) > at:
            continue  # not an account yet
        base = plan_policies.get(row.plan)
        overrides = {name: getattr(row, name) for name in POLICY_COLUMNS}
        policy = (base or Policy()).overridden(overrides)
        figures = AccountFigures(
            currency=row.currency,
            # money held for calls in progress counts as spent (a fully reserved balance is due); what was held
            # at a past instant is not kept, so a plan as of then sees the ledger alone
            balance=row.balance - later.get(row.id, 0) - (0 if as_of else row.reserved),
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
            cards_resting_until=resting.get(row.id),
            in_progress=row.id in in_progress,
            vat_percent=vat_percents.get(row.id, Decimal(0)),
        )
        decision = decide(figures, at)
        if base is None:  # the account's plan is no longer in config.toml: nothing is charged until it is
            decision = replace(decision, action="skip", reason="no_policy", charge_amount=0, limited_by=None)
        if row.id in closed:  # closed by an admin (`accounts close`): never charged
            decision = replace(
                decision, action="skip", reason="closed", charge_amount=0, limited_by=None, next_try_at=None
            )
        yield AccountPlan(row.id, row.currency, row.auto_recharge, policy, windows[policy.window_days], decision)


def _plan_policy(settings: Settings, plan: str) -> Policy | None:
    try:
        return settings.policy_of(plan)
    except ConfigError:  # load_settings refuses this; a Settings built in code may still hold it
        return None


def _vat_percents(session: Session, ids: Sequence[str] | None) -> dict[str, Decimal]:
    """Each account's VAT percent (the processor's limits apply to a charge plus VAT), for those that charge VAT:
    `plan_rows` does not read it."""
    query = select(Account.id, Account.vat_percent)
    if ids is not None:
        query = query.where(Account.id.in_(ids))
    return {account_id: vat for account_id, vat in session.execute(query) if vat}
