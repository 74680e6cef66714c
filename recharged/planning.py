"""What the next recharge cycle would do for each account, and why.

One pass: one statement streams the accounts in id order with their usage over each averaging window in use
(summed by the database from the per-day totals; it never reads individual calls), beside a few small lookups
(the spend-cap totals, the cards with a usable source or resting after declines, the open recharges); each
account then goes through `balance.decide` with its plan's policy (config's [recharge], its currency's amounts,
the plan's own settings) and its own overrides. The Python per account is kept small: rows are unpacked by
position, and a policy is built once per plan and set of overrides, not once per account.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from recharged.balance import AccountFigures, AccountPlan, Policy, Window, decide
from recharged.clock import start_of_day
from recharged.config import Settings
from recharged.errors import ConfigError
from recharged.store.charging import (
    accounts_with_open_recharge,
    accounts_with_usable_source,
    cards_resting_until,
    charged_since,
)
from recharged.store.engine import Database
from recharged.store.ledger import PLAN_COLUMNS, POLICY_COLUMNS, plan_rows, posted_after, usage_total, window_choices

_NO_VAT = Decimal(0)
# A row of `plan_rows`, by position: the id, then the plan and the account's own policy settings (its policy's key),
# then the figures of its decision, then its usage over each window.
_POLICY_KEY = slice(1, 2 + len(POLICY_COLUMNS))
_FIGURES = slice(_POLICY_KEY.stop, len(PLAN_COLUMNS))
_USAGE = len(PLAN_COLUMNS)


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
    policies = _Policies(settings)
    lengths = sorted({policies.window_days(plan, days) for plan, days in window_choices(session, ids)})
    windows = [Window.before(at, days) for days in lengths]
    column = {days: n for n, days in enumerate(lengths)}  # which usage sum of a row is the window's
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
    for row in plan_rows(session, start_of_day(at).date(), lengths, ids):
        account_id = row[0]
        currency, balance, reserved, created, first_usage, auto_recharge, state, retry_at, vat, closed = row[_FIGURES]
        if as_of and created > at:
            continue  # not an account yet
        policy, known = policies.of(row[_POLICY_KEY])
        n = column.get(policy.window_days)
        if n is not None:
            window, usage = windows[n], row[_USAGE + n]
        else:  # a window taken up after `window_choices` read them (PostgreSQL reads each statement afresh)
            window = Window.before(at, policy.window_days)
            usage = usage_total(session, account_id, window.start.date(), window.end.date())
        figures = AccountFigures(
            currency=currency,
            # money held for calls in progress counts as spent (a fully reserved balance is due); what was held
            # at a past instant is not kept, so a plan as of then sees the ledger alone
            balance=balance - later.get(account_id, 0) - (0 if as_of else reserved),
            created_at=created,
            first_usage_at=first_usage,
            window_usage=usage,
            auto_recharge=auto_recharge,
            policy=policy,
            charged_last_day=last_day.get(account_id, 0),
            charged_last_30_days=last_30_days.get(account_id, 0),
            state=state,
            retry_at=retry_at,
            has_funding_source=account_id in with_source,
            cards_resting_until=resting.get(account_id),
            in_progress=account_id in in_progress,
            vat_percent=vat or _NO_VAT,  # the caps and the processor's limits apply to a charge plus VAT
        )
        decision = decide(figures, at)
        if not known:  # the account's plan is no longer in config.toml: nothing is charged until it is
            decision = replace(decision, action="skip", reason="no_policy", charge_amount=0, limited_by=None)
        if closed is not None and closed <= at:  # closed by an admin (`accounts close`): never charged
            decision = replace(
                decision, action="skip", reason="closed", charge_amount=0, limited_by=None, next_try_at=None
            )
        yield AccountPlan(account_id, currency, auto_recharge, policy, window, decision)


class _Policies:
    """The policy of each plan and set of an account's own settings, built once: (policy, whether the plan is in
    the configuration). A plan that is not gets the built-in defaults, and its accounts are never charged."""

    def __init__(self, settings: Settings) -> None:
        self._plans = {name: _plan_policy(settings, name) for name in settings.plans}
        self._built: dict[tuple[Any, ...], tuple[Policy, bool]] = {}

    def of(self, key: tuple[Any, ...]) -> tuple[Policy, bool]:
        """`key`: the plan, then the account's own settings in `POLICY_COLUMNS` order (None: the plan's)."""
        built = self._built.get(key)
        if built is None:
            base = self._plans.get(key[0])
            overrides = dict(zip(POLICY_COLUMNS, key[1:], strict=True))
            built = self._built[key] = ((base or Policy()).overridden(overrides), base is not None)
        return built

    def window_days(self, plan: str, own: int | None) -> int:
        return self.of((plan, own, *(None for _ in POLICY_COLUMNS[1:])))[0].window_days


def _plan_policy(settings: Settings, plan: str) -> Policy | None:
    try:
        return settings.policy_of(plan)
    except ConfigError:  # load_settings refuses this; a Settings built in code may still hold it
        return None
