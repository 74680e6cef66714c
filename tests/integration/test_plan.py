"""`plan` over real databases: windows at UTC day boundaries, young accounts, overrides."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from recharged.accounts import account_view, adjust_balance, change_account
from recharged.errors import NotFoundError
from recharged.funding import add_source
from recharged.payments import CardInfo
from recharged.planning import plan_accounts
from recharged.usage import UsageRecorder
from tests.helpers import add_account, call

AT = datetime.fromisoformat("2026-11-22T12:00:00+00:00")  # window: 2026-10-23 00:00 .. 2026-11-22 00:00


def one(db, settings, at=AT, account="acme"):
    return next(p for p in plan_accounts(db, settings, at) if p.account_id == account)


def test_window_is_the_30_full_utc_days_before_today(db, settings, clock):
    add_account(db, settings, clock, created_at="2026-01-01T00:00:00Z")
    UsageRecorder(db, settings, clock).record(
        [
            call("first-day", seconds=60, at="2026-10-23T00:00:00Z"),  # in: day 30 of the window
            call("too-old", seconds=600, at="2026-10-22T23:59:59Z"),  # out: day 31
            call("last-second", seconds=60, at="2026-11-21T23:59:59Z"),  # in: yesterday
            call("today", seconds=600, at="2026-11-22T00:00:00Z"),  # out: today is excluded
        ]
    )
    decision = one(db, settings).decision
    assert decision.history_days == 30
    # in-window usage: 2 x $0.02 = $0.04 over 30 days
    assert decision.average_daily == 133  # 4000 / 30 = 133.33 units
    assert decision.threshold == 500_000  # the $5.00 floor (0.04 x 7 / 30 is less)


def test_young_account_divides_by_the_time_its_usage_covers(db, settings, clock):
    add_account(db, settings, clock, created_at="2026-11-18T12:00:00Z", auto_recharge=True)
    add_source(db, "acme", CardInfo("cus_1", "pm_1", "visa", "4242", 12, 2030), actor="Jane Doe", clock=clock)
    UsageRecorder(db, settings, clock).record(
        [call(f"c{i}", seconds=60 * 50, at="2026-11-19T10:00:00Z") for i in range(7)]
    )
    decision = one(db, settings).decision
    # created 2026-11-18 12:00, today starts 2026-11-22 00:00: 3.5 days; usage 350 min x $0.02 = $7.00
    assert decision.history_days == Decimal("3.5")
    assert decision.average_daily == 200_000  # $2.00 a day (3 full days would make it $2.33)
    assert decision.threshold == 1_400_000  # 7 days: $14.00
    assert decision.recharge_amount == 2_800_000  # 14 days: $28.00
    # balance -$7.00 is $21.00 under the threshold; $28.00 lifts it to $21.00
    assert (decision.action, decision.reason, decision.charge_amount) == ("charge", "below_threshold", 2_800_000)


def test_history_counts_from_usage_older_than_the_account(db, settings, clock):
    add_account(db, settings, clock, created_at="2026-11-21T00:00:00Z")
    UsageRecorder(db, settings, clock).record([call("old", seconds=60, at="2026-11-01T10:00:00Z")])
    assert one(db, settings).decision.history_days == Decimal("20.58")  # 2026-11-01 10:00 .. 2026-11-22 00:00


def test_account_window_override_changes_the_average(db, settings, clock):
    add_account(db, settings, clock, created_at="2026-01-01T00:00:00Z")
    add_account(db, settings, clock, "other", created_at="2026-01-01T00:00:00Z")
    UsageRecorder(db, settings, clock).record(
        [
            call("a", seconds=60 * 150, at="2026-11-01T10:00:00Z"),
            call("b", account="other", seconds=60 * 150, at="2026-11-01T10:00:00Z"),
        ]
    )
    change_account(db, "acme", actor="Jane Doe", clock=clock, settings=settings, overrides={"window_days": "10"})
    assert one(db, settings).decision.average_daily == 0  # the call is 21 days old
    assert one(db, settings, account="other").decision.average_daily == 10_000  # $3.00 / 30


def test_auto_recharge_off_is_never_charged(db, settings, clock):
    add_account(db, settings, clock, opening_balance="-50")
    decision = one(db, settings).decision
    assert (decision.action, decision.reason) == ("skip", "auto_recharge_off")


def test_plan_reads_opening_balances(db, settings, clock):
    add_account(db, settings, clock, opening_balance="12.34567", auto_recharge=True)
    decision = one(db, settings).decision
    assert decision.balance == 1_234_567
    assert (decision.action, decision.reason) == ("skip", "no_funding_source")  # opted in, but no card yet


def test_a_plan_as_of_a_past_instant_uses_the_ledger_as_it_stood_then(db, settings, clock):
    """Issue 14, item 2: `plan --at` and `accounts show --at` combined the average as of that date with today's
    balance. As of T, the balance is the ledger's at T: later usage and adjustments are not in it, and an account
    created after T is not in the plan at all."""
    add_account(db, settings, clock, created_at="2026-10-01T00:00:00Z", opening_balance="150.00")
    add_account(db, settings, clock, "newer", created_at="2026-11-21T00:00:00Z")
    UsageRecorder(db, settings, clock).record(
        [
            call("before", seconds=60 * 100, at="2026-11-20T10:00:00Z"),  # $2.00, before T
            call("after", seconds=60 * 1000, at="2026-11-21T10:00:00Z"),  # $20.00, after T
        ]
    )
    adjust_balance(db, "acme", -5_000_000, reason="late fee", actor="Jane Doe", clock=clock)  # at NOW, after T
    at = datetime.fromisoformat("2026-11-20T23:00:00+00:00")
    [then] = list(plan_accounts(db, settings, at, as_of=True))
    assert (then.account_id, then.decision.balance) == ("acme", 14_800_000)  # $150.00 - $2.00
    now = {p.account_id: p.decision.balance for p in plan_accounts(db, settings, at)}
    assert now == {"acme": 7_800_000, "newer": 0}  # a charge decides on today's balance: $150 - $2 - $20 - $50
    view = account_view(db, settings, "acme", at, as_of=True)
    assert view.plan.decision.balance == 14_800_000
    with pytest.raises(NotFoundError, match=r"account 'newer' was created at 2026-11-21T00:00:00\+00:00, after"):
        account_view(db, settings, "newer", at, as_of=True)
