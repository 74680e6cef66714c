"""The plan pass over real databases: every averaging window in use summed in the one statement that streams
the accounts, one policy per plan and set of overrides, and the same decisions for a few accounts as for all."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import update

from recharged import planning
from recharged.accounts import change_account, close_account
from recharged.config import Settings, load_settings
from recharged.planning import plan_accounts
from recharged.store.models import Account
from recharged.usage import UsageRecorder
from tests.helpers import NOW, add_account, call

ACTOR = "Jane Doe"
# Minutes of one dialer call (0.02 a minute: 2,000 Units) on the day that many days before NOW's day; 0 is today,
# which no window holds. Powers of two, so each window's sum names the days in it.
MINUTES_ON = {0: 1, 1: 2, 7: 4, 8: 8, 20: 16, 21: 32, 90: 64, 91: 128}


def settings_with_plans(tmp_path: Path, *, quarter: bool = True) -> Settings:
    """A 20-day window in [recharge] (not the built-in 30), the standard plan, and with `quarter` a plan of its
    own with a 90-day window."""
    config = tmp_path / ("config.toml" if quarter else "config-without-quarter.toml")
    rates = '.rates.dialer]\nmeasure = "time"\nprice_per_minute = 0.02\nincrement_seconds = 60\n'
    text = f'[recharge]\nwindow_days = 20\n\n[plans.standard]\ncurrency = "USD"\n\n[plans.standard{rates}'
    if quarter:
        text += f'\n[plans.quarter]\ncurrency = "USD"\nrecharge = {{ window_days = 90 }}\n\n[plans.quarter{rates}'
    config.write_text(text, encoding="utf-8")
    return load_settings(config, environ={})


def usage_of(days: int) -> int:
    """Units of the calls in the `days` full days before NOW's day."""
    return sum(minutes for back, minutes in MINUTES_ON.items() if 0 < back <= days) * 2_000


def test_each_account_averages_over_its_own_window_in_one_pass(db, clock, tmp_path: Path):
    settings = settings_with_plans(tmp_path)
    for account in ("plain", "week", "quarter"):
        add_account(db, settings, clock, account, created_at="2026-01-01T00:00:00Z")
    change_account(db, "quarter", actor=ACTOR, clock=clock, settings=settings, plan="quarter")
    change_account(db, "week", actor=ACTOR, clock=clock, settings=settings, overrides={"window_days": "7"})
    today = datetime.combine(NOW.date(), datetime.min.time(), NOW.tzinfo)
    UsageRecorder(db, settings, clock).record(
        [
            call(f"{account}-{back}", account, seconds=60 * minutes, at=(today - timedelta(days=back)).isoformat())
            for account in ("plain", "week", "quarter")
            for back, minutes in MINUTES_ON.items()
        ]
    )
    plans = {plan.account_id: plan for plan in plan_accounts(db, settings, NOW)}
    assert list(plans) == ["plain", "quarter", "week"]
    for account, days in (("plain", 20), ("week", 7), ("quarter", 90)):
        plan = plans[account]
        assert plan.policy.window_days == days
        assert (plan.window.start, plan.window.end) == (today - timedelta(days=days), today)
        assert plan.decision.inputs is not None
        assert plan.decision.inputs.window_usage == usage_of(days), account
        assert plan.decision.history_days == days
        [alone] = plan_accounts(db, settings, NOW, [account])
        assert alone == plan  # the same statement, narrowed to the ids given


def test_an_account_whose_plan_left_the_configuration_is_planned_but_never_charged(db, clock, tmp_path: Path):
    """Its policy is the built-in defaults (a 30-day window, which no account of the configuration uses here)."""
    settings = settings_with_plans(tmp_path)
    add_account(db, settings, clock, "plain", created_at="2026-01-01T00:00:00Z")
    add_account(db, settings, clock, "orphan", created_at="2026-01-01T00:00:00Z", auto_recharge=True)
    change_account(db, "orphan", actor=ACTOR, clock=clock, settings=settings, plan="quarter")
    today = datetime.combine(NOW.date(), datetime.min.time(), NOW.tzinfo)
    UsageRecorder(db, settings, clock).record(
        [
            call(f"o-{back}", "orphan", seconds=60 * m, at=(today - timedelta(days=back)).isoformat())
            for back, m in MINUTES_ON.items()
        ]
    )
    without = settings_with_plans(tmp_path, quarter=False)
    plans = {plan.account_id: plan for plan in plan_accounts(db, without, NOW)}
    orphan = plans["orphan"]
    assert (orphan.decision.action, orphan.decision.reason) == ("skip", "no_policy")
    assert orphan.policy.window_days == 30
    assert orphan.decision.inputs is not None
    assert orphan.decision.inputs.window_usage == usage_of(30)
    assert plans["plain"].policy.window_days == 20


def test_reserved_money_closed_accounts_and_a_subset_of_accounts(db, clock, settings):
    for account in ("a", "b", "c"):
        add_account(db, settings, clock, account, opening_balance="50.00", auto_recharge=True)
    with db.transaction() as session:
        session.execute(update(Account).where(Account.id == "b").values(reserved=1_250_000))
    close_account(db, "c", reason="left us", actor=ACTOR, clock=clock)
    plans = {plan.account_id: plan.decision for plan in plan_accounts(db, settings, NOW)}
    assert [plans[a].balance for a in ("a", "b", "c")] == [5_000_000, 3_750_000, 5_000_000]  # held counts as spent
    assert (plans["c"].action, plans["c"].reason) == ("skip", "closed")
    then = {plan.account_id: plan.decision for plan in plan_accounts(db, settings, NOW, as_of=True)}
    assert then["b"].balance == 5_000_000  # what was held at a past instant is not kept
    some = list(plan_accounts(db, settings, NOW, ["c", "a", "missing"]))
    assert [plan.account_id for plan in some] == ["a", "c"]  # id order, unknown ids left out
    assert [plan.decision for plan in some] == [plans["a"], plans["c"]]


def test_a_window_taken_up_while_the_pass_reads_is_summed_on_its_own(db, clock, settings, monkeypatch):
    """An account that takes up a window no account had when the pass read which windows are in use (an admin's
    change in between) is still planned over its own window: on PostgreSQL the rows read afterwards show it."""
    for account in ("a", "b"):
        add_account(db, settings, clock, account, created_at="2026-01-01T00:00:00Z")
    today = datetime.combine(NOW.date(), datetime.min.time(), NOW.tzinfo)
    UsageRecorder(db, settings, clock).record(
        [
            call(f"{account}-{back}", account, seconds=60 * m, at=(today - timedelta(days=back)).isoformat())
            for account in ("a", "b")
            for back, m in MINUTES_ON.items()
        ]
    )
    read_windows = planning.window_choices

    def then_a_change(session, ids=None):
        choices = read_windows(session, ids)
        with db.transaction() as other:  # another transaction, committed before the accounts are read
            other.execute(update(Account).where(Account.id == "b").values(window_days=7))
        return choices

    monkeypatch.setattr(planning, "window_choices", then_a_change)
    plans = {plan.account_id: plan for plan in plan_accounts(db, settings, NOW)}
    # SQLite reads one snapshot (the change is not seen); PostgreSQL sees it in the rows it reads after
    days = 30 if db.dialect == "sqlite" else 7
    b = plans["b"]
    assert (b.policy.window_days, b.window.start) == (days, today - timedelta(days=days))
    assert b.decision.inputs is not None
    assert b.decision.inputs.window_usage == usage_of(days)
    assert plans["a"].decision.inputs is not None
    assert plans["a"].decision.inputs.window_usage == usage_of(30)
