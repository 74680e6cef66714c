"""Money after the charge: refunds and disputes reverse a recharge's credit in the ledger, each once, against the
account the recharge credited, with a notice; a dispute pauses automatic recharge until an admin acts; statements
and `reconcile` show it all. On SQLite and PostgreSQL, with the real Stripe SDK against the Stripe-compatible
server, its events signed as Stripe signs them and posted to the daemon's webhook, twice and out of order.

busy_account's recharge credits 84.00 and charges 100.80 (20% VAT): a refund of X of the charge takes
X x 84.00 / 100.80 off the balance (`money.credit_reversed`).
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select

from recharged.accounts import change_account
from recharged.mail.statements import as_csv, as_json, statement_for
from recharged.mail.templating import render
from recharged.money import credit_reversed
from recharged.planning import plan_accounts
from recharged.reconcile import reconcile
from recharged.states import EntryType, RechargeState
from recharged.status import DaemonAnswer, status_report
from recharged.store.models import Account, AuditRecord, Entry, OutboxMessage, Recharge
from recharged.verify import verify
from tests.helpers import Api, api_auth, busy_account, open_dispute

NET, TOTAL = 8_400_000, 10_080_000  # 84.00 credited, 100.80 charged
BEFORE = 100_000  # busy_account's balance before its recharge
MONTH = date(2026, 11, 1)


# --- the rule, on its own ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_back", "reversed_"),
    [
        (TOTAL, NET),  # all of the charge: exactly the credit, VAT and all
        (1_260_000, 1_050_000),  # 12.60 of 100.80 -> 10.50 of 84.00
        (1_000_000, 833_333),  # 10.00 of 100.80 -> 8.333333.. rounded half-up to 8.33333
        (0, 0),
    ],
)
def test_money_given_back_reverses_its_share_of_the_credit_vat_included(given_back, reversed_):
    assert credit_reversed(given_back, TOTAL, NET) == reversed_


def test_refunds_in_parts_reverse_the_credit_within_a_unit_each():
    parts = [333_000, 333_000, 3_000_000, TOTAL - 3_666_000]
    assert sum(parts) == TOTAL
    assert abs(sum(credit_reversed(p, TOTAL, NET) for p in parts) - NET) <= len(parts) - 1
    with pytest.raises(ValueError, match="positive charge"):
        credit_reversed(100, 0, NET)


# --- helpers -------------------------------------------------------------------------------------------------


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


def charge(api: Api, stripe_client, *cards: str, vat: str = "20") -> Recharge:
    """acme, below its threshold, recharged by the daemon's own service: the recharge as it ended."""
    busy_account(api.db, api.settings, api.clock, stripe_client, *(cards or ("pm_card_visa",)), vat=vat)
    [report] = api.daemon.runtime().recharges.run_cycle().charged
    assert report.phase == "finished", report
    return recharge_of(api, report.recharge_id)


def recharge_of(api: Api, recharge_id: int) -> Recharge:
    with api.db.reading() as s:
        return s.get(Recharge, recharge_id)


def charge_id(server, payment_intent: str) -> str:
    [intent] = [pi for pi in server.payment_intents() if pi["id"] == payment_intent]
    return intent["latest_charge"]


class Deliveries:
    """Delivers the server's new events to the webhook, every one twice and out of order (newest first, then
    oldest first), and lets the daemon handle them."""

    def __init__(self, api: Api, server) -> None:
        self.api, self.server, self.seen = api, server, set()

    def __call__(self) -> list[str]:
        fresh = [e for e in self.server.events() if e["id"] not in self.seen]
        for event in [*reversed(fresh), *fresh]:
            answer = self.api.deliver(self.server, event)
            assert answer.status_code == 200, answer.text
            outcome = answer.json()["outcome"]
            assert outcome == ("duplicate" if event["id"] in self.seen else outcome), outcome
            assert outcome in ("stored", "ignored", "duplicate")
            self.seen.add(event["id"])
        self.api.settle_events()
        with self.api.db.reading() as s:
            from recharged.store.models import ProcessorEvent

            failed = list(s.scalars(select(ProcessorEvent).where(ProcessorEvent.last_error.is_not(None))))
        assert failed == [], [(e.id, e.type, e.last_error) for e in failed]
        return [e["type"] for e in fresh]


def balance(api: Api, account: str = "acme") -> int:
    with api.db.reading() as s:
        return s.get(Account, account).balance


def reversals(api: Api) -> list[tuple[str, str, int]]:
    with api.db.reading() as s:
        rows = s.execute(
            select(Entry.entry_type, Entry.external_id, Entry.amount)
            .where(Entry.entry_type.in_([EntryType.REFUND, EntryType.DISPUTE, EntryType.REINSTATED]))
            .order_by(Entry.id)
        ).all()
    return [(str(t), x, a) for t, x, a in rows]


def notices(api: Api, *kinds: str) -> list[str]:
    with api.db.reading() as s:
        return list(
            s.scalars(select(OutboxMessage.key).where(OutboxMessage.kind.in_(kinds)).order_by(OutboxMessage.id))
        )


def agree(api: Api, gateway_factory, expected_balance: int) -> dict:
    """After each step: the balance, the month's statement and `reconcile` agree, and `verify` is clean. Returns
    the reconcile report as JSON."""
    assert balance(api) == expected_balance
    content = statement_for(api.db, api.settings, "acme", MONTH, api.clock.now())
    assert content["closing"] == expected_balance
    assert content["reversals_total"] == sum(r["amount"] for r in content["reversals"])
    text = render(api.settings, "statement", content).text
    for line in content["reversals"]:
        assert line["description"] in text
    report = reconcile(api.db, gateway_factory(), api.clock.now() - timedelta(days=30))
    assert report.ok, report.problems
    assert sum(report.reversed.values(), 0) == -sum(a for _, _, a in reversals(api))
    checked = verify(api.db)
    assert checked.ok, checked.violations
    return report.as_json()


# --- the lifecycle -------------------------------------------------------------------------------------------


def test_charge_refunds_dispute_and_its_reinstatement_each_move_the_balance_once(
    api: Api, stripe_client, stripe_server, gateway_factory
):
    """Charge, partial refund, second partial refund, dispute opened with its funds withdrawn, dispute won with its
    funds reinstated; every webhook delivered twice and out of order; after each step the balance, the statement
    and reconcile agree, and verify is clean."""
    deliver = Deliveries(api, stripe_server)
    recharge = charge(api, stripe_client)
    pi, client = recharge.payment_intent, stripe_client.client
    assert "payment_intent.succeeded" in deliver()
    report = agree(api, gateway_factory, BEFORE + NET)
    assert (report["charged"], report["refunded"], report["disputed"]) == ({"USD": "100.80000"}, {}, {})

    client.v1.refunds.create(params={"payment_intent": pi, "amount": 1260})  # 12.60 of 100.80
    assert {"refund.created", "charge.refunded"} <= set(deliver())
    [(kind, first_refund, amount)] = reversals(api)
    assert (kind, amount) == ("refund", -1_050_000)
    report = agree(api, gateway_factory, BEFORE + NET - 1_050_000)
    assert (report["refunded"], report["reversed"]) == ({"USD": "12.60000"}, {"USD": "10.50000"})

    client.v1.refunds.create(params={"payment_intent": pi, "amount": 2520})  # 25.20 more
    deliver()
    assert [a for _, _, a in reversals(api)] == [-1_050_000, -2_100_000]
    report = agree(api, gateway_factory, BEFORE + NET - 3_150_000)
    assert report["refunded"] == {"USD": "37.80000"}

    dispute = open_dispute(stripe_server, charge_id(stripe_server, pi))
    assert {"charge.dispute.created", "charge.dispute.funds_withdrawn"} <= set(deliver())
    assert reversals(api)[-1] == ("dispute", dispute["id"], -NET)
    after_dispute = BEFORE + NET - 3_150_000 - NET  # -30.50: below zero
    report = agree(api, gateway_factory, after_dispute)
    assert after_dispute < 0
    assert report["disputed"] == {"USD": "100.80000"}
    with api.db.reading() as s:
        account = s.get(Account, "acme")
        assert account.recharge_state == RechargeState.DISPUTED
        assert dispute["id"] in account.state_reason
    [plan] = plan_accounts(api.db, api.settings, api.clock.now())
    assert (plan.decision.action, plan.decision.reason, plan.decision.balance) == ("skip", "disputed", after_dispute)

    stripe_server.close_dispute(dispute["id"], won=True)
    assert {"charge.dispute.funds_reinstated", "charge.dispute.closed"} <= set(deliver())
    assert reversals(api)[-1] == ("reinstated", dispute["id"], NET)
    report = agree(api, gateway_factory, BEFORE + NET - 3_150_000)
    assert (report["disputed"], report["reversed"]) == ({}, {"USD": "31.50000"})

    # Delivered again, late and out of order, the first refund's events change nothing.
    for event in stripe_server.events(type="refund.created")[:1] + stripe_server.events(type="charge.refunded")[:1]:
        assert api.deliver(stripe_server, event).json()["outcome"] == "duplicate"
    assert len(reversals(api)) == 4
    assert reversals(api)[0][1] == first_refund

    # One notice per movement, each in the transaction of its entry; every line on the statement.
    assert notices(api, "refund", "dispute") == [
        f"refund:{first_refund}",
        f"refund:{reversals(api)[1][1]}",
        f"dispute:{dispute['id']}:withdrawn",
        f"dispute:{dispute['id']}:reinstated",
    ]
    content = statement_for(api.db, api.settings, "acme", MONTH, api.clock.now())
    assert [(r["type"], r["amount"], r["receipt"]) for r in content["reversals"]] == [
        ("refund", -1_050_000, "R-000001"),
        ("refund", -2_100_000, "R-000001"),
        ("dispute", -NET, "R-000001"),
        ("reinstated", NET, "R-000001"),
    ]
    assert "Refunds and disputes" in render(api.settings, "statement", content).text
    assert "Refund to your card, receipt R-000001" in as_csv(content)
    assert as_json(content)["reversals_total"]["amount"] == "-31.50"

    # Still paused though the dispute was won: an admin lifts it.
    change_account(api.db, "acme", actor="Jane Doe", clock=api.clock, settings=api.settings, auto_recharge=True)
    with api.db.reading() as s:
        assert s.get(Account, "acme").recharge_state == RechargeState.OK
    [plan] = plan_accounts(api.db, api.settings, api.clock.now())
    assert plan.decision.reason != "disputed"


# --- refunds -----------------------------------------------------------------------------------------------------


def test_a_partial_refund_of_a_charge_with_vat_takes_off_only_its_share_of_the_credit(
    api: Api, stripe_client, stripe_server, gateway_factory
):
    recharge = charge(api, stripe_client)
    deliver = Deliveries(api, stripe_server)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1000})
    deliver()
    # 10.00 of the 100.80 charged gives back 10.00 x 84.00 / 100.80 = 8.333.. of the credit (the rest was VAT)
    assert reversals(api) == [("refund", refund.id, -833_333)]
    assert balance(api) == BEFORE + NET - 833_333
    [key] = notices(api, "refund")
    with api.db.reading() as s:
        message = s.scalars(select(OutboxMessage).where(OutboxMessage.key == key)).one()
        context = message.context
    assert (context["refund"]["amount"], context["refund"]["balance_change"]) == (1_000_000, -833_333)
    rendered = render(api.settings, "refund", context)
    assert "$10.00" in rendered.subject
    assert "$8.33" in rendered.text
    assert "VAT" in rendered.text
    assert agree(api, gateway_factory, BEFORE + NET - 833_333)["refunded"] == {"USD": "10.00000"}


def test_a_pending_refund_posts_nothing_until_it_has_succeeded(api: Api, stripe_client, stripe_server, gateway_factory):
    recharge = charge(api, stripe_client, "pm_card_pendingRefund")
    deliver = Deliveries(api, stripe_server)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent})
    assert refund.status == "pending"
    deliver()
    assert reversals(api) == []  # no money has gone back yet
    agree(api, gateway_factory, BEFORE + NET)
    stripe_server.settle_refund(refund.id)
    deliver()
    assert reversals(api) == [("refund", refund.id, -NET)]  # all of it: exactly the credit
    agree(api, gateway_factory, BEFORE)


def test_a_refund_the_bank_returns_is_put_back_on_the_balance_once(
    api: Api, stripe_client, stripe_server, gateway_factory
):
    recharge = charge(api, stripe_client, "pm_card_refundFail")
    deliver = Deliveries(api, stripe_server)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 5040})
    deliver()
    assert reversals(api) == [("refund", refund.id, -NET // 2)]
    stripe_server.fail_refund(refund.id)
    assert "refund.failed" in deliver()
    assert reversals(api) == [("refund", refund.id, -NET // 2), ("refund", f"{refund.id}:failed", NET // 2)]
    agree(api, gateway_factory, BEFORE + NET)
    assert notices(api, "refund") == [f"refund:{refund.id}", f"refund:{refund.id}:failed"]
    content = statement_for(api.db, api.settings, "acme", MONTH, api.clock.now())
    assert [r["description"].split(",")[0] for r in content["reversals"]] == [
        "Refund to your card",
        "Refund returned by your bank",
    ]


# --- disputes ------------------------------------------------------------------------------------------------------


def test_a_dispute_pauses_automatic_recharge_until_an_admin_enables_it_and_status_and_healthz_show_it(
    api: Api, stripe_client, stripe_server, gateway_factory
):
    recharge = charge(api, stripe_client, "pm_card_createDispute")  # Stripe's test card: disputed at once
    Deliveries(api, stripe_server)()
    [dispute] = stripe_server.disputes()
    assert reversals(api) == [("dispute", dispute["id"], -NET)]
    agree(api, gateway_factory, BEFORE)

    report = status_report(api.db, api.settings, api.clock.now(), DaemonAnswer(None, False, error="not asked"))
    [paused] = [a for a in report.attention if a.kind == RechargeState.DISPUTED]
    assert (paused.account, recharge.payment_intent in paused.detail) == ("acme", True)
    [check] = api.client.get("/healthz", headers=api_auth()).json()["checks"]["accounts:disputed"]
    assert (check["status"], check["observedValue"]) == ("warn", 1)
    with api.db.reading() as s:
        [audit] = s.scalars(select(AuditRecord).where(AuditRecord.action == "auto_recharge.disputed")).all()
    assert (audit.before, audit.after["dispute"]) == ({"recharge_state": "ok"}, dispute["id"])

    # The cycle leaves it alone, however low the balance.
    assert api.daemon.runtime().recharges.run_cycle().charged == []
    [message] = notices(api, "dispute")
    with api.db.reading() as s:
        context = s.scalars(select(OutboxMessage.context).where(OutboxMessage.key == message)).one()
    text = render(api.settings, "dispute", context).text
    assert "What is paused: automatic recharge" in text

    change_account(api.db, "acme", actor="Jane Doe", clock=api.clock, settings=api.settings, auto_recharge=True)
    [check] = api.client.get("/healthz", headers=api_auth()).json()["checks"]["accounts:disputed"]
    assert check["status"] == "pass"
    assert [r.phase for r in api.daemon.runtime().recharges.run_cycle().charged] == ["finished"]


def test_a_dispute_of_a_payment_not_credited_yet_waits_for_the_credit_then_posts(
    api: Api, stripe_client, stripe_server, gateway_factory
):
    """The dispute card is disputed as it is charged, so its dispute events can come before the recharge knows it
    was paid (here: the answer to the charge was lost). The event waits; once the recharge is credited, the
    dispute is posted."""
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_createDispute")
    stripe_server.inject("drop_after_commit")
    crashed = api.daemon.runtime().recharges
    [report] = (
        type(crashed)(api.db, api.settings, lambda: gateway_factory(max_retries=0), api.clock).run_cycle().charged
    )
    assert report.phase == "charging"
    events = stripe_server.events(type="charge.dispute.*")
    for event in events:
        assert api.deliver(stripe_server, event).json()["outcome"] == "stored"
    api.settle_events()
    row = api.event_row(events[0]["id"])
    assert (row.status, row.attempts) == ("pending", 1)
    assert f"recharge {report.recharge_id} is charging" in row.last_error
    assert reversals(api) == []
    report_now = status_report(api.db, api.settings, api.clock.now(), DaemonAnswer(None, False, error="-"))
    assert {a.kind for a in report_now.attention} >= {"event_failing"}

    [recovered] = crashed.recover()
    assert recovered.phase == "finished"
    api.clock.advance(timedelta(minutes=1))  # the events' retry time
    api.settle_events()
    [dispute] = stripe_server.disputes()
    assert reversals(api) == [("dispute", dispute["id"], -NET)]
    assert api.event_row(events[0]["id"]).status == "handled"
    agree(api, gateway_factory, BEFORE)


def test_a_refunded_then_disputed_top_up_is_taken_off_the_balance_and_reconcile_compares_what_was_given_back(
    api: Api, stripe_client, stripe_server, gateway_factory
):
    """Issue 11, defect 1: a 100.00 top-up refunded and then disputed left the balance at 100.00, and reconcile
    called it matched because a refunded PaymentIntent stays succeeded."""
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_visa", vat="0")
    change_account(api.db, "acme", actor="Jane Doe", clock=api.clock, settings=api.settings, auto_recharge=False)
    top_up = api.daemon.runtime().recharges.topup("acme", 10_000_000, "Jane Doe")
    assert top_up.phase == "finished"
    pi = recharge_of(api, top_up.recharge_id).payment_intent
    stripe_client.client.v1.refunds.create(params={"payment_intent": pi})
    dispute = open_dispute(stripe_server, charge_id(stripe_server, pi))

    before = reconcile(api.db, gateway_factory(), api.clock.now() - timedelta(days=30))  # no event handled yet
    assert sorted(p.kind for p in before.problems) == ["dispute_without_reversal", "refund_without_reversal"]
    assert {p.payment_intent for p in before.problems} == {pi}

    Deliveries(api, stripe_server)()
    assert [(t, a) for t, _, a in reversals(api)] == [("refund", -10_000_000), ("dispute", -10_000_000)]
    assert balance(api) == BEFORE - 10_000_000  # the top-up given back twice: the balance is below zero
    report = agree(api, gateway_factory, BEFORE - 10_000_000)
    assert (report["refunded"], report["disputed"]) == ({"USD": "100.00000"}, {"USD": "100.00000"})
    assert dispute["id"] in {x for _, x, _ in reversals(api)}


def test_reconcile_reports_a_reversal_without_its_refund_and_one_of_another_amount(
    api: Api, stripe_client, stripe_server, gateway_factory
):
    from recharged.store.ledger import post_entry

    recharge = charge(api, stripe_client)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1260})
    Deliveries(api, stripe_server)()
    with api.db.transaction() as s:
        s.execute(Entry.__table__.update().where(Entry.external_id == refund.id).values(amount=-1_000_000))
        post_entry(
            s,
            "acme",
            EntryType.REFUND,
            "re_NotAtTheProcessor",
            -5_000,
            api.clock.now(),
            payment_intent=recharge.payment_intent,
        )
    report = reconcile(api.db, gateway_factory(), api.clock.now() - timedelta(days=30))
    found = sorted((p.kind, p.payment_intent) for p in report.problems)
    assert found == [
        ("reversal_mismatch", recharge.payment_intent),
        ("reversal_without_refund", recharge.payment_intent),
    ]
    details = " | ".join(p.detail for p in report.problems)
    assert "-10.50 USD to reverse, but the ledger has -10.00 USD" in details
    assert "re_NotAtTheProcessor" in details
