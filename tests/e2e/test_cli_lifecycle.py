"""An account's life cycle through the real `recharged` command (issue 14 item 1): list, search and export the
accounts, close one (never charged, its balance kept and said), reopen it (automatic recharge left off)."""

from __future__ import annotations

import json
import os

from tests.e2e.commands import REPO, command_runner, ok

EXAMPLE = REPO / "examples" / "accounts.csv"
IDS = ["acme-law", "birch-dental", "cedar-realty", "delta-startup", "elm-insurance", "fir-clinic"]


def test_an_account_is_listed_closed_exported_and_reopened(tmp_path, db_url):
    env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_ACTOR": "Jane Doe"}
    env["RECHARGED_OUTBOX__FOLDER"] = str(tmp_path / "outbox")
    run = command_runner(tmp_path, env)
    ok(run("db", "upgrade"))
    ok(run("accounts", "import", str(EXAMPLE)))

    listed = ok(run("accounts", "list"))
    assert all(account in listed for account in IDS)
    assert "6 accounts (0 closed)" in listed

    closed = ok(run("accounts", "close", "acme-law", "--reason", "moved to another provider"))
    assert "account acme-law closed at" in closed
    assert "its balance of 150.00 USD is kept: recharged does not refund it" in closed

    [gone] = json.loads(ok(run("accounts", "list", "--status", "closed", "--json")))
    assert (gone["id"], gone["status"], gone["closed_reason"], gone["balance"]) == (
        "acme-law",
        "closed",
        "moved to another provider",
        "150.00000",
    )
    assert gone["auto_recharge"] is False
    open_ids = [a["id"] for a in json.loads(ok(run("accounts", "list", "--status", "open", "--json")))]
    assert open_ids == IDS[1:]
    assert [a["id"] for a in json.loads(ok(run("accounts", "search", "ACME-LAW", "--json")))] == ["acme-law"]
    assert "no account's id or email contains '%'" in ok(run("accounts", "search", "%"))

    shown = json.loads(ok(run("accounts", "show", "acme-law", "--json")))
    assert (shown["settings"]["status"], shown["reason"], shown["decision"]) == ("closed", "closed", "skip")
    assert "closed" in ok(run("accounts", "show", "acme-law"))

    # The export is the import's CSV: importing it again changes nothing; into an empty database, it makes the same.
    exported = tmp_path / "export.csv"
    assert "6 accounts exported to" in ok(run("accounts", "export", "--out", str(exported)))
    again = ok(run("accounts", "import", str(exported)))
    assert "0 accounts created, 6 already present and unchanged" in again
    to_stdout = run("accounts", "export")
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stdout == exported.read_text(encoding="utf-8")  # the CSV alone; the count went to stderr
    assert "6 accounts exported" in to_stdout.stderr
    fresh = {"RECHARGED_DATABASE__URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    ok(run("db", "upgrade", **fresh))
    assert "6 accounts created" in ok(run("accounts", "import", str(exported), **fresh))
    assert ok(run("accounts", "export", **fresh)) == to_stdout.stdout

    reopened = ok(run("accounts", "reopen", "acme-law"))
    assert "account acme-law reopened, with a balance of 150.00 USD" in reopened
    assert "automatic recharge stays off until you turn it on" in reopened
    actions = [r["action"] for r in json.loads(ok(run("audit", "acme-law", "--json")))]
    assert actions == ["account.reopened", "account.closed", "account.created"]
    assert "6 accounts (0 closed)" in ok(run("accounts", "list"))


def test_closing_twice_is_a_conflict_and_exporting_over_a_file_is_refused(tmp_path, db_url):
    run = command_runner(tmp_path, {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_ACTOR": "Jane Doe"})
    ok(run("db", "upgrade"))
    ok(run("accounts", "create", "acme", "--email", "b@acme.example", "--plan", "standard", "--vat-percent", "0"))
    ok(run("accounts", "close", "acme", "--reason", "left"))
    twice = run("accounts", "close", "acme", "--reason", "left again")
    assert twice.returncode == 4, twice.stderr
    assert "closed already" in twice.stderr
    existing = tmp_path / "keep.csv"
    existing.write_text("precious")
    refused = run("accounts", "export", "--out", str(existing))
    assert refused.returncode == 2, refused.stderr
    assert "exists already; nothing was written" in refused.stderr
    assert existing.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
