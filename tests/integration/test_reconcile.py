"""`reconcile`: the processor's PaymentIntents against the ledger's credits and our recharges, with real
mismatches made at the Stripe-compatible server and in the database; on SQLite and PostgreSQL. Refunds and
disputes against the ledger's reversals are in test_reversals.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from recharged.accounts import adjust_balance
from recharged.recharge import RechargeService
from recharged.reconcile import reconcile
from recharged.store.ledger import post_entry
from recharged.store.models import Entry, FundingSource, Recharge
from recharged.verify import verify
from tests.helpers import busy_account

MONTH = timedelta(days=30)


@pytest.fixture
def charged(stripe_client, gateway_factory, db, settings, clock):
    """acme's first card declines, its second pays; birch pays at once: two succeeded charges, one declined."""
    busy_account(db, settings, clock, stripe_client, "pm_card_chargeDeclinedInsufficientFunds", "pm_card_visa")
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", account="birch")
    report = RechargeService(db, settings, gateway_factory, clock).run_cycle()
    assert sorted((r.account_id, r.phase) for r in report.charged) == [("acme", "finished"), ("birch", "finished")]
    return stripe_client


def run(db, gateway_factory, clock, since=None):
    return reconcile(db, gateway_factory(), since or clock.now() - MONTH)


def kinds(report):
    return sorted((p.kind, p.account) for p in report.problems)


def intent_of(db, account):
    with db.transaction() as s:
        return s.scalars(select(Recharge.payment_intent).where(Recharge.account_id == account)).one()


def test_every_charge_matching_its_credit_is_ok(charged, db, gateway_factory, clock):
    report = run(db, gateway_factory, clock)
    assert report.ok, report.problems
    assert (report.customers, report.charges, report.succeeded, report.matched) == (2, 3, 2, 2)
    assert report.charged == {"USD": 2 * 10_080_000}  # $84.00 + 20% VAT, twice
    assert report.credited == {"USD": 2 * 8_400_000}
    assert report.as_json()["charged"] == {"USD": "201.60000"}


def test_a_charge_made_outside_recharged_is_a_charge_without_credit(charged, db, gateway_factory, clock):
    with db.transaction() as s:
        source = s.scalars(select(FundingSource).where(FundingSource.account_id == "birch")).one()
        customer, method = source.customer, source.payment_method
    params = {
        "amount": 5000,
        "currency": "usd",
        "customer": customer,
        "payment_method": method,
        "confirm": True,
        "off_session": True,
        "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
        "metadata": {"recharged_account": "birch", "recharged_recharge": "999"},
    }
    stray = charged.client.v1.payment_intents.create(params=params)
    assert stray.status == "succeeded"

    report = run(db, gateway_factory, clock)
    [problem] = report.problems
    assert (problem.kind, problem.payment_intent, problem.account) == ("charge_without_credit", stray.id, "birch")
    assert "50.00 USD charged on" in problem.detail  # in the currency's own form, not in cents
    assert "recharge 999" in problem.detail
    assert report.matched == 2


def test_credits_without_a_succeeded_charge_are_reported(charged, db, gateway_factory, clock):
    [declined] = [pi for pi in charged.intents() if pi["status"] != "succeeded"]
    with db.transaction() as s:
        post_entry(s, "acme", "topup", "pi_NotAtTheProcessor", 1_000_000, clock.now())
        post_entry(s, "acme", "topup", declined["id"], 2_000_000, clock.now())

    report = run(db, gateway_factory, clock)
    by_intent = {p.payment_intent: p for p in report.problems}
    assert sorted(by_intent) == sorted(["pi_NotAtTheProcessor", declined["id"]])
    assert {p.kind for p in report.problems} == {"credit_without_charge"}
    assert "no such payment" in by_intent["pi_NotAtTheProcessor"].detail
    assert f"is {declined['status']}" in by_intent[declined["id"]].detail
    assert not report.ok


def test_tampered_amounts_currencies_and_accounts_are_reported(charged, db, gateway_factory, clock):
    acme, birch = intent_of(db, "acme"), intent_of(db, "birch")
    with db.transaction() as s:
        # acme: the recharge now says it charged one cent more, in euros
        s.execute(update(Recharge).where(Recharge.payment_intent == acme).values(total=10_081_000, currency="EUR"))
        # birch: its credit was moved to acme and changed
        s.execute(update(Entry).where(Entry.external_id == birch).values(account_id="acme", amount=8_300_000))

    report = run(db, gateway_factory, clock)
    found = sorted((p.payment_intent == acme, p.kind) for p in report.problems)
    assert found == [
        (False, "account_mismatch"),  # birch's charge names birch, acme was credited
        (False, "amount_mismatch"),  # credited 83.00, the recharge says 84.00
        (True, "amount_mismatch"),  # charged 10080 cents, the recharge says 100.81
        (True, "currency_mismatch"),  # charged in USD, the recharge says EUR
    ]
    details = " | ".join(p.detail for p in report.problems)
    assert "charged 100.80 USD, but recharge" in details
    assert "total is 100.81 EUR" in details
    assert "credited 83.00 USD, but recharge" in details
    assert "minor units" not in details
    assert "names account birch, but account acme was credited" in details
    assert report.matched == 0


def test_charges_before_the_date_are_not_reported(charged, stripe_server, db, gateway_factory, clock):
    # the local server's clock is the test's (real Stripe dates its payments now)
    report = run(db, gateway_factory, clock, since=clock.now() + timedelta(hours=1))
    assert report.ok
    assert (report.charges, report.succeeded) == (0, 0)
    assert (report.charged, report.credited) == ({}, {})  # nor their credits: charged = credited + VAT


def test_list_payments_pages_through_every_page(stripe_server, stripe_client, gateway_factory, clock):
    customer = stripe_client.client.v1.customers.create(params={"email": "pages@example.com"}).id
    stripe_client.customers.append(customer)
    method = stripe_client.client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer}).id
    for i in range(103):
        stripe_client.client.v1.payment_intents.create(
            params={
                "amount": 100 + i,
                "currency": "usd",
                "customer": customer,
                "payment_method": method,
                "confirm": True,
                "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
                "metadata": {"n": str(i)},
            }
        )
    records = gateway_factory().list_payments(customer, clock.now() - timedelta(hours=1))
    assert sorted(r.amount for r in records) == list(range(100, 203))
    assert {(r.currency, r.status) for r in records} == {("USD", "succeeded")}
    assert records[0].metadata.keys() == {"n"}
    assert records[0].created.tzinfo is not None


# --- after a restore (issue 11, defect 8) ------------------------------------------------------------------------


def left_charging(db, settings, clock, stripe_client, gateway_factory) -> tuple[int, str]:
    """acme's recharge was paid at the processor, but the database does not know it: the answer was lost, as in
    a database restored from a backup taken while the payment was in flight. Returns the recharge and the
    PaymentIntent."""
    server = stripe_client.local()
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    server.inject("drop_after_commit")
    [report] = RechargeService(db, settings, lambda: gateway_factory(max_retries=0), clock).run_cycle().charged
    assert report.phase == "charging"
    [intent] = stripe_client.intents(status="succeeded")
    return report.recharge_id, intent["id"]


def test_after_a_restore_reconcile_names_the_recharge_recover_will_credit_and_recover_credits_it_once(
    stripe_client, gateway_factory, db, settings, clock
):
    recharge_id, pi = left_charging(db, settings, clock, stripe_client, gateway_factory)
    report = run(db, gateway_factory, clock)
    [problem] = report.problems
    assert (problem.kind, problem.payment_intent, problem.account) == ("recoverable", pi, "acme")
    assert f"recharge {recharge_id} is still charging: `recharged recover` will credit it" in problem.detail
    assert "adjust" not in problem.detail

    [recovered] = RechargeService(db, settings, gateway_factory, clock).recover()
    assert recovered.phase == "finished"
    report = run(db, gateway_factory, clock)
    assert report.ok, report.problems
    assert report.credited == {"USD": 8_400_000}
    assert verify(db).ok


def test_an_adjustment_naming_a_payment_counts_as_its_credit_and_a_recovery_after_it_is_reported(
    stripe_client, gateway_factory, db, settings, clock
):
    _, pi = left_charging(db, settings, clock, stripe_client, gateway_factory)
    # What the old restore procedure had the admin do: credit the payment by hand, before recovering.
    adjust_balance(db, "acme", 8_400_000, reason="paid before the restore", actor="Jane Doe", clock=clock, reference=pi)
    [problem] = run(db, gateway_factory, clock).problems
    assert (problem.kind, problem.account) == ("recoverable_and_adjusted", "acme")
    assert "would credit it again" in problem.detail

    RechargeService(db, settings, gateway_factory, clock).recover()  # the double credit, now visible
    kinds = sorted(p.kind for p in run(db, gateway_factory, clock).problems)
    assert kinds == ["credited_twice"]


def test_an_adjustment_naming_a_payment_no_recharge_made_matches_it(charged, db, gateway_factory, clock):
    with db.transaction() as s:
        source = s.scalars(select(FundingSource).where(FundingSource.account_id == "birch")).one()
    stray = charged.client.v1.payment_intents.create(
        params={
            "amount": 5000,
            "currency": "usd",
            "customer": source.customer,
            "payment_method": source.payment_method,
            "confirm": True,
            "off_session": True,
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            "metadata": {"recharged_account": "birch"},
        }
    )
    assert [p.kind for p in run(db, gateway_factory, clock).problems] == ["charge_without_credit"]
    adjust_balance(db, "birch", 5_000_000, reason="paid by hand", actor="Jane Doe", clock=clock, reference=stray.id)
    report = run(db, gateway_factory, clock)
    assert report.ok, report.problems
    assert report.matched == 3


def test_a_customer_the_processor_deleted_or_cannot_list_is_a_problem_not_a_customer_that_paid_nothing(
    charged, stripe_server, db, gateway_factory, clock
):
    with db.transaction() as s:
        birch = s.scalars(select(FundingSource.customer).where(FundingSource.account_id == "birch")).one()
    charged.client.v1.customers.delete(birch)
    report = run(db, gateway_factory, clock)
    [problem] = report.problems  # and not a credit without a charge: its payments could not be checked
    assert (problem.kind, problem.payment_intent) == ("customer_deleted", None)
    assert birch in problem.detail
    assert "its payments cannot be listed" in problem.detail
    assert report.as_json()["problems"][0]["payment_intent"] is None

    stripe_server.inject("http_500", path_prefix="/v1/payment_intents", method="GET", times=None)
    report = run(db, gateway_factory, clock)
    assert sorted(p.kind for p in report.problems) == ["customer_deleted", "customer_unlistable"]
    assert report.succeeded == 0  # neither customer is taken as one that paid nothing
