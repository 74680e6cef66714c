"""Recovery never decides "no payment was made" from our own clock (issue 12). Here our clock runs two hours ahead
of the processor's: `created` stamps come from the processor's clock, attempt starts from ours."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from recharged.clock import FixedClock
from recharged.errors import ConflictError
from recharged.recharge import RechargeService
from recharged.states import AttemptStatus, Phase
from recharged.store.models import ChargeAttempt, Entry, Recharge
from recharged.verify import verify
from tests.helpers import busy_account

AHEAD = timedelta(hours=2)


@pytest.fixture
def processor_clock(clock: FixedClock) -> Callable[[], float]:
    """The processor's clock, two hours behind ours."""
    return lambda: (clock.now() - AHEAD).timestamp()


def test_a_payment_made_before_a_crash_is_found_after_the_window_despite_our_clock_running_ahead(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    no_retries = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("drop_after_commit")  # charged at the processor; the answer is lost, as if we were killed
    [charged] = no_retries.run_cycle().charged
    assert charged.phase == Phase.CHARGING
    [intent] = stripe_client.intents(status="succeeded")
    assert intent["created"] == int((clock.now() - AHEAD).timestamp())  # stamped by the processor's clock

    clock.advance(timedelta(days=2))  # past the idempotency window: recovery only looks the payment up
    [recovered] = no_retries.recover()
    assert recovered.phase == Phase.FINISHED  # found by our key, not missed by a window computed on our clock
    with db.reading() as s:
        [credit] = s.scalars(select(Entry).where(Entry.entry_type == "recharge"))
    assert credit.external_id == intent["id"]
    assert len(stripe_client.intents()) == 1  # and never charged again
    assert verify(db).ok


def test_the_skew_is_measured_and_no_charge_starts_past_the_tolerance(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    gateway = gateway_factory()
    service = RechargeService(db, settings, lambda: gateway, clock)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    customer = stripe_client.customers[0]
    card = stripe_client.client.v1.customers.payment_methods.list(customer).data[0]
    gateway.card(customer, card.id)  # any answer carries the processor's Date
    assert gateway.skew == AHEAD
    report = service.run_cycle()
    assert report.charged == []
    assert report.left_for_next == ["acme"]
    assert "2:00:00 ahead of the processor's" in report.halted
    assert stripe_server.payment_intents() == []


def test_an_abandoned_attempt_whose_payment_exists_is_reclaimed_and_credited_once(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    """A recharge an older release failed as "no payment found" although the processor holds one under the attempt's
    key (the defect of issue 12): `recover --recharge N` marks it paid by that payment and credits it, once."""
    service = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("drop_after_commit")
    [charged] = service.run_cycle().charged
    with db.transaction() as s:  # what the older release concluded from a window on its own clock
        recharge = s.get(Recharge, charged.recharge_id)
        [attempt] = s.scalars(select(ChargeAttempt).where(ChargeAttempt.recharge_id == recharge.id))
        attempt.status, recharge.phase, recharge.lease_until = AttemptStatus.ABANDONED, Phase.FAILED, None
    assert service.recover() == []

    reclaimed = service.reclaim(charged.recharge_id)
    assert reclaimed.phase == Phase.FINISHED
    with pytest.raises(ConflictError, match="is finished, not failed"):
        service.reclaim(charged.recharge_id)  # never twice
    with db.reading() as s:
        credits = list(s.scalars(select(Entry).where(Entry.entry_type == "recharge")))
    assert len(credits) == 1
    assert len(stripe_client.intents()) == 1
    assert verify(db).ok


def test_no_payment_is_never_concluded_while_our_clock_is_off_the_processors(
    db, settings, gateway_factory, clock, stripe_client, stripe_server
):
    """The processor was asked nothing it kept (a 429), so no payment exists; but with our clock two hours off its
    own (over the one-hour tolerance), recovery does not trust its lookup window: the recharge stays open, alerting,
    instead of being abandoned."""
    service = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    stripe_server.inject("http_429")
    [charged] = service.run_cycle().charged
    assert charged.phase == Phase.CHARGING
    clock.advance(timedelta(days=2))
    [still] = service.recover()
    assert still.phase == Phase.CHARGING
    assert "not concluded" in still.outcome
    with db.reading() as s:
        [attempt] = s.scalars(select(ChargeAttempt))
        assert attempt.status == AttemptStatus.PENDING
