"""A card the processor does not hold for the customer we name (issue 14 item 6): an id brought over wrong by an
import, or a card of another customer. That is our record's fault, never the customer's card: the attempt is an
integration error, the card is set aside with a reason that says so, the customer is told nothing and nothing
counts against the card or the account; the next cycle charges the next card. A card the customer's side detached
is still a card that went away. The real SDK against the local Stripe-compatible server."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from recharged.funding import add_source
from recharged.payments import CardInfo
from recharged.planning import plan_accounts
from recharged.recharge import RechargeService
from recharged.states import AttemptStatus, Phase
from recharged.store.models import Account, ChargeAttempt, FundingSource, OutboxMessage
from tests.helpers import busy_account, card_on_file

PLACEHOLDER = CardInfo("cus_Sample0000", "pm_Sample0000", "visa", "4242", 12, 2029)


@pytest.fixture
def service(db, settings, gateway_factory, clock):
    return RechargeService(db, settings, gateway_factory, clock)


def attempts(db) -> list[ChargeAttempt]:
    with db.reading() as s:
        return list(s.scalars(select(ChargeAttempt).order_by(ChargeAttempt.id)))


def sources(db) -> list[FundingSource]:
    with db.reading() as s:
        return list(s.scalars(select(FundingSource).order_by(FundingSource.id)))


def customer_mail(db) -> list[str]:
    with db.reading() as s:
        return [m.kind for m in s.scalars(select(OutboxMessage)) if m.kind != "settings_changed"]


def test_a_card_the_processor_does_not_know_is_our_error_and_the_backup_pays_next(
    db, settings, service, clock, stripe_client
):
    busy_account(db, settings, clock, stripe_client)
    add_source(db, "acme", PLACEHOLDER, actor="Jane Doe", clock=clock)  # as an import without a key brings it
    backup = card_on_file(stripe_client, "pm_card_visa")
    add_source(db, "acme", backup, actor="Jane Doe", clock=clock)

    [report] = service.run_cycle().charged
    assert (report.phase, report.integration_error) == (Phase.FAILED, True)
    [attempt] = attempts(db)
    assert (attempt.status, attempt.code, attempt.decline_class) == (
        AttemptStatus.ERROR,
        "payment_method_missing",
        None,
    )
    placeholder, _ = sources(db)
    assert placeholder.unusable_reason.startswith("payment_method_missing on ")
    assert "our record of the card is wrong, not the customer's card" in placeholder.unusable_reason
    assert customer_mail(db) == []
    with db.reading() as s:
        account = s.get(Account, "acme")
        assert (account.recharge_state, account.failed_cycles) == ("ok", 0)

    [paid] = service.run_cycle().charged
    assert paid.phase == Phase.FINISHED
    assert [a.status for a in attempts(db)] == [AttemptStatus.ERROR, AttemptStatus.SUCCEEDED]
    assert customer_mail(db) == ["receipt"]


def test_a_card_of_another_customer_is_our_error_too(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client)
    theirs = card_on_file(stripe_client, "pm_card_visa")
    other = card_on_file(stripe_client, "pm_card_mastercard")  # a customer of its own
    add_source(
        db,
        "acme",
        CardInfo(other.customer, theirs.payment_method, "visa", "4242", theirs.exp_month, theirs.exp_year),
        actor="Jane Doe",
        clock=clock,
    )
    [report] = service.run_cycle().charged
    assert report.integration_error
    [attempt] = attempts(db)
    assert (attempt.status, attempt.code) == (AttemptStatus.ERROR, "payment_method_of_another_customer")
    assert customer_mail(db) == []
    [plan] = plan_accounts(db, settings, clock.now())
    assert plan.decision.reason == "no_funding_source"


def test_a_card_detached_by_the_customer_is_still_a_card_that_went_away(db, settings, service, clock, stripe_client):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    [source] = sources(db)
    stripe_client.client.v1.payment_methods.detach(source.payment_method)
    [report] = service.run_cycle().charged
    assert not report.integration_error
    [attempt] = attempts(db)
    assert (attempt.status, attempt.code) == (AttemptStatus.DECLINED, "payment_method_detached")
