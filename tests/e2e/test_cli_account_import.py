"""`accounts import` through the real `recharged` command (issue 14 item 6): every problem of a file in one pass,
and the cards it brings checked with the processor (the Stripe-compatible test server) before anything is written.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from recharged.store.engine import Database
from recharged.store.models import Account
from tests.e2e.commands import charging_env, command_runner, ok
from tests.helpers import card_on_file

HEADER = "id,email,plan,vat_percent,opening_balance,stripe_customer,payment_method,card_brand,card_last4,card_exp\n"


@pytest.fixture
def run(tmp_path, db_url, stripe_server):
    runner = command_runner(tmp_path, charging_env(db_url, stripe_server.url))
    ok(runner("db", "upgrade"))
    ok(runner("accounts", "create", "acme", "--email", "b@acme.example", "--plan", "standard", "--vat-percent", "20"))
    return runner


def accounts(db_url: str) -> list[str]:
    db = Database(db_url)
    try:
        with db.reading() as session:
            return sorted(session.scalars(select(Account.id)))
    finally:
        db.close()


def row(account_id: str, card: str = ",,,,", *, email: str = "", vat: str = "0") -> str:
    return f"{account_id},{email or f'b@{account_id}.example'},standard,{vat},10.00,{card}\n"


def on_file(info) -> str:
    return f"{info.customer},{info.payment_method},{info.brand},{info.last4},{info.exp_month:02d}/{info.exp_year}"


def test_bad_rows_and_conflicts_are_listed_together_by_line(run, tmp_path, db_url):
    path = tmp_path / "accounts.csv"
    path.write_text(
        HEADER + row("birch") + row("acme", vat="19") + row("cedar", email="not-an-email") + row("birch", vat="5")
    )
    result = run("accounts", "import", str(path), RECHARGED_STRIPE_API_KEY="")
    assert result.returncode == 2, result.stdout  # a bad row: fix the file first
    err = result.stderr
    assert "2 bad rows and 1 conflict with existing accounts; nothing was imported" in " ".join(err.split())
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith(str(path))]
    assert lines == [
        f"{path}:3: account acme: vat_percent: recorded 20, given 19; opening_balance: recorded 0.00000, given "
        "10.00000",
        f"{path}:4: email 'not-an-email' is not an email address",
        f"{path}:5: account id birch is on line 2 too",
    ]
    assert accounts(db_url) == ["acme"]

    path.write_text(HEADER + row("birch") + row("acme", vat="19"))
    only_conflicts = run("accounts", "import", str(path), RECHARGED_STRIPE_API_KEY="")
    assert only_conflicts.returncode == 4, only_conflicts.stdout
    assert f"{path}:3: account acme: vat_percent: recorded 20, given 19;" in only_conflicts.stderr
    assert accounts(db_url) == ["acme"]


def test_cards_are_checked_with_the_processor_before_anything_is_written(run, tmp_path, db_url, stripe_client):
    visa = card_on_file(stripe_client, "pm_card_visa")
    mastercard = card_on_file(stripe_client, "pm_card_mastercard")
    wrong_last4 = on_file(visa).replace(",4242,", ",4343,")
    path = tmp_path / "accounts.csv"
    path.write_text(
        HEADER
        + row("birch", on_file(visa))
        + row("cedar", "cus_Sample0000,pm_Sample0000,visa,4242,12/2029")
        + row("delta", wrong_last4)
        + row("elm", on_file(mastercard).replace(mastercard.customer, visa.customer))  # not that customer's card
        + row("fir")
    )
    result = run("accounts", "import", str(path))
    assert result.returncode == 2, result.stdout
    err = " ".join(result.stderr.split())
    assert "3 bad rows; nothing was imported" in err
    assert (
        f"{path}:3: stripe_customer/payment_method: payment method pm_Sample0000: No such PaymentMethod: "
        "'pm_Sample0000'"
    ) in err
    assert f"{path}:4: card_last4: 4242 at the processor, 4343 in the file" in err
    assert (
        f"{path}:5: stripe_customer/payment_method: payment method {mastercard.payment_method} is not attached to "
        f"customer {visa.customer}"
    ) in err
    assert f"{path}:2:" not in err
    assert f"{path}:6:" not in err
    assert accounts(db_url) == ["acme"]

    path.write_text(HEADER + row("birch", on_file(visa)) + row("fir"))
    assert "2 accounts created" in ok(run("accounts", "import", str(path)))
    [card] = json.loads(ok(run("sources", "list", "birch", "--json")))
    assert (card["payment_method"], card["unusable"]) == (visa.payment_method, None)
    created = json.loads(ok(run("audit", "birch", "--json")))[0]
    assert created["after"]["card_checked"] is True


def test_without_a_processor_key_cards_are_imported_unchecked_and_said_so(run, tmp_path, db_url):
    path = tmp_path / "accounts.csv"
    path.write_text(
        HEADER
        + row("birch", "cus_Sample0000,pm_Sample0000,visa,4242,12/2029")
        + row("cedar")
        + row("delta", "x,y,z,1,1")
    )
    bad = run("accounts", "import", str(path), RECHARGED_STRIPE_API_KEY="")
    assert bad.returncode == 2
    path.write_text(HEADER + row("birch", "cus_Sample0000,pm_Sample0000,visa,4242,12/2029") + row("cedar"))
    result = run("accounts", "import", str(path), RECHARGED_STRIPE_API_KEY="")
    assert result.returncode == 0, result.stderr
    assert "2 accounts created" in result.stdout
    assert (
        f"1 card was not checked with the processor (no Stripe API key is configured): {path}:2. A card the "
        "processor does not hold is set aside at its first charge as our error, never as the customer's decline"
    ) in " ".join(result.stderr.split())
    created = json.loads(ok(run("audit", "birch", "--json")))[0]
    assert created["after"]["card_checked"] is False
    assert sorted(accounts(db_url)) == ["acme", "birch", "cedar"]


def test_a_processor_that_cannot_be_reached_stops_the_import_before_anything_is_written(run, tmp_path, db_url):
    path = tmp_path / "accounts.csv"
    path.write_text(HEADER + row("birch") + row("cedar", "cus_Sample0000,pm_Sample0000,visa,4242,12/2029"))
    result = run(
        "accounts",
        "import",
        str(path),
        RECHARGED_PAYMENTS__STRIPE_API_BASE="http://127.0.0.1:9",  # nothing listens there
        RECHARGED_PAYMENTS__MAX_RETRIES="0",
    )
    assert result.returncode == 1, result.stdout
    assert f"{path}:3: checking the card with the processor: cannot reach the payment processor" in " ".join(
        result.stderr.split()
    )
    assert "nothing was imported" in result.stderr
    assert accounts(db_url) == ["acme"]
