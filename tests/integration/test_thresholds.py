"""After a usage batch only the accounts that may have come under their threshold are planned again
(`recharged.thresholds`): an account above its known threshold is not, and whatever can move its threshold (a new
day, its own settings, a late call record of an earlier day) makes it planned again, so no due account is missed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recharged.accounts import adjust_balance, change_account
from recharged.recharge import RechargeService
from recharged.store.models import Account
from recharged.usage import UsageRecorder
from tests.helpers import busy_account, call

ACTOR = "Jane Doe"


@pytest.fixture
def service(db, settings, gateway_factory, clock):
    return RechargeService(db, settings, gateway_factory, clock)


@pytest.fixture
def acme(db, settings, clock, service, stripe_client) -> UsageRecorder:
    """acme: $6.00 a day over the window (threshold $42.00), holding $51.00; known to `service` as above it.
    Returns the usage recorder wired as the daemon wires it."""
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    adjust_balance(db, "acme", 5_000_000, reason="top-up by check", actor=ACTOR, clock=clock, reference="check-1")
    assert service.mark_due({"acme"}, None, timedelta(0)) == []
    assert to_plan(db, service, clock) == []
    return UsageRecorder(db, settings, clock, on_backdated=service.thresholds.forget)


def to_plan(db, service: RechargeService, clock) -> list[str]:
    with db.transaction() as session:
        return service.thresholds.to_plan(session, ["acme"], clock.now())[0]


def due_since(db):
    with db.transaction() as session:
        return session.get(Account, "acme").due_since


def minutes_at(clock, minutes: int, event_id: str, days_ago: int = 0) -> dict[str, str]:
    at = clock.now() - timedelta(days=days_ago, minutes=minutes + 1)
    return call(event_id, account="acme", seconds=minutes * 60, at=at.strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_usage_that_leaves_an_account_above_its_threshold_plans_nothing_and_under_it_marks_it_due(
    db, clock, service, acme
):
    acme.record([minutes_at(clock, 240, "today-1")])  # $4.80: $46.20 is still above $42.00
    assert to_plan(db, service, clock) == []
    assert service.mark_due({"acme"}, None, timedelta(0)) == []
    assert due_since(db) is None

    acme.record([minutes_at(clock, 300, "today-2")])  # $6.00 more: $40.20 is under it
    assert to_plan(db, service, clock) == ["acme"]
    assert service.mark_due({"acme"}, None, timedelta(0)) == []
    assert due_since(db) == clock.now()


def test_a_late_record_of_an_earlier_day_raises_the_threshold_and_is_not_missed(db, clock, service, acme):
    # $8.00 of calls yesterday: the balance is $43.00 and the average over the window $6.27, so the threshold is
    # $43.87. Against the threshold known before this record ($42.00) the account would look fine.
    acme.record([minutes_at(clock, 400, "yesterday-1", days_ago=1)])
    assert to_plan(db, service, clock) == ["acme"]
    service.mark_due({"acme"}, None, timedelta(0))
    assert due_since(db) == clock.now()


def test_the_accounts_own_threshold_days_and_a_new_day_make_it_planned_again(db, settings, clock, service, acme):
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=settings, overrides={"threshold_days": "9"})
    assert to_plan(db, service, clock) == ["acme"]  # $51.00 against 9 days of $6.00: $54.00
    service.mark_due({"acme"}, None, timedelta(0))
    assert due_since(db) == clock.now()

    clock.advance(timedelta(days=1))
    assert to_plan(db, service, clock) == ["acme"]  # the window moved: yesterday's threshold is not today's


def test_an_urgent_account_is_still_returned_to_charge_now(db, clock, service, acme):
    acme.record([minutes_at(clock, 2_500, "today-big")])  # $50.00: $1.00 left, a few hours of calls
    assert service.mark_due({"acme"}, clock.now() + timedelta(hours=4), timedelta(hours=2)) == ["acme"]
