"""The `recharged` command as an admin runs it: a real process, real files, a real database."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.e2e.commands import REPO, command_runner, ok

AT = "2026-11-16T09:00:00Z"


@pytest.fixture
def run(tmp_path, db_url):
    """Run `recharged ARGS` against this test's database; returns the CompletedProcess."""
    env = {
        **os.environ,
        "RECHARGED_DATABASE__URL": db_url,
        "RECHARGED_LOGGING__FORMAT": "console",
    }
    env.pop("RECHARGED_CONFIG", None)
    env.pop("RECHARGED_ACTOR", None)
    return command_runner(tmp_path, env)


def test_sample_import_plan_and_verify(run, tmp_path):
    ok(run("db", "upgrade"))
    assert "6 accounts created" in ok(
        run("accounts", "import", str(REPO / "examples/accounts.csv"), "--actor", "Jane Doe")
    )
    rejects = tmp_path / "rejects.csv"
    partial = run("usage", "import", str(REPO / "examples/usage.csv"), "--rejects", str(rejects))
    assert "4729 accepted, 0 duplicates, 2 rejected" in partial.stdout
    # Issue 14, item 6: it exited 0, so a cron job never noticed unbilled calls
    assert partial.returncode == 65, partial.stderr
    assert f"2 of 4731 rows were rejected and not billed (see {rejects}); the other rows are recorded" in " ".join(
        partial.stderr.split()
    )
    with rejects.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["line"], r["event_id"]) for r in rows] == [("4731", "bad-1"), ("4732", "bad-2")]
    assert "unknown kind 'fax'" in rows[0]["reason"]
    assert "duration_seconds is missing" in rows[1]["reason"]

    again = ok(run("usage", "import", str(REPO / "examples/usage.csv"), "--rejects", str(rejects), "--accept-rejects"))
    assert "0 accepted, 4729 duplicates, 2 rejected" in again

    plan = json.loads(ok(run("plan", "--at", AT, "--json")))
    decisions = {a["account"]: (a["decision"], a["reason"], a["charge_amount"]) for a in plan["accounts"]}
    assert decisions["cedar-realty"] == ("charge", "below_threshold", "13.26000")
    assert decisions["elm-insurance"][1] == "auto_recharge_off"
    assert all(isinstance(a["balance"], str) for a in plan["accounts"])

    assert "ledger OK: 4729 usage entries checked" in ok(run("verify"))


def test_bad_config_exits_78_and_names_key(run, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[recharge]\nrecharge_days = 0\n")
    result = run("check-config", config=bad)
    assert result.returncode == 78
    assert f"{bad}: recharge.recharge_days = 0" in result.stderr
    result = run("plan", config=bad)
    assert result.returncode == 78


def test_check_config_masks_secrets(tmp_path):
    env_result = subprocess.run(
        [sys.executable, "-m", "recharged", "check-config", "--config", str(REPO / "config.toml")],
        capture_output=True,
        text=True,
        env={**os.environ, "RECHARGED_STRIPE_API_KEY": "sk_test_supersecret"},
        cwd=tmp_path,
        timeout=60,
    )
    assert env_result.returncode == 0
    assert "supersecret" not in env_result.stdout + env_result.stderr
    assert 'stripe_api_key = "set, from environment RECHARGED_STRIPE_API_KEY (value hidden)"' in env_result.stdout


def test_commands_refuse_an_unmigrated_database(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "recharged", "plan"],
        capture_output=True,
        text=True,
        env={**os.environ, "RECHARGED_DATABASE__URL": f"sqlite:///{tmp_path / 'fresh.db'}"},
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 69
    assert "run `recharged db upgrade`" in result.stderr


def test_account_lifecycle_with_audit(run):
    ok(run("db", "upgrade"))
    ok(
        run(
            "accounts",
            "create",
            "acme",
            "--email",
            "b@acme.example",
            "--plan",
            "standard",
            "--vat-percent",
            "20",
            "--opening-balance",
            "50",
            "--actor",
            "Jane Doe",
        )
    )
    assert "auto_recharge no -> yes" in ok(
        run("auto-recharge", "acme", "--enable", "--threshold-days", "3", "--actor", "John Smith")
    )
    ok(
        run(
            "usage",
            "record",
            "acme",
            "--event-id",
            "c1",
            "--kind",
            "dialer",
            "--started-at",
            "2026-11-20T10:00:00+01:00",
            "--duration-seconds",
            "70",
        )
    )
    shown = json.loads(ok(run("accounts", "show", "acme", "--json")))  # now: the account was created today
    assert shown["balance"] == "49.96000"
    assert shown["settings"]["threshold_days"] == 3
    assert shown["settings"]["first_usage_at"] == "2026-11-20T09:00:00+00:00"
    audit = json.loads(ok(run("audit", "acme", "--json")))
    assert [(a["actor"], a["action"]) for a in audit] == [
        ("John Smith", "auto_recharge.changed"),
        ("Jane Doe", "account.created"),
    ]
    assert audit[0]["before"] == {"auto_recharge": False, "threshold_days": None}


@pytest.fixture
def invoke(db_url, monkeypatch):
    """The same command in-process (click's runner): for the many quick error cases."""
    from click.testing import CliRunner

    from recharged.cli import main

    monkeypatch.setenv("RECHARGED_DATABASE__URL", db_url)
    monkeypatch.delenv("RECHARGED_ACTOR", raising=False)
    runner = CliRunner()

    def _invoke(*args: str):
        return runner.invoke(main, ["--config", str(REPO / "config.toml"), *args], catch_exceptions=False)

    return _invoke


CREATE = "accounts create {} --email a@b.example --plan standard --vat-percent 0 --actor 'Jane Doe'"
RECORD = "usage record --event-id e1 --account acme --kind dialer --started-at {}"
BAD_ARGUMENTS = [
    ("auto-recharge acme --enable --actor Jane", 2, "first and last name"),
    ("auto-recharge acme --enable", 2, "Missing option '--actor'"),
    ("auto-recharge acme --actor 'Jane Doe'", 2, "nothing to change"),
    ("auto-recharge ghost --enable --actor 'Jane Doe'", 3, "no account 'ghost'"),
    ("auto-recharge acme --max-recharge 1.234567 --actor 'Jane Doe'", 2, "more than 5 decimal"),
    ("auto-recharge acme --threshold-days -2 --actor 'Jane Doe'", 2, "threshold_days"),
    ("auto-recharge acme --max-recharge off --actor 'Jane Doe'", 2, "cannot be switched off"),
    ("accounts update acme --plan gold --actor 'Jane Doe'", 2, "plan 'gold' is not defined"),
    (CREATE.format("acme"), 4, "1 account already exists with other settings"),
    (CREATE.format("'x y'"), 2, "not a valid account id"),
    ("accounts show ghost", 3, "no account 'ghost'"),
    (RECORD.format("2026-11-20T10:00:00 --duration 5"), 2, "no UTC offset"),
    (RECORD.format("2026-11-20T10:00:00Z --quantity 5"), 2, "billed by time"),
    ("plan --at tomorrow", 2, "Invalid value for '--at'"),
    ("usage import /nonexistent.csv", 2, "does not exist"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_ARGUMENTS)
def test_bad_arguments_get_a_clear_error_and_change_nothing(db, settings, clock, invoke, args, code, message):
    from tests.helpers import add_account

    add_account(db, settings, clock, vat_percent="20")
    before = invoke("audit", "--json").output, invoke("plan", "--json", "--at", AT).output
    result = invoke(*shlex.split(args))
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert (invoke("audit", "--json").output, invoke("plan", "--json", "--at", AT).output) == before


def test_account_import_with_a_bad_row_imports_nothing(run, tmp_path):
    ok(run("db", "upgrade"))
    accounts = tmp_path / "accounts.csv"
    accounts.write_text(
        "id,email,plan,vat_percent\n"
        "good,a@good.example,standard,20\n"
        "bad,not-an-email,standard,20\n"
        "worse,b@worse.example,gold,20\n"
    )
    result = run("accounts", "import", str(accounts), "--actor", "Jane Doe")
    assert result.returncode == 2
    assert f"{accounts}:3: email 'not-an-email'" in result.stderr
    assert f"{accounts}:4: plan 'gold'" in result.stderr
    assert json.loads(ok(run("plan", "--json")))["accounts"] == []


def test_usage_csv_with_a_wrong_header_is_refused(run, tmp_path):
    ok(run("db", "upgrade"))
    usage = tmp_path / "usage.csv"
    usage.write_text("id,account,kind\n1,acme,dialer\n")
    result = run("usage", "import", str(usage))
    assert result.returncode == 2
    assert "bad header (missing columns event_id" in result.stderr
