"""The ledger's bounds as an admin meets them: `accounts create` and `adjust` refuse an amount or a balance past
money.MAX_AMOUNT / MAX_BALANCE with exit status 2 and a message naming both, and change nothing (`verify` runs
after each test)."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.commands import command_runner, ok

LIMIT = "10000000000.00 USD"


@pytest.fixture
def run(tmp_path, db_url):
    env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_ACTOR": "Jane Doe"}
    env.pop("RECHARGED_CONFIG", None)
    return command_runner(tmp_path, env)


def create(run, *extra: str):
    return run(
        "accounts", "create", "acme", "--email", "b@acme.example", "--plan", "standard", "--vat-percent", "20", *extra
    )


def refused(result, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


def test_adjustments_past_the_ledgers_bounds_exit_2_and_change_nothing(run):
    """Issue 13 item 9: two `adjust --credit 92233720368547` made the SQLite balance a REAL, shown as
    184467440737098.99776, and `verify` exited 69."""
    ok(run("db", "upgrade"))
    ok(create(run))
    for _ in range(2):
        refused(
            run("adjust", "acme", "--credit", "92233720368547", "--reason", "typo"),
            "account acme: adjustment of 92233720368547.00 USD",
            f"over the limit of {LIMIT} for one amount in the ledger; nothing was written",
        )
    refused(
        run("adjust", "acme", "--debit", "92233720368547", "--reason", "typo"),
        "adjustment of -92233720368547.00 USD",
    )
    shown = json.loads(ok(run("accounts", "show", "acme", "--json")))
    assert shown["balance"] == "0.00000"
    assert [a["action"] for a in json.loads(ok(run("audit", "acme", "--json")))] == ["account.created"]
    assert "ledger OK" in ok(run("verify"))


def test_an_opening_balance_past_the_bound_exits_2_and_creates_nothing(run):
    ok(run("db", "upgrade"))
    refused(
        create(run, "--opening-balance", "92233720368547"),
        f"opening_balance of 92233720368547.00 USD is over the limit of {LIMIT}",
    )
    assert run("accounts", "show", "acme").returncode == 3
