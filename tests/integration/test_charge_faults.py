"""Faults around the charge that are not the card's (issue 11): a 5xx the processor stores against the key,
recovery of one recharge failing, and the processor refusing our request as malformed. The real `stripe` SDK
talks to the local Stripe-compatible server, which stores and replays 5xx answers as Stripe does."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from recharged.recharge import RechargeService
from recharged.states import AttemptStatus, Phase
from recharged.store.models import Account, ChargeAttempt, Entry, FundingSource, OutboxMessage, Recharge
from recharged.verify import verify
from tests.helpers import api_auth, busy_account


@pytest.fixture
def service(db, settings, gateway_factory, clock):
    return RechargeService(db, settings, gateway_factory, clock)


def creates(server):
    return [r for r in server.requests() if r.method == "POST" and r.path == "/v1/payment_intents"]


def attempts(db):
    with db.reading() as s:
        return list(s.scalars(select(ChargeAttempt).order_by(ChargeAttempt.id)))


def credits(db):
    with db.reading() as s:
        return list(s.scalars(select(Entry).where(Entry.entry_type == "recharge")))


def cards_untouched(db) -> bool:
    with db.reading() as s:
        return all(src.unusable_reason is None for src in s.scalars(select(FundingSource)))


def payment_mail(db) -> list[str]:
    """What the customer was told about payments (not the admin's set-up of the account)."""
    with db.reading() as s:
        return [m.kind for m in s.scalars(select(OutboxMessage)) if m.kind != "settings_changed"]


def test_a_stored_500_is_never_resent_with_its_key_and_a_new_attempt_pays_once(
    db, settings, service, clock, stripe_client, stripe_server
):
    """Issue 11, defect 3: Stripe stores a 500 against the key and replays it; re-sending that key for 23 hours
    could never succeed. The payment is looked up by what we sent; none was made, so the attempt is set aside (not
    the card's fault: no notice, card usable) and the next pass charges under a new key, exactly once."""
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("http_500_stored")
    [first] = service.run_cycle().charged
    assert first.phase == Phase.CLAIMED  # waiting for a new attempt
    assert len(creates(stripe_server)) == 1  # the stored 500 was not replayed by re-sending its key
    [aside] = attempts(db)
    assert aside.status == AttemptStatus.ABANDONED
    assert "no payment was made under its key" in aside.message
    assert cards_untouched(db)
    assert payment_mail(db) == []
    with db.reading() as s:
        assert s.get(Account, "acme").recharge_state == "ok"

    [recovered] = service.recover()
    assert recovered.phase == Phase.FINISHED
    keys = [r.idempotency_key for r in creates(stripe_server)]
    assert len(keys) == 2
    assert keys[0] != keys[1]
    assert len(stripe_client.intents(status="succeeded")) == 1
    assert len(credits(db)) == 1
    assert verify(db).ok


def test_a_500_after_the_processor_charged_finds_the_payment_and_credits_it_once(
    db, settings, service, clock, stripe_client, stripe_server
):
    """The indeterminate 500: the work was done. The lookup by our metadata finds the PaymentIntent; no second
    charge is made."""
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("http_500_after_commit")
    [charged] = service.run_cycle().charged
    assert charged.phase == Phase.FINISHED
    assert len(creates(stripe_server)) == 1
    assert len(stripe_client.intents()) == 1
    assert len(credits(db)) == 1
    assert verify(db).ok


def test_a_500_the_processor_asks_to_retry_is_retried_with_the_same_key(
    db, settings, service, clock, stripe_client, stripe_server
):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("http_500", times=2)  # nothing stored, Stripe-Should-Retry: true
    [charged] = service.run_cycle().charged
    assert charged.phase == Phase.FINISHED
    assert len({r.idempotency_key for r in creates(stripe_server)}) == 1
    assert len(credits(db)) == 1


def test_one_recharge_whose_recovery_fails_never_stops_the_others(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    """Issue 11, defect 4: recovering one recharge raises (its stored PaymentIntent is unknown to the processor, as
    after a restore from another environment); the others are still recovered, the failure is recorded on the
    recharge with a backoff that doubles, and nothing else stops."""
    no_retries = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", account="broken")
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", account="fine")
    stripe_server.inject("drop_after_commit", times=2)  # both charged, neither answer received
    report = no_retries.run_cycle()
    assert sorted(r.phase for r in report.charged) == [Phase.CHARGING, Phase.CHARGING]
    with db.transaction() as s:
        [attempt] = s.scalars(
            select(ChargeAttempt)
            .join(Recharge)
            .where(Recharge.account_id == "broken", ChargeAttempt.status == "pending")
        )
        attempt.payment_intent = "pi_from_another_environment"

    recovered = {r.account_id: r for r in no_retries.recover()}
    assert recovered["fine"].phase == Phase.FINISHED
    assert recovered["broken"].phase == Phase.CHARGING
    assert "recovery failed (1x)" in recovered["broken"].outcome
    with db.reading() as s:
        broken = s.scalars(select(Recharge).where(Recharge.account_id == "broken")).one()
        assert broken.recovery_failures == 1
        assert broken.recover_after == clock.now() + timedelta(minutes=5)
    assert no_retries.recover() == []  # backing off: not tried again at once
    clock.advance(timedelta(minutes=5))
    [again] = no_retries.recover()
    with db.reading() as s:
        assert s.get(Recharge, again.recharge_id).recovery_failures == 2
        assert s.get(Recharge, again.recharge_id).recover_after == clock.now() + timedelta(minutes=10)


def test_a_payment_of_a_customer_deleted_at_the_processor_is_still_found_by_its_key(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    """The customer cannot be listed any more ("No such customer"): the lookup asks the search API for our attempt
    key instead, finds the payment and credits it; it never concludes "no payment" from a failed listing."""
    no_retries = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    customer = busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("drop_after_commit")
    [charged] = no_retries.run_cycle().charged
    assert charged.phase == Phase.CHARGING
    clock.advance(timedelta(days=2))  # past the idempotency window: only looked up
    stripe_client.client.v1.customers.delete(customer)
    [recovered] = no_retries.recover()
    assert recovered.phase == Phase.FINISHED
    assert len(credits(db)) == 1
    assert len(stripe_server.payment_intents(status="succeeded")) == 1


def test_a_processor_refusing_every_charge_as_malformed_blames_no_card_and_trips_the_breaker(
    db, settings, service, clock, stripe_client, stripe_server
):
    """Issue 11, defect 2: our request refused (400 parameter_unknown, as an emulator that does not know two of our
    parameters answered) is an integration error. No card is marked unusable, no customer is emailed, and after
    `max_integration_errors` (3) in a row the cycle stops charging instead of sweeping through every account."""
    for name in ("a1", "a2", "a3", "a4", "a5"):
        busy_account(db, settings, clock, stripe_client, "pm_card_visa", "pm_card_mastercard", account=name)
    stripe_server.unsupported_parameters = {"automatic_payment_methods", "off_session"}

    report = service.run_cycle()  # one at a time (concurrency 1), in random order
    assert len(report.charged) == 3
    assert all(r.phase == Phase.FAILED and r.integration_error for r in report.charged)
    assert all("parameter_unknown" in r.outcome for r in report.charged)
    assert len(report.left_for_next) == 2
    assert report.halted is not None
    assert "3 integration errors in a row" in report.halted
    assert report.summary()["integration_errors"] == 3

    assert cards_untouched(db)
    assert payment_mail(db) == []
    with db.reading() as s:
        assert {a.recharge_state for a in s.scalars(select(Account))} == {"ok"}
        statuses = [a.status for a in s.scalars(select(ChargeAttempt))]
    assert statuses == [AttemptStatus.ERROR] * 3  # one card each: the backups were not tried either
    assert verify(db).ok

    stripe_server.unsupported_parameters = set()  # the release is fixed: the next cycle charges everyone
    again = service.run_cycle()
    assert sorted(r.phase for r in again.charged) == [Phase.FINISHED] * 5
    assert again.halted is None


def test_integration_errors_show_in_status_and_healthz(db, settings, make_api, clock, stripe_client, stripe_server):
    from recharged.status import DaemonAnswer, status_report
    from recharged.store.runs import finish_job_run, start_job_run

    api = make_api()
    busy_account(api.db, api.settings, clock, stripe_client, "pm_card_visa")
    stripe_server.unsupported_parameters = {"off_session"}
    report = api.daemon.runtime().recharges.run_cycle()
    with api.db.transaction() as s:  # recorded as the daemon's cycle job records it
        run = start_job_run(s, "cycle", "test:1", clock.now())
        finish_job_run(s, run, "succeeded", clock.now(), report.summary(), None)

    [check] = api.client.get("/healthz", headers=api_auth()).json()["checks"]["payments:integration"]
    assert check["status"] == "fail"
    assert check["output"] == "the processor refused our last charge request"
    assert "parameter_unknown" not in str(check)  # the processor's words go to the log and `status`, not here
    answer = DaemonAnswer(None, False, error="the daemon's HTTP server is disabled")
    kinds = {a.kind: a for a in status_report(api.db, api.settings, clock.now(), answer).attention}
    assert "integration_error" in kinds
    assert "parameter_unknown" in kinds["integration_error"].detail
    assert api.metric("recharged_charges_total", outcome="error") == 1
