"""`receipts`, `outbox` and `statement` as an admin runs them: a real process, a Stripe-compatible server, the
.eml folder of the embedded default, and a real SMTP server for a copy."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

import pytest

from tests.e2e.commands import charging_env, command_runner, ok
from tests.helpers import card_on_file


@pytest.fixture
def run(tmp_path, db_url, stripe_server):
    env = {**charging_env(db_url, stripe_server.url), "RECHARGED_BUSINESS__NAME": "Dialer Co Ltd"}
    return command_runner(tmp_path, env)


def test_receipts_outbox_and_statement_from_the_command_line(run, stripe_client, smtp_server, tmp_path):
    ok(run("db", "upgrade"))
    ok(
        run(
            "accounts",
            "create",
            "acme",
            "--email",
            "billing@acme.example",
            "--plan",
            "standard",
            "--vat-percent",
            "20",
            "--created-at",
            "2026-10-01T00:00:00Z",
        )
    )
    card = card_on_file(stripe_client, "pm_card_visa")
    ok(run("sources", "add", "acme", "--customer", card.customer, "--payment-method", card.payment_method))
    ok(run("topup", "acme", "25.00"))

    listed = json.loads(ok(run("receipts", "acme", "--json")))
    assert [(r["number"], r["charged"], r["card"], r["email"]) for r in listed] == [
        ("R-000001", "30.00000", "visa ...4242", "pending")
    ]
    assert "R-000001" in ok(run("receipts", "acme"))
    shown = ok(run("receipts", "show", "R-000001"))
    assert "Receipt R-000001" in shown
    assert "Total charged                $30.00" in shown

    queued = json.loads(ok(run("outbox", "--json")))
    assert queued["summary"]["pending"] == 2  # the card-added notice and the receipt
    sent = ok(run("outbox", "send"))  # no SMTP host configured: the embedded default writes .eml files
    assert "sent 2" in sent
    assert sorted(p.name for p in (tmp_path / "outbox").glob("*.eml")) == [
        "recharged.receipt.R-000001@example.com.eml",
        "recharged.settings.audit.2@example.com.eml",
    ]
    assert json.loads(ok(run("receipts", "acme", "--json")))[0]["email"] == "sent"

    smtp = {
        "RECHARGED_SMTP__HOST": "127.0.0.1",
        "RECHARGED_SMTP__PORT": str(smtp_server.port),
        "RECHARGED_SMTP__SECURITY": "none",
    }
    ok(run("receipts", "show", "R-000001", "--resend", **smtp))
    [copy] = smtp_server.received
    assert copy.message["Subject"] == "[Copy] Receipt R-000001: $25.00 added to your balance"

    smtp_server.refuse("550 5.1.1 no such user", at="RCPT")
    ok(run("auto-recharge", "acme", "--enable"))
    failed = run("outbox", "send", **smtp)
    assert failed.returncode == 1
    assert "failed 1" in failed.stdout
    listing = ok(run("outbox", "list", "--status", "failed"))
    assert "refused: 550 5.1.1 no such user" in listing
    assert "1 failed for good" in listing

    month = datetime.now(UTC)  # the top-up was charged now: this month's statement so far
    statement = json.loads(ok(run("statement", "acme", "--month", f"{month:%Y-%m}", "--json")))
    assert [c["description"] for c in statement["credits"]] == ["Purchase, receipt R-000001"]
    assert statement["closing_balance"]["amount"] == "25.00"
    rows = list(
        csv.DictReader(io.StringIO(ok(run("statement", "acme", "--month", f"{month:%Y-%m}", "--format", "csv"))))
    )
    assert rows[-1]["amount"] == "25.00"
    assert f"Statement for {month:%B %Y}" in ok(run("statement", "acme", "--month", f"{month:%Y-%m}"))
    bad = run("statement", "acme", "--month", "November")
    assert bad.returncode == 2
    assert "must be YYYY-MM" in bad.stderr
    missing = run("receipts", "show", "R-999999")
    assert missing.returncode == 3
    assert "no receipt" in missing.stderr
    assert "every invariant holds" in ok(run("verify"))
