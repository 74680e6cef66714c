"""What the `recharged` command takes in, as an admin runs it: a usage file of several batches, old usage events,
account ids, re-imported accounts, adjustment references per account."""

from __future__ import annotations

import csv
import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from recharged.money import format_ledger
from recharged.store.engine import Database
from recharged.store.models import Account
from tests.e2e.commands import command_runner, ok

ACTOR = ("--actor", "Jane Doe")


@pytest.fixture
def run(tmp_path, db_url):
    """`recharged ARGS` against this test's (migrated) database."""
    env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_LOGGING__FORMAT": "console"}
    env.pop("RECHARGED_CONFIG", None)
    env.pop("RECHARGED_ACTOR", None)
    runner = command_runner(tmp_path, env)
    ok(runner("db", "upgrade"))
    return runner


def create(run, account_id: str):
    return run(
        "accounts", "create", account_id, "--email", f"b@{account_id}.example", "--plan", "standard",
        "--vat-percent", "0", *ACTOR,
    )  # fmt: skip


def balance(db_url: str, account_id: str) -> str | None:
    """The account's balance as the database holds it (what every command reads); None: no such account."""
    db = Database(db_url)
    try:
        with db.reading() as session:
            account = session.get(Account, account_id)
            return None if account is None else format_ledger(account.balance)
    finally:
        db.close()


def test_a_usage_file_of_several_batches_is_imported_whole(run, tmp_path, db_url):
    ok(create(run, "acme"))
    ok(create(run, "birch"))
    now = datetime.now(UTC)
    path = tmp_path / "calls.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["event_id", "account_id", "kind", "started_at", "duration_seconds", "quantity", "text", "cost"]
        )
        for n in range(20):  # 70 seconds: 2 minutes at $0.02
            account = "acme" if n < 12 else "birch"
            writer.writerow([f"c{n}", account, "dialer", (now - timedelta(hours=n + 1)).isoformat(), 70, "", "", ""])
        writer.writerow(["ancient", "acme", "dialer", "0001-01-01T00:00:00Z", 70, "", "", ""])
    rejects = tmp_path / "rejects.csv"

    summary = ok(
        run(
            "usage", "import", str(path), "--rejects", str(rejects), "--accept-rejects", RECHARGED_USAGE__BATCH_SIZE="3"
        )
    )

    assert "20 accepted, 0 duplicates, 1 rejected" in summary
    assert (balance(db_url, "acme"), balance(db_url, "birch")) == ("-0.48000", "-0.32000")
    with rejects.open() as handle:
        [rejected] = list(csv.DictReader(handle))
    assert (rejected["line"], rejected["event_id"]) == ("22", "ancient")
    assert "is more than 400 days ago (usage.max_age_days" in rejected["reason"]
    again = ok(
        run(
            "usage", "import", str(path), "--rejects", str(rejects), "--accept-rejects", RECHARGED_USAGE__BATCH_SIZE="3"
        )
    )
    assert "0 accepted, 20 duplicates, 1 rejected" in again


def test_an_account_id_outside_the_alphabet_is_refused(run):
    result = create(run, "sales/eu")
    assert result.returncode == 2
    assert "id 'sales/eu' is not a valid account id: use 1 to 64 ASCII letters, digits" in result.stderr
    assert ok(run("audit", "--json")).strip() == "[]"


def test_reimporting_accounts_that_changed_is_a_conflict_listed_by_line(run, tmp_path, db_url):
    path = tmp_path / "accounts.csv"
    path.write_text(
        "id,email,plan,vat_percent,opening_balance,auto_recharge\n"
        "acme,b@acme.example,standard,20,25.00,false\n"
        "birch,b@birch.example,standard,20,,false\n"
    )
    ok(run("accounts", "import", str(path), *ACTOR))
    assert "0 accounts created, 2 already present and unchanged" in ok(run("accounts", "import", str(path), *ACTOR))
    path.write_text(
        "id,email,plan,vat_percent,opening_balance,auto_recharge\n"
        "cedar,b@cedar.example,standard,20,,false\n"
        "acme,b@acme.example,standard,20,30.00,false\n"
        "birch,b@birch.example,standard,20,,true\n"
    )
    result = run("accounts", "import", str(path), *ACTOR)
    assert result.returncode == 4, result.stdout
    assert f"{path}:3: account acme: opening_balance: recorded 25.00000, given 30.00000" in result.stderr
    assert f"{path}:4: account birch: auto_recharge: recorded false, given true" in result.stderr
    assert balance(db_url, "cedar") is None  # nothing of the refused file was written
    assert balance(db_url, "acme") == "25.00000"


def test_adjustment_references_are_per_account(run, db_url):
    ok(create(run, "acme"))
    ok(create(run, "birch"))
    adjust = ("adjust", "--reason", "outage goodwill", "--reference", "TICKET-1", *ACTOR)

    assert "adjusted by 5.00000" in ok(run(adjust[0], "acme", "--credit", "5.00", *adjust[1:]))
    assert "adjusted by 5.00000" in ok(run(adjust[0], "birch", "--credit", "5.00", *adjust[1:]))
    assert "already recorded" in ok(run(adjust[0], "birch", "--credit", "5.00", *adjust[1:]))
    conflict = run(adjust[0], "birch", "--credit", "6.00", *adjust[1:])
    assert conflict.returncode == 4
    assert "adjustment 'TICKET-1' was recorded on" in conflict.stderr
    assert "as a credit of 5.00000 (outage goodwill); this one is a credit of 6.00000" in conflict.stderr
    assert run(adjust[0], "birch", "--debit", "5.00", *adjust[1:]).returncode == 4

    assert (balance(db_url, "acme"), balance(db_url, "birch")) == ("5.00000", "5.00000")
    audit = json.loads(ok(run("audit", "birch", "--json")))
    assert [(a["action"], (a["after"] or {}).get("reference")) for a in audit] == [
        ("balance.adjusted", "TICKET-1"),
        ("account.created", None),
    ]
