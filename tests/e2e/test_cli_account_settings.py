"""Per-account settings and the notices of admin changes through the real `recharged` command (issue 14 item 5):
nonsense refused with the rules of config.toml, a warning when automatic recharge has no card to charge, one
coalesced "settings changed" email per account, and `outbox cancel` for mail not sent yet."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser

import pytest

from tests.e2e.commands import command_runner, ok

ACTOR = ("--actor", "Jane Doe")


@pytest.fixture
def run(tmp_path, db_url):
    env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_LOGGING__FORMAT": "console"}
    env |= {"RECHARGED_OUTBOX__FOLDER": str(tmp_path / "eml"), "RECHARGED_OUTBOX__JOURNAL": str(tmp_path / "journal")}
    env.pop("RECHARGED_CONFIG", None)
    env.pop("RECHARGED_ACTOR", None)
    runner = command_runner(tmp_path, env)
    ok(runner("db", "upgrade"))
    ok(
        runner(
            "accounts", "create", "acme", "--email", "billing@acme.example", "--plan", "standard",
            "--vat-percent", "20", "--opening-balance", "50", *ACTOR,
        )
    )  # fmt: skip
    return runner


def settings_notices(run) -> list[dict]:
    listed = json.loads(ok(run("outbox", "list", "--json")))["messages"]
    return [m for m in listed if m["kind"] == "settings_changed"]


def test_a_reserve_of_zero_days_is_refused_as_config_toml_refuses_it(run):
    result = run("auto-recharge", "acme", "--threshold-days", "0", *ACTOR)
    assert result.returncode == 2, result.stdout
    assert "threshold_days = '0': Input should be greater than or equal to 1" in result.stderr
    assert json.loads(ok(run("accounts", "show", "acme", "--json")))["settings"]["threshold_days"] is None
    assert settings_notices(run) == []


def test_a_smallest_recharge_above_the_largest_is_refused_naming_both(run):
    result = run("auto-recharge", "acme", "--min-recharge", "500", "--max-recharge", "100", *ACTOR)
    assert result.returncode == 2, result.stdout
    assert "min_recharge 500.00 USD is above max_recharge 100.00 USD" in result.stderr
    shown = json.loads(ok(run("accounts", "show", "acme", "--json")))["settings"]
    assert (shown["min_recharge"], shown["max_recharge"]) == (None, None)
    assert [a["action"] for a in json.loads(ok(run("audit", "acme", "--json")))] == ["account.created"]


def test_enabling_automatic_recharge_without_a_usable_card_warns_but_enables(run):
    result = run("auto-recharge", "acme", "--enable", *ACTOR)
    assert result.returncode == 0, result.stderr
    assert "account acme: auto_recharge" in result.stdout
    assert (
        "acme has no usable card: nothing will be charged until a card is added with `recharged sources add`"
        in " ".join(result.stderr.split())
    )
    [plan] = json.loads(ok(run("plan", "--json")))["accounts"]
    assert plan["reason"] == "no_funding_source"
    # turning it off, or changing a policy setting, says nothing of cards
    assert "no usable card" not in run("auto-recharge", "acme", "--disable", *ACTOR).stderr


def test_changes_within_the_window_make_one_notice_that_tells_each_and_who_made_it(run, tmp_path):
    before = datetime.now(UTC)
    ok(run("auto-recharge", "acme", "--enable", *ACTOR))
    ok(run("auto-recharge", "acme", "--threshold-days", "5", *ACTOR))
    ok(run("auto-recharge", "acme", "--threshold-days", "4", "--max-recharge", "250", "--actor", "John Smith"))
    [notice] = settings_notices(run)
    assert notice["status"] == "pending"
    waits_until = datetime.fromisoformat(notice["next_attempt_at"])  # the daemon sends it then, not before
    assert before + timedelta(minutes=10) <= waits_until <= datetime.now(UTC) + timedelta(minutes=10)

    assert "sent 1," in ok(run("outbox", "send"))  # `outbox send` delivers everything pending now
    [eml] = (tmp_path / "eml").glob("*.eml")
    mail = BytesParser(policy=policy.default).parsebytes(eml.read_bytes())
    assert mail["Subject"] == "Your automatic recharge settings for account acme changed"
    text = " ".join(mail.get_body(("plain",)).get_content().split())
    assert "Jane Doe and John Smith changed the automatic recharge settings of account acme " in text
    assert (
        "- Automatic recharge: off -> on "
        "- Minimum reserve, in days of usage: standard setting -> 4 "
        "- Largest single recharge: standard setting -> $250.00"
    ) in text


def test_a_change_undone_within_the_window_sends_nothing(run):
    ok(run("auto-recharge", "acme", "--threshold-days", "5", *ACTOR))
    assert len(settings_notices(run)) == 1
    ok(run("auto-recharge", "acme", "--threshold-days", "default", "--actor", "John Smith"))
    assert settings_notices(run) == []
    audit = json.loads(ok(run("audit", "acme", "--json")))
    assert [a["action"] for a in audit] == ["auto_recharge.changed", "auto_recharge.changed", "account.created"]


def test_a_message_not_sent_yet_can_be_cancelled_and_a_sent_one_cannot(run, tmp_path):
    ok(run("auto-recharge", "acme", "--enable", *ACTOR))
    [notice] = settings_notices(run)
    cancelled = run("outbox", "cancel", str(notice["id"]), "--reason", "testing the settings", *ACTOR)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"outbox message {notice['id']} (settings_changed to billing@acme.example) cancelled" in cancelled.stdout
    [shown] = settings_notices(run)
    assert shown["status"] == "cancelled"
    assert shown["error"] == "cancelled by Jane Doe: testing the settings"
    assert json.loads(ok(run("outbox", "list", "--status", "cancelled", "--json")))["messages"][0]["id"] == notice["id"]
    assert "already cancelled" in ok(run("outbox", "cancel", str(notice["id"]), "--reason", "again", *ACTOR))
    audit = json.loads(ok(run("audit", "acme", "--json")))
    assert (audit[0]["actor"], audit[0]["action"], audit[0]["after"]["reason"]) == (
        "Jane Doe",
        "outbox.cancelled",
        "testing the settings",
    )
    assert "sent 0," in ok(run("outbox", "send"))
    assert not (tmp_path / "eml").exists() or not list((tmp_path / "eml").glob("*.eml"))  # never sent

    # a message that went out is not cancelled: exit 4, and it stays sent
    ok(run("auto-recharge", "acme", "--threshold-days", "5", *ACTOR))
    assert "sent 1," in ok(run("outbox", "send"))
    sent = next(m for m in settings_notices(run) if m["status"] == "sent")
    refused = run("outbox", "cancel", str(sent["id"]), "--reason", "too late", *ACTOR)
    assert refused.returncode == 4, refused.stdout
    assert f"outbox message {sent['id']} was sent" in refused.stderr
    assert next(m for m in settings_notices(run) if m["id"] == sent["id"])["status"] == "sent"
