"""Monthly statements: products from the per-day usage, credits and charges from the ledger, opening and closing
balances that agree with the ledger, to the cent with the rounding note; issued once per account and month.
SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import func, select
from tenacity import wait_none

from recharged.accounts import adjust_balance
from recharged.clock import FixedClock
from recharged.mail.outbox import OutboxSender
from recharged.mail.statements import as_csv, as_json, issue_monthly_statements, statement_for
from recharged.mail.templating import render
from recharged.recharge import RechargeService
from recharged.store.models import Entry, OutboxMessage, Statement
from recharged.usage import UsageRecorder
from tests.helpers import add_account, busy_account, call, mail_settings

DEC_1 = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
NOVEMBER = date(2026, 11, 1)


@pytest.fixture
def mail(tmp_path):
    return mail_settings(tmp_path)


def ledger_balance(db, account: str, before: datetime) -> int:
    with db.transaction() as s:
        return int(
            s.scalar(
                select(func.coalesce(func.sum(Entry.amount), 0)).where(
                    Entry.account_id == account, Entry.occurred_at < before
                )
            )
        )


def small_usage(db, settings, clock, account: str = "acme") -> None:
    """October and November usage of several products, some of it in fractions of a cent."""
    UsageRecorder(db, settings, clock).record(
        [
            call("oct-1", account, seconds=600, at="2026-10-15T10:00:00Z"),
            call("nov-1", account, seconds=70, at="2026-11-02T10:00:00Z"),  # 2 minutes
            call("nov-2", account, seconds=3600, at="2026-11-21T23:59:00Z"),  # 60 minutes
            call("dec-1", account, seconds=60, at="2026-11-22T11:59:00Z", kind="recording"),
            {
                "event_id": "sms-1",
                "account_id": account,
                "kind": "sms_out",
                "started_at": "2026-11-03T10:00:00Z",
                "text": "x" * 200,
            },  # 2 segments
            {
                "event_id": "look-1",
                "account_id": account,
                "kind": "lookup",
                "started_at": "2026-11-04T10:00:00Z",
                "quantity": "3",
            },
        ]
    )


def test_a_month_reads_as_products_credits_and_balances_that_agree_with_the_ledger(db, mail, clock):
    add_account(db, mail, clock, opening_balance="50.00")
    small_usage(db, mail, clock)
    adjust_balance(db, "acme", 1_000_000, reason="internal note", actor="Jane Doe", clock=clock)
    statement = statement_for(db, mail, "acme", NOVEMBER, DEC_1)
    assert statement["opening"] == ledger_balance(db, "acme", datetime(2026, 11, 1, tzinfo=UTC)) == 5_000_000 - 20_000
    assert statement["closing"] == ledger_balance(db, "acme", datetime(2026, 12, 1, tzinfo=UTC))
    products = {p["kind"]: (p["label"], p["quantity"], p["unit"], p["amount"]) for p in statement["products"]}
    assert products == {
        "dialer": ("Dialer minutes", "62", "min", 124_000),
        "recording": ("Call recording minutes", "1", "min", 250),
        "sms_out": ("SMS sent", "2", "segments", 1_580),
        "lookup": ("Number lookups", "3", "lookups", 3_000),
    }
    assert [(c["description"], c["amount"]) for c in statement["credits"]] == [("Credit adjustment", 1_000_000)]
    text = " ".join(render(mail, "statement", statement).text.split())  # the columns' spacing aside
    for expected in (
        "Statement for November 2026 (01 Nov 2026 to 30 Nov 2026, UTC)",
        "Opening balance 01 Nov 2026 $49.80",
        "Dialer minutes 62 min $1.24",
        "Call recording minutes 1 min $0.00",  # a quarter of a cent
        "SMS sent 2 segments $0.02",
        "Total usage $1.29",  # $1.2883
        "Credit adjustment $10.00",
        "Closing balance 30 Nov 2026 $58.51",
        "Your balance is kept to 5 decimal places",
    ):
        assert expected in text, expected
    assert "internal note" not in text  # an admin's reason is not the customer's business


def test_a_purchase_shows_its_receipt(db, mail, gateway_factory, clock, stripe_client):
    busy_account(db, mail, clock, stripe_client, "pm_card_visa")
    RechargeService(db, mail, gateway_factory, clock).topup("acme", 2_500_000, "Jane Doe")
    statement = statement_for(db, mail, "acme", NOVEMBER, DEC_1)
    assert [c["description"] for c in statement["credits"]] == ["Credit adjustment", "Purchase, receipt R-000001"]
    assert statement["closing"] == ledger_balance(db, "acme", datetime(2026, 12, 1, tzinfo=UTC))


def test_statements_are_issued_once_per_account_and_month_and_emailed(db, mail, clock, tmp_path):
    add_account(db, mail, clock, opening_balance="50.00")
    small_usage(db, mail, clock)
    late = FixedClock(DEC_1)
    add_account(db, mail, late, "newcomer", created_at="2026-12-01T05:00:00Z")  # no November to tell
    assert issue_monthly_statements(db, mail, late) == 1
    assert issue_monthly_statements(db, mail, late) == 0
    with db.transaction() as s:
        [stored] = s.scalars(select(Statement)).all()
        keys = list(s.scalars(select(OutboxMessage.key).where(OutboxMessage.kind == "statement")))
    assert (stored.account_id, stored.month, stored.closing_balance) == ("acme", NOVEMBER, 4_851_170)
    assert keys == ["statement:acme:2026-11"]
    OutboxSender(db, mail, late, wait=wait_none()).send_pending()
    [eml] = (tmp_path / "eml").glob("*statement*.eml")
    assert b"Subject: Statement for November 2026: account acme" in eml.read_bytes()
    # December's opening is November's closing
    assert statement_for(db, mail, "acme", date(2026, 12, 1), DEC_1)["opening"] == stored.closing_balance


def test_json_and_csv_round_to_the_cent_and_keep_the_exact_figures(db, mail, clock):
    add_account(db, mail, clock, opening_balance="50.00")
    small_usage(db, mail, clock)
    statement = statement_for(db, mail, "acme", NOVEMBER, DEC_1)
    as_dict = as_json(statement)
    assert as_dict["closing_balance"] == {"amount": "48.51", "amount_exact": "48.51170"}
    assert as_dict["products"][0] | {} == {
        "kind": "dialer",
        "label": "Dialer minutes",
        "events": 2,
        "quantity": "62",
        "unit": "min",
        "amount": "1.24",
        "amount_exact": "1.24000",
    }
    rows = list(csv.DictReader(io.StringIO(as_csv(statement))))
    assert [r["section"] for r in rows][:2] == ["opening_balance", "usage"]
    assert rows[-1] == {
        "section": "closing_balance",
        "date": "2026-11-30",
        "description": "Closing balance",
        "quantity": "",
        "unit": "",
        "amount": "48.51",
        "amount_exact": "48.51170",
    }
