"""The charge flow against a Stripe-compatible server through the real `stripe` SDK, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from recharged.accounts import adjust_balance, change_account
from recharged.errors import ConflictError
from recharged.funding import add_source, remove_source
from recharged.planning import plan_accounts
from recharged.recharge import RechargeService
from recharged.states import RechargeKind
from recharged.store.models import Account, Entry, FundingSource, Recharge
from recharged.verify import verify
from tests.helpers import busy_account, card_on_file, with_amounts

ACTOR = "Jane Doe"


@pytest.fixture
def service(db, settings, gateway_factory, clock):
    return RechargeService(db, settings, gateway_factory, clock)


def succeeded(backend):
    return backend.intents(status="succeeded")


def account_row(db, account="acme"):
    with db.transaction() as s:
        return s.get(Account, account)


def test_account_below_threshold_is_charged_once_with_vat_and_credited_net(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    plan = next(plan_accounts(db, settings, clock.now()))
    assert (plan.decision.balance, plan.decision.threshold) == (100_000, 4_200_000)  # $1.00 under $42.00
    assert plan.decision.charge_amount == 8_400_000  # 14 days x $6.00

    report = service.run_cycle()
    [charged] = report.charged
    assert (charged.phase, charged.amount, charged.total) == ("finished", 8_400_000, 10_080_000)
    [intent] = succeeded(stripe_client)
    assert (intent["amount"], intent["currency"]) == (10_080, "usd")  # $84.00 + 20% VAT, in cents
    assert intent["metadata"]["recharged_account"] == "acme"
    if stripe_client.server is not None:  # what was sent, as the local server recorded it
        requests = stripe_client.server.requests()
        [request] = [r for r in requests if r.method == "POST" and r.path == "/v1/payment_intents"]
        assert (request.params["off_session"], request.params["confirm"]) == ("true", "true")
        assert request.idempotency_key.startswith("recharged-")
    assert account_row(db).balance == 100_000 + 8_400_000  # credited net of VAT

    again = service.run_cycle()
    assert again.charged == []
    assert len(succeeded(stripe_client)) == 1
    assert verify(db).ok


def test_soft_decline_moves_on_to_the_backup_card(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_chargeDeclinedInsufficientFunds", "pm_card_visa")
    [charged] = service.run_cycle().charged
    assert charged.phase == "finished"
    assert charged.source == "visa ...4242"
    with db.transaction() as s:
        assert [src.unusable_reason for src in s.scalars(select(FundingSource).order_by(FundingSource.id))] == [
            None,
            None,
        ]
    assert len(succeeded(stripe_client)) == 1


def test_hard_decline_marks_the_card_unusable_and_charges_the_backup(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_chargeDeclinedLostCard", "pm_card_visa")
    [charged] = service.run_cycle().charged
    assert charged.phase == "finished"
    with db.transaction() as s:
        lost = s.scalars(select(FundingSource).order_by(FundingSource.id)).first()
        assert lost.unusable_reason.startswith("lost_card")


def test_all_sources_declining_backs_off_then_suspends(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_chargeDeclined")
    start = clock.now()
    [first] = service.run_cycle().charged
    assert (first.phase, first.outcome) == ("failed", "every funding source declined")
    account = account_row(db)
    assert (account.recharge_state, account.failed_cycles, account.retry_at) == (
        "backing_off",
        1,
        start + timedelta(hours=4),
    )
    assert next(plan_accounts(db, settings, clock.now())).decision.reason == "backing_off"
    # 4 h later the only card is still resting (1 try per 24 h after a decline): the plan says so and when it
    # may be tried, and nothing is claimed (a failed recharge used to be claimed every cycle), no step is used
    clock.advance(timedelta(hours=4, minutes=1))
    plan = next(plan_accounts(db, settings, clock.now())).decision
    assert (plan.action, plan.reason, plan.next_try_at) == ("skip", "cards_resting", start + timedelta(hours=24))
    report = service.run_cycle()
    assert (report.charged, report.not_claimed) == ([], [])
    assert account_row(db).failed_cycles == 1
    # then one declined try per step of the schedule (4 h, 24 h, 72 h), each past the card's 24 h rest
    for expected_cycles, wait in (
        (2, timedelta(hours=20, minutes=1)),
        (3, timedelta(hours=24, minutes=1)),
        (4, timedelta(hours=72, minutes=1)),
    ):
        clock.advance(wait)
        service.run_cycle()
        assert account_row(db).failed_cycles == expected_cycles
    account = account_row(db)
    assert account.recharge_state == "suspended"
    assert next(plan_accounts(db, settings, clock.now())).decision.reason == "suspended"
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=settings, auto_recharge=True)  # an admin lifts it
    assert (account_row(db).recharge_state, account_row(db).failed_cycles) == ("ok", 0)
    assert next(plan_accounts(db, settings, clock.now())).decision.reason == "cards_resting"  # declined just now
    clock.advance(timedelta(hours=24, minutes=1))
    assert next(plan_accounts(db, settings, clock.now())).decision.action == "charge"
    assert len(stripe_client.intents()) == 4  # one declined attempt per failed cycle, never more
    assert succeeded(stripe_client) == []


def test_a_card_that_needs_authentication_is_set_aside_and_the_backup_pays(db, settings, service, clock, stripe_client):
    """Issue 11, defect 5: the card that needs the customer is set aside for this recharge, the backup is tried,
    and nothing is paused: the account stays ok and the card stays usable."""
    busy_account(db, settings, clock, stripe_client, "pm_card_authenticationRequired", "pm_card_visa")
    [charged] = service.run_cycle().charged
    assert charged.phase == "finished"
    assert charged.source == "visa ...4242"
    assert account_row(db).recharge_state == "ok"
    with db.transaction() as s:
        assert [src.unusable_reason for src in s.scalars(select(FundingSource).order_by(FundingSource.id))] == [
            None,
            None,
        ]
    assert len(stripe_client.intents()) == 2
    assert len(succeeded(stripe_client)) == 1


def test_authentication_with_no_other_card_pauses_only_automatic_recharge(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_authenticationRequired")
    [charged] = service.run_cycle().charged
    assert charged.phase == "failed"
    assert "authenticate" in charged.outcome
    assert account_row(db).recharge_state == "action_required"
    assert next(plan_accounts(db, settings, clock.now())).decision.reason == "action_required"
    assert len(stripe_client.intents()) == 1  # never retried until the customer acts
    add_source(
        db, "acme", card_on_file(stripe_client, "pm_card_mastercard"), actor=ACTOR, clock=clock, make_default=True
    )
    assert account_row(db).recharge_state == "ok"


def test_transient_500_is_retried_with_the_same_key(db, settings, service, clock, stripe_client, stripe_server):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("http_500", times=2)
    [charged] = service.run_cycle().charged
    assert charged.phase == "finished"
    keys = {
        r.idempotency_key for r in stripe_server.requests() if r.path == "/v1/payment_intents" and r.method == "POST"
    }
    assert len(keys) == 1
    assert len(succeeded(stripe_client)) == 1


def test_connection_dropped_after_the_charge_is_recovered_without_a_second_charge(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    no_retries = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    stripe_server.inject("drop_after_commit")
    [charged] = no_retries.run_cycle().charged
    assert charged.phase == "charging"  # the outcome is unknown here
    assert account_row(db).balance == 100_000
    [recovered] = no_retries.recover()
    assert recovered.phase == "finished"
    assert len(succeeded(stripe_client)) == 1
    assert account_row(db).balance == 100_000 + 8_400_000


def test_after_the_key_expired_recovery_only_looks_the_payment_up(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    no_retries = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    stripe_server.inject("drop_after_commit")
    no_retries.run_cycle()
    clock.advance(timedelta(hours=30))  # Stripe no longer holds the key
    posts_before = len([r for r in stripe_server.requests() if r.method == "POST"])
    [recovered] = no_retries.recover()
    assert recovered.phase == "finished"
    assert len([r for r in stripe_server.requests() if r.method == "POST"]) == posts_before  # nothing re-sent
    assert len(succeeded(stripe_client)) == 1


def test_a_request_that_never_arrived_is_abandoned_after_the_window_without_charging(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    no_retries = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    stripe_server.inject("http_500")
    no_retries.run_cycle()
    clock.advance(timedelta(hours=30))
    [recovered] = no_retries.recover()
    assert recovered.phase == "failed"
    assert stripe_client.intents() == []
    assert account_row(db).recharge_state == "ok"  # not the customer's fault: no back-off step used
    [fresh] = no_retries.run_cycle().charged  # the next cycle decides afresh
    assert fresh.phase == "finished"


def test_one_open_recharge_per_account(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    assert service.claim("acme", 1_000_000, kind="auto") is not None
    assert service.claim("acme", 1_000_000, kind="auto") is None
    with pytest.raises(ConflictError, match="in progress"):
        service.topup("acme", 1_000_000, ACTOR)
    assert next(plan_accounts(db, settings, clock.now())).decision.reason == "recharge_in_progress"


def test_topup_charges_now_and_credits_a_topup_entry(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", vat="0")
    report = service.topup("acme", 2_500_000, ACTOR)
    assert (report.phase, report.total) == ("finished", 2_500_000)
    with db.transaction() as s:
        entry = s.scalars(select(Entry).where(Entry.entry_type == "topup")).one()
        assert entry.amount == 2_500_000
        assert s.scalars(select(Recharge)).one().actor == ACTOR
    assert succeeded(stripe_client)[0]["amount"] == 2_500


def test_removing_the_last_source_means_no_funding_source(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    with db.transaction() as s:
        source_id = s.scalars(select(FundingSource.id)).one()
    remove_source(db, "acme", source_id, actor=ACTOR, clock=clock)
    assert next(plan_accounts(db, settings, clock.now())).decision.reason == "no_funding_source"
    assert service.run_cycle().charged == []


def test_a_card_is_left_alone_after_its_declines_per_30_days(db, settings, gateway_factory, clock, stripe_client):
    payments = settings.payments.model_copy(
        update={"max_declines_per_card_30_days": 2, "card_retry_after_decline_hours": 1}
    )
    capped_settings = settings.model_copy(update={"payments": payments})
    capped = RechargeService(db, capped_settings, gateway_factory, clock)
    busy_account(db, settings, clock, stripe_client, "pm_card_chargeDeclinedInsufficientFunds")
    first = clock.now()
    for _ in range(2):
        [report] = capped.run_cycle().charged
        assert report.outcome == "every funding source declined"
        clock.advance(timedelta(hours=account_row(db).failed_cycles * 24 + 1))  # past each back-off step
    # The card is at its limit (2 declines in 30 days): the plan says so, and until when; the cycle claims nothing
    # (it used to claim a failed recharge every cycle, with no back-off and no notice).
    plan = next(plan_accounts(db, capped_settings, clock.now())).decision
    assert (plan.reason, plan.next_try_at) == ("cards_resting", first + timedelta(days=30))
    assert capped.run_cycle().charged == []
    assert len(stripe_client.intents()) == 2  # the third cycle sent nothing
    clock.advance(first + timedelta(days=30, seconds=1) - clock.now())
    assert next(plan_accounts(db, capped_settings, clock.now())).decision.action == "charge"


def test_verify_finds_a_credit_without_a_recharge(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    service.run_cycle()
    assert verify(db).ok
    with db.transaction() as s:
        s.scalars(select(Recharge)).one().payment_intent = "pi_other"
    problems = verify(db).violations
    assert any("no ledger credit for pi_other" in p for p in problems)
    assert any("no credited recharge paid by it" in p for p in problems)


def test_the_daily_cap_counts_a_recharge_recovered_in_the_same_cycle(
    db, settings, gateway_factory, clock, stripe_client
):
    """Issue 13, item 3: the cycle took `at` before recovering, and the caps counted credits by posting time up to
    `at`, so a recharge its own recovery credited was left out: max_charged_per_day 100, 160 charged. The caps now
    count every recharge that can still take money, by claim time, under the claim lock."""
    capped_settings = with_amounts(settings, max_charged_per_day="100", max_charged_per_30_days="10000")
    capped = RechargeService(db, capped_settings, gateway_factory, clock)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")  # $1.00, threshold $42, recharge $84, 20% VAT
    adjust_balance(db, "acme", -10_100_000, reason="calls billed late", actor=ACTOR, clock=clock)  # -$100.00
    left_open = capped.claim("acme", 5_000_000, kind=RechargeKind.AUTO)  # $50 + VAT: a worker died after its claim
    assert left_open is not None
    report = capped.run_cycle()
    assert [r.phase for r in report.recovered] == ["finished"]
    charged = [pi["amount"] for pi in stripe_client.intents() if pi["status"] == "succeeded"]
    assert sum(charged) <= 100_00, charged  # cents: what the cards paid in these 24 hours
    assert sorted(charged) == [40_00, 60_00]  # the recovered $60.00, then the $40.00 the cap still allowed
    with db.transaction() as s:
        last = s.scalars(select(Recharge).order_by(Recharge.id.desc())).first()
        assert last is not None
        assert last.limited_by == "max_charged_per_day"
        assert last.decision is not None
        assert last.decision["inputs"]["charged_last_day"] == 6_000_000  # the recovered recharge, kept with it
