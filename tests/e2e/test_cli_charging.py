"""`sources`, `cycle --once`, `topup` and `adjust` as an admin runs them, against a Stripe-compatible server."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from recharged.store.engine import Database
from recharged.store.models import ChargeAttempt, OutboxMessage
from tests.e2e.commands import REPO, charging_env, command_runner, ok
from tests.helpers import card_on_file

AT = "2026-11-16T09:00:00Z"


@pytest.fixture
def run(tmp_path, db_url, stripe_server):
    return command_runner(tmp_path, charging_env(db_url, stripe_server.url))


def test_charging_the_sample_through_the_cli(run, db_url, stripe_client, stripe_server):
    ok(run("db", "upgrade"))
    # The sample's cards are placeholders the processor does not hold: with a key, the import checks them and
    # refuses the file, naming each (issue 14 item 6); without one, they come in unchecked, and it says so.
    checked = run("accounts", "import", str(REPO / "examples/accounts.csv"))
    assert checked.returncode == 2, checked.stdout
    assert "5 bad rows; nothing was imported" in " ".join(checked.stderr.split())
    assert "accounts.csv:2: stripe_customer/payment_method: payment method pm_Sample0000: No such" in checked.stderr
    assert json.loads(ok(run("plan", "--json")))["accounts"] == []
    unchecked = run("accounts", "import", str(REPO / "examples/accounts.csv"), RECHARGED_STRIPE_API_KEY="")
    assert unchecked.returncode == 0, unchecked.stderr
    assert "5 cards were not checked with the processor" in unchecked.stderr
    ok(run("usage", "import", str(REPO / "examples/usage.csv"), "--rejects", os.devnull, "--accept-rejects"))
    # cedar-realty's card came over from the old system as a placeholder; give it a real one at the processor
    card = card_on_file(stripe_client, "pm_card_visa")
    added = ok(
        run(
            "sources",
            "add",
            "cedar-realty",
            "--customer",
            card.customer,
            "--payment-method",
            card.payment_method,
            "--default",
        )
    )
    assert "added visa ...4242 as default funding source" in added
    listed = json.loads(ok(run("sources", "list", "cedar-realty", "--json")))
    assert [(s["default"], s["card"].split(" exp")[0]) for s in listed] == [
        (True, "visa ...4242"),
        (False, "visa ...4244"),
    ]

    first = run("cycle", "--at", AT)  # `--once` is no longer needed
    cycle = first.stdout
    assert "cedar-realty" in cycle
    # the accounts whose cards could not be charged make the cycle exit 1, so cron notices (issue 14, item 10)
    assert first.returncode == (1 if "not charged" in cycle else 0), first.stderr
    assert "charged" in cycle.split("not charged")[0]  # cedar-realty's table, headed "charged"
    assert "planned: 1 charged" in " ".join(cycle.split())
    status = json.loads(run("status", "--json").stdout)  # exits 1: cards need attention
    last = status["last_cycle"]  # a manual cycle is recorded like the daemon's ("none recorded yet" before)
    assert last is not None
    assert last["instance"].startswith("cli:"), last
    succeeded = stripe_server.payment_intents(status="succeeded")
    assert [pi["metadata"]["recharged_account"] for pi in succeeded] == ["cedar-realty"]
    assert succeeded[0]["amount"] == 1444  # $13.26 + 8.875% VAT ($1.18), in cents
    # the placeholder cards of the others do not exist at the processor: our error, not a decline of the customer's
    # card (no notice, no decline counted), and set aside
    db = Database(db_url)
    with db.reading() as session:
        attempts = session.scalars(select(ChargeAttempt).order_by(ChargeAttempt.id)).all()
        told = session.scalars(select(OutboxMessage.kind).where(OutboxMessage.kind != "settings_changed")).all()
    db.close()
    assert {a.status for a in attempts} == {"succeeded", "error"}
    assert {a.code for a in attempts if a.status == "error"} == {"payment_method_missing"}
    assert "receipt" in told
    assert not {"payment_declined", "auto_recharge_suspended", "action_required"} & set(told)
    [birch_card] = json.loads(ok(run("sources", "list", "birch-dental", "--json")))
    assert birch_card["unusable"].startswith("payment_method_missing on ")
    # charged: the same cycle again finds it above its threshold (`plan --at AT` would show the ledger as it stood
    # at AT, before this charge)
    assert "cedar-realty" not in run("cycle", "--once", "--at", AT).stdout
    assert len(stripe_server.payment_intents(status="succeeded")) == 1
    plan = {a["account"]: a for a in json.loads(ok(run("plan", "--json")))["accounts"]}
    assert plan["birch-dental"]["reason"] == "no_funding_source"

    stripe_server.inject("drop_after_commit")  # the charge is made, the answer lost: `recover` finds it
    lost = run("topup", "cedar-realty", "20.00", RECHARGED_PAYMENTS__MAX_RETRIES="0")
    assert lost.returncode == 1
    assert "charging" in lost.stdout
    assert "recovered" in ok(run("recover"))
    topup = run("topup", "cedar-realty", "20.00")
    assert topup.returncode == 0, topup.stderr
    assert "cedar-realty: receipt R-000003; the balance is now $" in topup.stdout  # number and new balance
    assert len(stripe_server.payment_intents(status="succeeded")) == 3

    assert "adjusted by -1.50000" in ok(
        run("adjust", "cedar-realty", "--debit", "1.50", "--reason", "goodwill reversal", "--reference", "r1")
    )
    assert "already recorded" in ok(
        run("adjust", "cedar-realty", "--debit", "1.50", "--reason", "goodwill reversal", "--reference", "r1")
    )
    actions = [a["action"] for a in json.loads(ok(run("audit", "cedar-realty", "--json")))]
    assert actions[:4] == ["balance.adjusted", "topup.requested", "topup.requested", "source.added"]
    assert "ledger OK" in ok(run("verify"))


def test_charging_without_a_key_is_a_config_error(run):
    ok(run("db", "upgrade"))
    result = run("cycle", "--once", RECHARGED_STRIPE_API_KEY="")
    assert result.returncode == 78
    assert "no Stripe API key" in result.stderr


def test_cycle_at_a_simulated_time_records_the_real_time_so_a_lost_answer_is_recovered_once(
    run, tmp_path, stripe_client, stripe_server
):
    """Issue 12: `cycle --once --at T` decides as of T, but what it records of real processor calls (the attempt's
    start, the idempotency window) is on the real clock. A cycle at T+2 days whose charge went through at the
    processor but whose answer was lost, then a cycle at T+4 days: the payment is found under its key and credited
    once; nothing is charged twice. (A release that stored T+2 days as the attempt's start saw "two days ago",
    looked it up in a window on its own clock, found nothing and abandoned a paid charge.)"""
    now = datetime.now(UTC).replace(microsecond=0)
    ok(run("db", "upgrade"))
    created = (now - timedelta(days=60)).isoformat()
    ok(run("accounts", "create", "skewed", "--email", "a@skewed.example", "--plan", "standard", "--vat-percent", "0",
           "--created-at", created, "--opening-balance", "1.00"))  # fmt: skip
    calls = tmp_path / "calls.csv"
    rows = ["event_id,account_id,kind,started_at,duration_seconds,quantity,text,cost"]
    rows += [f"c{d},skewed,dialer,{(now - timedelta(days=d)).isoformat()},18000,,," for d in range(1, 40)]
    calls.write_text("\n".join(rows) + "\n", encoding="utf-8")
    ok(run("usage", "import", str(calls)))
    card = card_on_file(stripe_client, "pm_card_visa")
    ok(run("sources", "add", "skewed", "--customer", card.customer, "--payment-method", card.payment_method))
    ok(run("auto-recharge", "skewed", "--enable"))

    ahead = (now + timedelta(days=2)).isoformat()
    stripe_server.inject("drop_after_commit")  # charged at the processor, the answer lost on the way back
    lost = run("cycle", "--once", "--at", ahead, RECHARGED_PAYMENTS__MAX_RETRIES="0")
    assert lost.returncode == 1, lost.stderr  # a recharge left waiting on the processor: cron should notice
    assert "wait on the processor" in lost.stdout
    assert len(stripe_server.payment_intents(status="succeeded")) == 1

    later = ok(run("cycle", "--once", "--at", (now + timedelta(days=4)).isoformat()))
    assert "recovered" in later
    [paid] = stripe_server.payment_intents(status="succeeded")
    assert len(stripe_server.payment_intents()) == 1  # never charged twice
    shown = json.loads(ok(run("accounts", "show", "skewed", "--json")))
    assert shown["balance"] != "1.00000"  # credited
    assert "ledger OK" in ok(run("verify"))
    assert paid["metadata"]["recharged_account"] == "skewed"
