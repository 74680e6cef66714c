"""Small things an admin meets every day (issue 14 item 10), through the real command: counts in words that agree
with them, the rejects file in line order, and messages that name the configuration actually in use."""

from __future__ import annotations

import csv
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.commands import command_runner, ok

ACTOR = ("--actor", "Jane Doe")
HEADER = "id,email,plan,vat_percent\n"
USAGE_HEADER = "event_id,account_id,kind,started_at,duration_seconds,quantity,text,cost\n"


@pytest.fixture
def run(tmp_path, db_url):
    """`recharged ARGS` in `tmp_path` against this test's (migrated) database."""
    env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_LOGGING__FORMAT": "console"}
    env.pop("RECHARGED_CONFIG", None)
    env.pop("RECHARGED_ACTOR", None)
    runner = command_runner(tmp_path, env)
    ok(runner("db", "upgrade"))
    return runner


def accounts_file(tmp_path: Path, name: str, *ids: str, plan: str = "standard") -> str:
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{i},billing@{i}.example,{plan},20\n" for i in ids))
    return str(path)


def an_hour_ago() -> str:
    return (datetime.now(UTC) - timedelta(hours=1)).isoformat()


# --- one account, two accounts ----------------------------------------------------------------------------------


def test_counts_of_one_are_singular_and_of_two_plural(run, tmp_path):
    assert "1 account created, 0 already present" in ok(
        run("accounts", "import", accounts_file(tmp_path, "a.csv", "acme"), *ACTOR)
    )
    assert "1 account, 0 to charge" in ok(run("plan"))
    two = accounts_file(tmp_path, "b.csv", "birch", "cedar")
    assert "2 accounts created, 0 already present" in ok(run("accounts", "import", two, *ACTOR))
    assert "3 accounts, 0 to charge" in ok(run("plan"))

    one_bad = run("accounts", "import", accounts_file(tmp_path, "c.csv", "dune", "sales/eu"), *ACTOR)
    assert one_bad.returncode == 2
    assert "error: 1 bad row" in one_bad.stderr
    assert "1 bad rows" not in one_bad.stderr
    two_bad = run("accounts", "import", accounts_file(tmp_path, "d.csv", "sales/eu", "sales/us"), *ACTOR)
    assert two_bad.returncode == 2
    assert "error: 2 bad rows" in two_bad.stderr

    changed = tmp_path / "e.csv"
    changed.write_text(HEADER + "acme,billing@acme.example,standard,0\n")
    one_conflict = run("accounts", "import", str(changed), *ACTOR)
    assert one_conflict.returncode == 4
    assert "1 account already exists with other settings" in one_conflict.stderr
    changed.write_text(HEADER + "acme,billing@acme.example,standard,0\nbirch,billing@birch.example,standard,0\n")
    two_conflicts = run("accounts", "import", str(changed), *ACTOR)
    assert "2 accounts already exist with other settings" in two_conflicts.stderr

    usage, call = tmp_path / "calls.csv", f"c1,acme,dialer,{an_hour_ago()},70,,,\n"
    usage.write_text(USAGE_HEADER + call)
    ok(run("usage", "import", str(usage)))
    assert "0 accepted, 1 duplicate, 0 rejected" in ok(run("usage", "import", str(usage)))
    usage.write_text(USAGE_HEADER + call * 2 + f"c2,acme,dialer,{an_hour_ago()},70,,,,x\n")
    again = run("usage", "import", str(usage), "--accept-rejects")
    assert "0 accepted, 2 duplicates, 1 rejected" in ok(again)
    with (tmp_path / "calls.rejected.csv").open() as handle:
        [ragged] = list(csv.DictReader(handle))
    assert ragged["reason"].startswith("row has 1 more field than the header")


# --- the rejects file -------------------------------------------------------------------------------------------


def test_the_rejects_file_is_in_line_order_across_batches(run, tmp_path):
    ok(run("accounts", "import", accounts_file(tmp_path, "a.csv", "acme"), *ACTOR))
    at = an_hour_ago()
    rows = [  # batches of 3 lines: in each, a row the CSV cannot shape comes before one the service rejects
        f"r2,acme,dialer,{at},70,,,,extra",  # 2: more fields than the header
        f"g3,acme,dialer,{at},70,,,",
        f"r4,ghost,dialer,{at},70,,,",  # 4: rejected by the database: no such account
        f"r5,acme,dialer,{at},70",  # 5: fewer fields
        "r6,acme,dialer,yesterday,70,,,",  # 6: rejected by validation
        f"g7,acme,dialer,{at},70,,,",
        f"g8,acme,dialer,{at},70,,,",
        f"r9,acme,dialer,{at},70,,,,,",  # 9: more fields
        f"r10,acme,fax,{at},70,,,",  # 10: the plan has no such kind
    ]
    path = tmp_path / "calls.csv"
    path.write_text(USAGE_HEADER + "\n".join(rows) + "\n")
    rejects = tmp_path / "rejects.csv"

    result = run("usage", "import", str(path), "--rejects", str(rejects), RECHARGED_USAGE__BATCH_SIZE="3")

    assert result.returncode == 65, result.stderr
    assert "3 accepted, 0 duplicates, 6 rejected" in result.stdout
    with rejects.open() as handle:
        listed = [(int(r["line"]), r["event_id"]) for r in csv.DictReader(handle)]
    assert listed == [(2, "r2"), (4, "r4"), (5, "r5"), (6, "r6"), (9, "r9"), (10, "r10")]


# --- the configuration in use -----------------------------------------------------------------------------------


def test_messages_name_the_configuration_file_in_use(run, tmp_path):
    (tmp_path / "other.toml").write_text("[usage]\nbatch_size = 1000\n")
    other = Path("other.toml")  # as the admin typed it, relative to the working directory

    missing = run("accounts", "create", "acme", "--email", "b@acme.example", "--plan", "premium",
                  "--vat-percent", "20", *ACTOR, config=other)  # fmt: skip
    assert missing.returncode == 2
    assert "plan 'premium' is not defined in other.toml" in missing.stderr
    assert "config.toml" not in missing.stderr

    bad_row = run("accounts", "import", accounts_file(tmp_path, "a.csv", "acme", plan="premium"), *ACTOR, config=other)
    assert bad_row.returncode == 2
    assert "plan 'premium' is not defined in other.toml (defined: standard)" in bad_row.stderr

    ok(run("accounts", "import", accounts_file(tmp_path, "b.csv", "acme"), *ACTOR, config=other))
    update = run("accounts", "update", "acme", "--plan", "premium", *ACTOR, config=other)
    assert update.returncode == 2
    assert "plan 'premium' is not defined in other.toml" in update.stderr

    defaults = run("accounts", "update", "acme", "--plan", "premium", *ACTOR, config=None)  # no file at all
    assert defaults.returncode == 2
    assert "plan 'premium' is not defined in the configuration" in defaults.stderr
