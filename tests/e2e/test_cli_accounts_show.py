"""`accounts show` as an admin reads it: "(config)" marks only the policy settings an account takes from
config.toml."""

from __future__ import annotations

import os

from recharged.accounts import OVERRIDES
from tests.e2e.commands import command_runner, ok


def rows(table: str) -> dict[str, str]:
    """The settings table's rows, name -> value, from the rendered box."""
    found = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0]:
            found[cells[0]] = cells[1]
    return found


def test_config_marks_only_the_policy_settings_taken_from_config(tmp_path, db_url):
    """Issue 13 item 13: `accounts show` printed "(config)" for first_usage_at, which config.toml never sets."""
    run = command_runner(tmp_path, {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_ACTOR": "Jane Doe"})
    ok(run("db", "upgrade"))
    ok(run("accounts", "create", "acme", "--email", "b@acme.example", "--plan", "standard", "--vat-percent", "20"))
    changed = ok(run("auto-recharge", "acme", "--threshold-days", "3"))
    assert "acme: threshold_days default (7) -> 3" in changed  # issue 14: it printed "None -> 3"
    shown = rows(ok(run("accounts", "show", "acme")))
    assert shown["first_usage_at"] == "-"  # no usage yet
    assert shown["threshold_days"] == "3"
    assert {name for name, value in shown.items() if value.endswith("(config)")} == set(OVERRIDES) - {"threshold_days"}
    # issue 14, item 10: the value taken from config, not only that it is; yes/no, not False; the balance and cards
    assert shown["max_recharge"] == "1000.00 USD (config)"
    assert shown["recharge_days"] == "14 (config)"
    assert shown["auto_recharge"] == "no"
    assert shown["balance"] == "$0.00"
    assert shown["card"] == "none: `recharged sources add` adds one"
    enabled = run("auto-recharge", "acme", "--enable")
    assert "acme: auto_recharge no -> yes" in ok(enabled)
    assert "acme has no usable card: nothing will be charged" in enabled.stderr
