"""Customer notices, each written with the event it reports: declines (and what happens next), action required,
suspension, balance low or run out with automatic recharge off and spend caps (one per episode), and admin
changes. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from recharged.accounts import adjust_balance, change_account
from recharged.funding import add_source, make_default, remove_source
from recharged.mail.notices import GENERIC_DECLINE, notify_from_plans
from recharged.mail.templating import render
from recharged.payments import CardInfo
from recharged.planning import plan_accounts
from recharged.recharge import RechargeService
from recharged.store.models import Account, AuditRecord, OutboxMessage, Recharge
from recharged.usage import UsageRecorder
from tests.helpers import add_account, busy_account, call, mail_settings

ACTOR = "Jane Doe"
CARD_NOTICES = ("settings_changed",)


@pytest.fixture
def mail(tmp_path):
    return mail_settings(tmp_path)


def notices(db, *kinds: str) -> list[OutboxMessage]:
    with db.transaction() as s:
        query = select(OutboxMessage).order_by(OutboxMessage.id)
        if kinds:
            query = query.where(OutboxMessage.kind.in_(kinds))
        return list(s.scalars(query))


def text_of(settings, message: OutboxMessage) -> str:
    rendered = render(settings, message.kind, message.context)
    return rendered.subject + "\n" + rendered.text


def test_a_lost_card_is_a_generic_decline_and_says_the_backup_is_tried(db, mail, gateway_factory, clock, stripe_client):
    busy_account(db, mail, clock, stripe_client, "pm_card_chargeDeclinedLostCard", "pm_card_visa")
    RechargeService(db, mail, gateway_factory, clock).run_cycle()
    [declined] = notices(db, "payment_declined")
    text = text_of(mail, declined)
    assert declined.key.startswith("declined:attempt:")
    assert declined.to_address == "billing@acme.example"
    assert f"Reason: {GENERIC_DECLINE}" in text
    assert "lost" not in text.lower()
    assert "stolen" not in text.lower()
    assert "we are trying your Visa card ending in 4242 now" in text
    assert [m.kind for m in notices(db, "receipt")] == ["receipt"]  # the backup paid: the receipt follows


def test_every_card_declined_says_when_we_try_again_then_that_it_is_paused(
    db, mail, gateway_factory, clock, stripe_client
):
    payments = mail.payments.model_copy(update={"retry_schedule_hours": [4.0], "card_retry_after_decline_hours": 0})
    settings = mail.model_copy(update={"payments": payments})
    busy_account(db, settings, clock, stripe_client, "pm_card_chargeDeclinedInsufficientFunds")
    service = RechargeService(db, settings, gateway_factory, clock)
    start = clock.now()
    service.run_cycle()
    [declined] = notices(db, "payment_declined")
    text = text_of(settings, declined)
    assert "Reason: the card has insufficient funds" in text
    assert f"we will try again after {start + timedelta(hours=4):%d %b %Y, %H:%M} UTC" in text
    clock.advance(timedelta(hours=4, minutes=1))
    service.run_cycle()
    [suspended] = notices(db, "auto_recharge_suspended")
    assert "We have paused automatic recharge" in text_of(settings, suspended)
    assert len(notices(db, "payment_declined")) == 1  # the last decline is told once, by the suspension notice


def test_a_card_that_needs_the_customer_says_what_to_do(db, mail, gateway_factory, clock, stripe_client):
    busy_account(db, mail, clock, stripe_client, "pm_card_authenticationRequired")
    RechargeService(db, mail, gateway_factory, clock).run_cycle()
    [notice] = notices(db, "action_required")
    text = text_of(mail, notice)
    assert "authenticate the card with your bank, or give us another card" in text
    assert "What is paused: automatic recharge, until you do" in text
    assert notices(db, "payment_declined") == []


def test_a_purchase_that_needs_authentication_pauses_nothing_and_says_so(
    db, mail, gateway_factory, clock, stripe_client
):
    """Issue 11, defect 5: a top-up never pauses automatic recharge, silently or not; its notice says so."""
    busy_account(db, mail, clock, stripe_client, "pm_card_authenticationRequired")
    report = RechargeService(db, mail, gateway_factory, clock).topup("acme", 1_000_000, ACTOR)
    assert report.phase == "failed"
    assert "needs the customer to authenticate" in report.outcome  # what the caller is told
    with db.transaction() as s:
        assert s.get(Account, "acme").recharge_state == "ok"
    [notice] = notices(db, "action_required")
    assert "What is paused: nothing. This was a one-time purchase" in text_of(mail, notice)


def test_a_declined_purchase_says_nothing_was_charged(db, mail, gateway_factory, clock, stripe_client):
    busy_account(db, mail, clock, stripe_client, "pm_card_chargeDeclined")
    RechargeService(db, mail, gateway_factory, clock).topup("acme", 1_000_000, ACTOR)
    [notice] = notices(db, "payment_declined")
    assert "nothing was charged" in text_of(mail, notice)
    assert "your purchase" in text_of(mail, notice)


def test_low_balance_with_auto_recharge_off_is_told_once_per_episode(db, mail, clock):
    add_account(db, mail, clock, opening_balance="10.00")  # above the $5.00 minimum reserve

    def run() -> int:
        return notify_from_plans(db, clock.now(), plan_accounts(db, mail, clock.now()))

    assert run() == 0
    adjust_balance(db, "acme", -700_000, reason="usage", actor=ACTOR, clock=clock)  # $3.00: under it
    assert run() == 1
    assert run() == 0  # the same episode: not again every cycle
    [low] = notices(db, "balance_low")
    assert "The balance of account acme is $3.00" in text_of(mail, low)
    adjust_balance(db, "acme", -400_000, reason="usage", actor=ACTOR, clock=clock)  # now -$1.00: run out
    clock.advance(timedelta(hours=4))
    assert run() == 1
    [out] = notices(db, "balance_exhausted")
    assert "has run out: it is -$1.00" in text_of(mail, out)
    adjust_balance(db, "acme", 2_000_000, reason="paid", actor=ACTOR, clock=clock)  # $19.00: episode over
    clock.advance(timedelta(hours=4))
    assert run() == 0
    adjust_balance(db, "acme", -1_700_000, reason="usage", actor=ACTOR, clock=clock)  # $2.00: a new episode
    clock.advance(timedelta(hours=4))
    assert run() == 1
    assert len(notices(db, "balance_low")) == 2


def test_an_account_created_at_or_below_the_line_is_told_nothing_until_it_crosses_it(db, mail, clock):
    """Issue 13 item 13: a new account with zero balance and auto-recharge off was told its balance had run out
    the moment it was created. Notices are for crossings the customer caused, once per crossing."""
    add_account(db, mail, clock, "acme")  # $0.00: at the line of "run out"
    add_account(db, mail, clock, "birch", opening_balance="3.00")  # under the $5.00 minimum reserve

    def cycle() -> int:
        clock.advance(timedelta(hours=4))
        return notify_from_plans(db, clock.now(), plan_accounts(db, mail, clock.now()))

    assert [cycle(), cycle()] == [0, 0]
    assert notices(db) == []

    adjust_balance(db, "acme", 5_000_000, reason="first payment", actor=ACTOR, clock=clock)  # $50.00: above
    assert cycle() == 0
    # The customer calls for 2,500 minutes at 2 cents: $50.00, all of it. That crossing is told, once.
    UsageRecorder(db, mail, clock).record([call("long", account="acme", seconds=150_000)])
    assert [cycle(), cycle()] == [1, 0]
    [out] = notices(db)
    assert (out.kind, out.to_address) == ("balance_exhausted", "billing@acme.example")
    assert "has run out: it is $0.00" in text_of(mail, out)

    UsageRecorder(db, mail, clock).record([call("short", account="birch", seconds=60)])  # $2.98: lower still
    assert cycle() == 0  # birch never was above its line: it crossed nothing
    adjust_balance(db, "birch", -400_000, reason="fee", actor=ACTOR, clock=clock)  # -$1.02: under "run out"
    assert cycle() == 1  # its $3.00 was above 0: crossing that line is told
    assert [m.kind for m in notices(db)] == ["balance_exhausted", "balance_exhausted"]


def test_a_spend_cap_reached_is_told_once(db, mail, clock):
    add_account(db, mail, clock, opening_balance="1.00", auto_recharge=True)
    card = CardInfo("cus_1", "pm_1", "visa", "4242", 12, 2030)
    add_source(db, "acme", card, actor=ACTOR, clock=clock)
    overrides = {"max_recharge": "20", "max_charged_per_day": "20"}
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=mail, overrides=overrides)
    with db.transaction() as s:  # an automatic recharge charged the card $20.00 an hour ago: the day's limit
        at = clock.now() - timedelta(hours=1)
        s.add(
            Recharge(
                account_id="acme",
                kind="auto",
                phase="finished",
                currency="USD",
                amount=1_667_000,
                vat=333_000,
                total=2_000_000,
                vat_percent=Decimal(20),
                balance_before=100_000,
                created_at=at,
                updated_at=at,
            )
        )
    plans = list(plan_accounts(db, mail, clock.now()))
    assert plans[0].decision.reason == "cap_reached"
    assert notify_from_plans(db, clock.now(), plans) == 1
    assert notify_from_plans(db, clock.now(), plans) == 0
    [cap] = notices(db, "spend_cap_reached")
    assert "your spending limit of $20.00 per 24 hours" in text_of(mail, cap)


def test_admin_changes_are_told_with_what_when_and_who(db, mail, clock):
    """Each change here comes after the last one's notice window (see test_admin_notices for changes within one)."""
    add_account(db, mail, clock)
    at = clock.now()
    change_account(
        db,
        "acme",
        actor=ACTOR,
        clock=clock,
        settings=mail,
        auto_recharge=True,
        overrides={"max_recharge": "250", "threshold_days": "5"},
    )
    window = timedelta(minutes=mail.outbox.admin_notice_delay_minutes)
    clock.advance(window)
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=mail, email="ap@acme.example")  # not a notice
    visa = add_source(db, "acme", CardInfo("cus_1", "pm_1", "visa", "4242", 12, 2030), actor=ACTOR, clock=clock)
    clock.advance(window)
    amex = add_source(db, "acme", CardInfo("cus_1", "pm_2", "amex", "0005", 1, 2031), actor=ACTOR, clock=clock)
    clock.advance(window)
    make_default(db, "acme", amex.id, actor=ACTOR, clock=clock)
    clock.advance(window)
    remove_source(db, "acme", visa.id, actor=ACTOR, clock=clock)
    changed = notices(db, "settings_changed")
    assert len(changed) == 5
    first = text_of(mail, changed[0])
    assert "Your automatic recharge settings for account acme changed" in first
    assert f"Jane Doe changed the automatic recharge settings of account acme on {at:%d %b %Y, %H:%M} UTC" in first
    for line in (
        "- Automatic recharge: off -> on",
        "- Largest single recharge: standard setting -> $250.00",
        "- Minimum reserve, in days of usage: standard setting -> 5",
    ):
        assert line in first, line
    assert changed[1].to_address == "ap@acme.example"
    assert "- Card added: - -> Visa ending in 4242 (your default card)" in text_of(mail, changed[1])
    assert "- Default card: Visa ending in 4242 -> Amex ending in 0005" in text_of(mail, changed[3])
    assert "- Card removed: Visa ending in 4242 -> removed" in text_of(mail, changed[4])
    with db.transaction() as s:  # each notice belongs to its audit record, written in the same transaction
        audited = {f"settings:audit:{r.id}" for r in s.scalars(select(AuditRecord))}
    assert {m.key for m in changed} <= audited
