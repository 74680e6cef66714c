"""The accounts' life cycle (issue 14 item 1): list, search and export them; close an account, which is then
never charged, told or sent statements after its closing month, and bills no usage that started after it;
reopen it. On SQLite and PostgreSQL."""

from __future__ import annotations

import io
import re
import shutil
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import func, select

from recharged.accounts import (
    adjust_balance,
    audit_trail,
    change_account,
    close_account,
    create_accounts,
    export_csv,
    list_accounts,
    read_csv,
    reopen_account,
    search_accounts,
)
from recharged.clock import FixedClock
from recharged.errors import ActorError, ConflictError, InputError
from recharged.funding import add_source
from recharged.mail.notices import notify_from_plans
from recharged.mail.statements import issue_monthly_statements
from recharged.payments import CardInfo
from recharged.planning import plan_accounts
from recharged.recharge import RechargeService
from recharged.store.engine import Database
from recharged.store.models import Account, OutboxMessage, Recharge, Statement
from recharged.store.reads import account_listing
from recharged.usage import UsageRecorder
from tests.helpers import NOW, add_account, busy_account, call, mail_settings

ACTOR = "Jane Doe"
REASON = "moved to another provider"


def close(db, clock, account="acme", reason=REASON):
    return close_account(db, account, reason=reason, actor=ACTOR, clock=clock)


def reopen(db, clock, account="acme"):
    return reopen_account(db, account, actor=ACTOR, clock=clock)


def row(db, account="acme") -> Account:
    with db.reading() as s:
        found = s.get(Account, account)
        assert found is not None
        return found


def ids(found) -> list[str]:
    return [a.id for a in found]


# --- close and reopen -----------------------------------------------------------------------------------------


def test_closing_keeps_the_balance_turns_automatic_recharge_off_and_is_audited(db, settings, clock):
    add_account(db, settings, clock, opening_balance="42.50", auto_recharge=True)
    closed = close(db, clock, reason="  moved   to another provider ")
    assert (closed.status, closed.at, closed.balance, closed.currency, closed.reason) == (
        "closed",
        NOW,
        4_250_000,
        "USD",
        REASON,
    )
    account = row(db)
    assert (account.closed_at, account.closed_reason, account.auto_recharge, account.balance) == (
        NOW,
        REASON,
        False,
        4_250_000,
    )
    record = audit_trail(db, "acme")[0]
    assert (record.actor, record.action) == (ACTOR, "account.closed")
    assert record.before == {"status": "open", "auto_recharge": True, "balance": "42.50000"}
    assert record.after == {
        "status": "closed",
        "closed_at": NOW.isoformat(),
        "reason": REASON,
        "auto_recharge": False,
        "balance": "42.50000",
    }


@pytest.mark.parametrize(
    ("reason", "actor", "error", "message"),
    [
        ("   ", ACTOR, InputError, "--reason"),
        ("x" * 201, ACTOR, InputError, "--reason"),
        ("tab\x00bed", ACTOR, InputError, "--reason"),
        (REASON, "Jane", ActorError, "first and last name"),
    ],
)
def test_a_close_needs_a_reason_and_a_signature_and_changes_nothing_without(
    db, settings, clock, reason, actor, error, message
):
    add_account(db, settings, clock, auto_recharge=True)
    with pytest.raises(error, match=message):
        close_account(db, "acme", reason=reason, actor=actor, clock=clock)
    assert (row(db).closed_at, row(db).auto_recharge) == (None, True)
    assert [r.action for r in audit_trail(db, "acme")] == ["account.created"]


def test_closing_a_closed_account_or_reopening_an_open_one_is_a_conflict(db, settings, clock):
    add_account(db, settings, clock)
    with pytest.raises(ConflictError, match="acme is open"):
        reopen(db, clock)
    close(db, clock)
    with pytest.raises(ConflictError, match=re.escape(f"closed already, at {NOW.isoformat()} ({REASON})")):
        close(db, clock, reason="again")
    assert row(db).closed_reason == REASON
    assert [r.action for r in audit_trail(db, "acme")] == ["account.closed", "account.created"]


def test_a_closed_account_is_never_charged(db, settings, clock, stripe_client, gateway_factory):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    assert next(plan_accounts(db, settings, clock.now())).decision.action == "charge"  # due before it closes
    close(db, clock)
    decision = next(plan_accounts(db, settings, clock.now())).decision
    assert (decision.action, decision.reason, decision.charge_amount) == ("skip", "closed", 0)
    service = RechargeService(db, settings, gateway_factory, clock)
    assert service.claim_due("acme", clock.now()).recharge_id is None
    assert service.run_cycle().charged == []
    with pytest.raises(ConflictError, match="acme is closed; nothing was charged"):
        service.topup("acme", 1_000_000, ACTOR)
    with db.reading() as s:
        assert s.scalar(select(func.count()).select_from(Recharge)) == 0
    assert stripe_client.intents() == []


def test_closing_with_a_recharge_open_is_refused_until_it_is_done(db, settings, clock, stripe_client, gateway_factory):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    service = RechargeService(db, settings, gateway_factory, clock)
    recharge_id = service.claim_due("acme", clock.now()).recharge_id
    assert recharge_id is not None
    with pytest.raises(ConflictError, match=f"recharge #{recharge_id} open \\(claimed\\); nothing was changed"):
        close(db, clock)
    assert (row(db).closed_at, row(db).auto_recharge) == (None, True)
    assert service.process(recharge_id).phase == "finished"
    assert close(db, clock).balance == 100_000 + 8_400_000  # the recharge's credit is kept with the rest


def test_usage_that_started_after_closing_is_refused_and_late_records_of_earlier_calls_are_billed(db, settings, clock):
    add_account(db, settings, clock, opening_balance="10.00")
    close(db, clock)  # at 12:00
    recorder = UsageRecorder(db, settings, clock)
    before, at, after = recorder.record(
        [
            call("before", at="2026-11-22T11:59:59Z", seconds=60),  # a call made before it closed, recorded late
            call("at", at="2026-11-22T12:00:00Z"),
            call("after", at="2026-11-22T12:00:01Z"),
        ]
    )
    assert before.status == "accepted"
    assert (at.status, after.status) == ("rejected", "rejected")
    assert "account 'acme' was closed at 2026-11-22T12:00:00+00:00" in str(after.reason)
    assert row(db).balance == 1_000_000 - 2_000  # one minute at 2 cents
    reopen(db, clock)
    [again] = recorder.record([call("after", at="2026-11-22T12:00:01Z")])
    assert again.status == "accepted"


def test_a_closed_account_gets_no_notices(db, clock, tmp_path):
    mail = mail_settings(tmp_path)
    for account in ("acme", "birch"):
        add_account(db, mail, clock, account, opening_balance="10.00")
    close(db, clock)
    for account in ("acme", "birch"):
        adjust_balance(db, account, -700_000, reason="usage", actor=ACTOR, clock=clock)  # $3.00: under the reserve
    assert notify_from_plans(db, clock.now(), plan_accounts(db, mail, clock.now())) == 1  # birch's
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=mail, overrides={"threshold_days": "3"})
    change_account(db, "birch", actor=ACTOR, clock=clock, settings=mail, overrides={"threshold_days": "3"})
    with db.reading() as s:
        told = sorted(tuple(r) for r in s.execute(select(OutboxMessage.account_id, OutboxMessage.kind)))
    assert told == [("birch", "balance_low"), ("birch", "settings_changed")]


def test_enabling_automatic_recharge_of_a_closed_account_is_refused(db, settings, clock):
    add_account(db, settings, clock)
    close(db, clock)
    with pytest.raises(ConflictError, match="acme is closed: reopen it"):
        change_account(db, "acme", actor=ACTOR, clock=clock, settings=settings, auto_recharge=True)
    assert row(db).auto_recharge is False


def test_the_statement_of_the_closing_month_is_the_last_until_reopened(db, clock, tmp_path):
    mail = mail_settings(tmp_path)
    for account in ("acme", "birch"):
        add_account(db, mail, clock, account, opening_balance="10.00")
    close(db, clock)  # on 22 November

    def issue(month: date) -> list[str]:
        """Issue the statements of `month` on the first of the next, at 06:00; who got one."""
        after = date(month.year + month.month // 12, month.month % 12 + 1, 1)
        issue_monthly_statements(db, mail, FixedClock(datetime(after.year, after.month, 1, 6, tzinfo=UTC)))
        with db.reading() as s:
            return sorted(s.scalars(select(Statement.account_id).where(Statement.month == month)))

    assert issue(date(2026, 11, 1)) == ["acme", "birch"]  # acme's last: the month it was closed in
    assert issue(date(2026, 12, 1)) == ["birch"]
    reopen(db, FixedClock(datetime(2027, 1, 15, tzinfo=UTC)))
    assert issue(date(2027, 1, 1)) == ["acme", "birch"]


def test_reopening_restores_charging_once_automatic_recharge_is_turned_on(
    db, settings, clock, stripe_client, gateway_factory
):
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    close(db, clock)
    reopened = reopen(db, clock)
    assert (reopened.status, reopened.balance) == ("open", 100_000)
    account = row(db)
    assert (account.closed_at, account.closed_reason, account.auto_recharge) == (None, None, False)
    record = audit_trail(db, "acme")[0]
    assert (record.action, record.actor) == ("account.reopened", ACTOR)
    assert record.before == {"status": "closed", "closed_at": NOW.isoformat(), "reason": REASON, "auto_recharge": False}
    assert record.after == {"status": "open", "auto_recharge": False}
    assert next(plan_accounts(db, settings, clock.now())).decision.reason == "auto_recharge_off"  # the safety
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=settings, auto_recharge=True)
    [charged] = RechargeService(db, settings, gateway_factory, clock).run_cycle().charged
    assert charged.phase == "finished"


# --- list, search, export -------------------------------------------------------------------------------------


def test_list_filters_by_status_plan_and_currency_in_id_order(db, settings, clock):
    for account in ("c-three", "a-one", "b-two"):
        add_account(db, settings, clock, account)
    close(db, clock, "b-two")
    assert ids(list_accounts(db)) == ["a-one", "b-two", "c-three"]
    assert ids(list_accounts(db, status="open")) == ["a-one", "c-three"]
    [closed] = list_accounts(db, status="closed")
    assert (closed.id, closed.status, closed.closed_at, closed.closed_reason) == ("b-two", "closed", NOW, REASON)
    assert ids(list_accounts(db, plan="standard", currency="usd")) == ["a-one", "b-two", "c-three"]
    assert ids(list_accounts(db, plan="gold")) == []
    assert ids(list_accounts(db, currency="EUR")) == []
    with pytest.raises(InputError, match="--currency: unknown currency 'dollars'"):
        list_accounts(db, currency="dollars")
    with pytest.raises(InputError, match="--status 'gone'"):
        list_accounts(db, status="gone")


def test_a_listing_streams_in_chunks_and_misses_no_account(db, settings, clock):
    for n in range(7):
        add_account(db, settings, clock, f"acct-{n}")
    with db.reading() as s:
        assert [r.id for r in account_listing(s, chunk=2)] == [f"acct-{n}" for n in range(7)]


def test_search_matches_id_or_email_in_any_case_and_takes_wildcards_literally(db, settings, clock):
    for account in ("acme", "ac_me", "acxme", "birch"):
        add_account(db, settings, clock, account)
    change_account(db, "birch", actor=ACTOR, clock=clock, settings=settings, email="50%off@Birch.example")
    assert ids(search_accounts(db, "ACME")) == ["acme"]
    assert ids(search_accounts(db, "c_m")) == ["ac_me"]  # not acxme: `_` is itself
    assert ids(search_accounts(db, "%")) == ["birch"]  # not everyone: `%` is itself
    assert ids(search_accounts(db, "birch.EXAMPLE")) == ["birch"]  # the email, in any case
    assert ids(search_accounts(db, "nobody")) == []
    with pytest.raises(InputError, match="search text"):
        search_accounts(db, "  ")


def _export(db) -> str:
    handle = io.StringIO()
    export_csv(db, handle)
    return handle.getvalue()


def test_export_imports_into_an_empty_database_as_the_same_accounts(db, settings, clock, sqlite_template, tmp_path):
    add_account(db, settings, clock, "acme", opening_balance="150.00", created_at="2026-06-01T09:00:00.123456Z")
    add_account(db, settings, clock, "birch", vat_percent="8.875", auto_recharge=True)
    add_source(db, "birch", CardInfo("cus_B1", "pm_B1", "visa", "4242", 3, 2031), actor=ACTOR, clock=clock)
    add_account(db, settings, clock, "cedar", opening_balance="0.00001")
    close(db, clock, "cedar")
    UsageRecorder(db, settings, clock).record([call("c1", "acme", at="2026-11-20T10:00:00Z")])  # not exported
    exported = _export(db)
    header, *lines = exported.splitlines()
    assert header == (
        "id,email,plan,currency,vat_percent,created_at,opening_balance,auto_recharge,"
        "stripe_customer,payment_method,card_brand,card_last4,card_exp"
    )
    assert lines == [
        "acme,billing@acme.example,standard,USD,20,2026-06-01T09:00:00.123456+00:00,150.00000,false,,,,,",
        "birch,billing@birch.example,standard,USD,8.875,2026-09-01T00:00:00+00:00,,true,cus_B1,pm_B1,visa,4242,03/2031",
        "cedar,billing@cedar.example,standard,USD,20,2026-09-01T00:00:00+00:00,0.00001,false,,,,,",
    ]
    path = tmp_path / "accounts.csv"
    path.write_text(exported, encoding="utf-8")

    shutil.copy(sqlite_template, tmp_path / "fresh.db")
    fresh = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        created = create_accounts(fresh, read_csv(path, settings, clock.now()), ACTOR, clock)
        assert (created.created, created.unchanged) == (["acme", "birch", "cedar"], [])
        assert _export(fresh) == exported
        assert row(fresh, "acme").balance == 15_000_000  # the opening balance brought over, not the usage since
    finally:
        fresh.close()


def test_importing_the_export_again_finds_every_account_unchanged(db, settings, clock, tmp_path):
    add_account(db, settings, clock, "acme", opening_balance="150.00")
    add_account(db, settings, clock, "birch", vat_percent="8.875", auto_recharge=True)
    add_source(db, "birch", CardInfo("cus_B1", "pm_B1", "visa", "4242", 3, 2031), actor=ACTOR, clock=clock)
    close(db, clock, "acme")
    path = tmp_path / "accounts.csv"
    path.write_text(_export(db), encoding="utf-8")
    again = create_accounts(db, read_csv(path, settings, clock.now()), ACTOR, clock)
    assert (again.created, again.unchanged) == ([], ["acme", "birch"])


# --- the schema -----------------------------------------------------------------------------------------------


def test_downgrading_0010_reopens_every_account_and_upgrading_again_works(db_url, settings, clock):
    from alembic import command

    db = Database(db_url)
    try:
        add_account(db, settings, clock)
        close(db, clock)
        with db.engine.begin() as connection:
            config = db._alembic()
            config.attributes["connection"] = connection
            command.downgrade(config, "0009_recharge_decisions")
        db.upgrade()
        account = row(db)
        assert (account.id, account.closed_at, account.closed_reason) == ("acme", None, None)
    finally:
        db.close()
