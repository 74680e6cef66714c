"""Receipts: exactly one per credit, written with it, numbered per issuer with no gaps, and the email as the SMTP
server receives it; listing, copies, and what `verify` proves. SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from tenacity import wait_none

from recharged.accounts import adjust_balance
from recharged.mail.outbox import OutboxSender
from recharged.mail.receipts import list_receipts, receipt_text, resend_copy
from recharged.recharge import RechargeService
from recharged.store.ledger import next_receipt_number
from recharged.store.models import OutboxMessage, Receipt, Recharge
from recharged.verify import verify
from tests.helpers import busy_account, mail_settings, with_amounts

ACTOR = "Jane Doe"


@pytest.fixture
def mail(tmp_path, smtp_server):
    return mail_settings(tmp_path, smtp_server)


@pytest.fixture
def service(db, mail, gateway_factory, clock):
    return RechargeService(db, mail, gateway_factory, clock)


def receipts(db) -> list[Receipt]:
    with db.transaction() as s:
        return list(s.scalars(select(Receipt).order_by(Receipt.seq)))


def deliver(db, settings, clock):
    return OutboxSender(db, settings, clock, wait=wait_none()).send_pending()


def test_every_credit_gets_one_receipt_numbered_without_gaps(db, mail, service, clock, stripe_client):
    for account in ("acme", "bolt"):
        busy_account(db, mail, clock, stripe_client, "pm_card_visa", account=account)
    service.run_cycle()
    service.topup("acme", 2_500_000, ACTOR)
    issued = receipts(db)
    assert [r.number for r in issued] == ["R-000001", "R-000002", "R-000003"]
    assert sorted((r.account_id, r.kind) for r in issued[:2]) == [("acme", "auto"), ("bolt", "auto")]  # charged at once
    assert (issued[2].account_id, issued[2].kind) == ("acme", "topup")
    with db.transaction() as s:
        credited = {r.id: r for r in s.scalars(select(Recharge))}
        keys = set(s.scalars(select(OutboxMessage.key).where(OutboxMessage.kind == "receipt")))
    for receipt in issued:  # the amounts of its recharge, and its email queued with it
        recharge = credited[receipt.recharge_id]
        assert (receipt.amount, receipt.vat, receipt.total) == (recharge.amount, recharge.vat, recharge.total)
        assert receipt.payment_reference == recharge.payment_intent
    assert keys == {"receipt:R-000001", "receipt:R-000002", "receipt:R-000003"}
    service.run_cycle()  # nothing due: nothing new
    assert len(receipts(db)) == 3
    assert verify(db).ok


def test_the_receipt_email_as_the_server_received_it(db, mail, service, clock, stripe_client, smtp_server):
    busy_account(db, mail, clock, stripe_client, "pm_card_visa")
    service.run_cycle()
    deliver(db, mail, clock)
    [received] = [r for r in smtp_server.received if r.message["X-Recharged-Kind"] == "receipt"]
    message = received.message
    assert message["Message-ID"] == "<recharged.receipt.R-000001@dialer.example>"
    assert message["Subject"] == "Receipt R-000001: $84.00 added to your balance"
    assert message["To"] == "billing@acme.example"
    text, html = received.part("plain"), received.part("html")
    [receipt] = receipts(db)
    for expected in (
        "Receipt R-000001",
        "Date: 22 Nov 2026, 12:00 UTC",
        "Account: acme (billing@acme.example)",
        "Automatic recharge",
        "Credited to your balance     $84.00",
        "VAT 20%                      $16.80",
        "Total charged                $100.80",
        "Paid with: Visa ending in 4242",
        f"Payment reference: {receipt.payment_reference}",
        "New balance: $85.00",  # $1.00 + $84.00
        "That is about 4,250 dialer minutes at $0.02 a minute.",
        "Why we charged you: your average daily usage over the last 30 days was $6.00; we keep at least 7 days "
        "($42.00) and add 14 days ($84.00) when the balance falls below that.",
        "Dialer Co Ltd\n1 Main Street\nSpringfield\nVAT ID: GB123456789",
    ):
        assert expected in text, expected
    for expected in ("Receipt R-000001", "<strong>$100.80</strong>", "Visa ending in 4242", "4,250 dialer minutes"):
        assert expected in html, expected
    assert receipt.content["business"]["name"] == "Dialer Co Ltd"  # kept as issued


def test_a_shortfall_receipt_shows_the_nominal_figures_then_what_changed_the_amount(
    db, mail, service, clock, stripe_client
):
    """Issue 13, item 6: the receipt said "we keep at least 7 days ($42.00) and add 14 days ($626.00)": the
    nominal recharge replaced by the amount charged. It now shows the nominal figures, then in plain words the
    shortfall, all read from the decision kept with the recharge."""
    busy_account(db, mail, clock, stripe_client, "pm_card_visa")
    adjust_balance(db, "acme", -58_500_000, reason="calls billed late", actor=ACTOR, clock=clock)  # $1.00 -> -$584.00
    service.run_cycle()
    [receipt] = receipts(db)
    text = receipt_text(mail, receipt)
    assert (
        "your average daily usage over the last 30 days was $6.00; we keep at least 7 days ($42.00) and add 14 days "
        "($84.00) when the balance falls below that." in text
    )
    assert "This time we added $626.00, to bring your balance of -$584.00 back above the least we keep." in text
    with db.transaction() as s:
        recharge = s.scalars(select(Recharge)).one()
        assert recharge.limited_by == "shortfall"
        assert recharge.decision is not None
        assert (recharge.decision["nominal_recharge"], recharge.decision["charge_amount"]) == (8_400_000, 62_600_000)
        recharge.decision = {**recharge.decision, "charge_amount": 8_400_000}  # tampered with: verify notices
    assert any("its decision does not recompute" in problem for problem in verify(db).violations)


def test_a_capped_receipt_says_which_cap_and_what_it_counted(db, mail, gateway_factory, clock, stripe_client):
    capped = with_amounts(mail, max_recharge="60")
    busy_account(db, mail, clock, stripe_client, "pm_card_visa")
    RechargeService(db, capped, gateway_factory, clock).run_cycle()
    [receipt] = receipts(db)
    text = receipt_text(capped, receipt)
    assert "add 14 days ($84.00)" in text
    assert "This time we added $50.00: one automatic recharge charges your card at most $60.00." in text
    assert receipt.total == 6_000_000  # $50.00 + $10.00 VAT: the cap bounds what the card paid


def test_a_purchase_receipt_without_vat_has_no_reason(db, mail, service, clock, stripe_client):
    busy_account(db, mail, clock, stripe_client, "pm_card_visa", vat="0")
    service.topup("acme", 2_500_000, ACTOR)
    [receipt] = receipts(db)
    text = receipt_text(mail, receipt)
    assert "One-time purchase" in text
    assert "VAT 0%                       none" in text
    assert "Total charged                $25.00" in text
    assert "Why we charged you" not in text


def test_a_rolled_back_transaction_gives_its_number_back(db):
    class Boom(Exception):
        pass

    with pytest.raises(Boom), db.transaction() as s:  # noqa: PT012 - the number is taken, then the transaction fails
        assert next_receipt_number(s, "R") == 1
        raise Boom
    with db.transaction() as s:
        assert [next_receipt_number(s, "R"), next_receipt_number(s, "R"), next_receipt_number(s, "X")] == [1, 2, 1]


def test_numbers_taken_at_once_by_many_workers_have_no_gaps_and_no_repeats(db):
    taken: list[int] = []

    def work() -> None:
        for _ in range(10):
            with db.transaction() as s:
                taken.append(next_receipt_number(s, "R"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == list(range(1, 41))


def test_a_second_receipt_for_the_same_recharge_is_refused_by_the_database(db, mail, service, clock, stripe_client):
    busy_account(db, mail, clock, stripe_client, "pm_card_visa")
    service.run_cycle()
    [receipt] = receipts(db)
    values = {c.name: getattr(receipt, c.name) for c in Receipt.__table__.columns if c.name != "id"}
    with pytest.raises(IntegrityError), db.transaction() as s:
        s.add(Receipt(**(values | {"number": "R-999999", "seq": 999_999})))


def test_listing_and_a_copy_marked_as_a_copy(db, mail, service, clock, stripe_client, smtp_server):
    busy_account(db, mail, clock, stripe_client, "pm_card_visa")
    service.run_cycle()
    deliver(db, mail, clock)
    [row] = list_receipts(db, "acme")
    assert (row.number, row.total, row.card, row.email_status) == ("R-000001", 10_080_000, "visa ...4242", "sent")
    copy_id = resend_copy(db, clock, "R-000001")
    assert deliver(db, mail, clock).sent == [copy_id]
    copies = [r for r in smtp_server.received if r.message["Subject"].startswith("[Copy]")]
    assert [c.message["Message-ID"] for c in copies] == ["<recharged.receipt.R-000001.copy.1@dialer.example>"]
    assert "a copy of receipt R-000001, sent again on request" in copies[0].part("plain")
    assert resend_copy(db, clock, "R-000001") != copy_id  # a second copy is another message
    assert len(receipts(db)) == 1  # a copy is not a new receipt


def test_verify_finds_a_missing_receipt_and_a_gap(db, mail, service, clock, stripe_client):
    for account in ("acme", "bolt"):
        busy_account(db, mail, clock, stripe_client, "pm_card_visa", account=account)
    service.run_cycle()
    with db.transaction() as s:
        s.execute(delete(OutboxMessage).where(OutboxMessage.key == "receipt:R-000001"))
        s.execute(delete(Receipt).where(Receipt.number == "R-000001"))
    violations = verify(db).violations
    assert "receipts of issuer R: 1 numbers from 2 to 2, not 1 to 1" in violations
    assert any(v.endswith("credited without a receipt") for v in violations)
