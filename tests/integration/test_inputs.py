"""What recharged takes in, on SQLite and PostgreSQL: usage files longer than one batch, the age of usage events,
the alphabet of account ids, re-imported accounts compared column by column, adjustment references per account,
and JSON bodies that give a key twice."""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from recharged.accounts import (
    NewAccount,
    adjust_balance,
    audit_trail,
    create_accounts,
    new_account,
    read_csv,
)
from recharged.config import load_settings
from recharged.errors import ConflictError, InputError
from recharged.store.models import Account, AuditRecord, DailyUsage, Entry, FundingSource
from recharged.usage import UsageRecorder, import_csv
from recharged.verify import verify
from tests.helpers import API_TOKEN, NOW, add_account, call

ACTOR = "Jane Doe"


def balances(db) -> dict[str, int]:
    with db.reading() as s:
        return dict(s.execute(select(Account.id, Account.balance)).all())


def entry_count(db, entry_type: str | None = None) -> int:
    with db.reading() as s:
        query = select(func.count()).select_from(Entry)
        if entry_type is not None:
            query = query.where(Entry.entry_type == entry_type)
        return s.scalar(query)


# --- usage import longer than one batch (issue 13 item 1) ----------------------------------------------------


def test_an_import_of_several_batches_records_every_row_and_reports_progress(db, clock, tmp_path):
    settings = load_settings(None, environ={"RECHARGED_USAGE__BATCH_SIZE": "7"})
    add_account(db, settings, clock, "acme")
    add_account(db, settings, clock, "birch")
    header = "event_id,account_id,kind,started_at,duration_seconds,quantity,text,cost\n"
    lines = [
        f"c{n:02d},{'acme' if n % 2 else 'birch'},dialer,2026-11-{1 + n % 20:02d}T10:00:00Z,70,,,\n" for n in range(30)
    ]
    lines.append("s1,acme,sms_out,2026-11-20T10:00:00Z,,,Grüße aus Köln ✓,\n")  # bytes, not characters
    lines.append("c03,acme,dialer,2026-11-04T10:00:00Z,70,,,\n")  # the same event again: a duplicate
    lines.append("bad,acme,fax,2026-11-20T10:00:00Z,70,,,\n")
    path = tmp_path / "calls.csv"
    path.write_text(header + "".join(lines), encoding="utf-8")
    size = path.stat().st_size

    seen: list[tuple[int, int]] = []
    report = import_csv(
        UsageRecorder(db, settings, clock),
        path,
        batch_size=settings.usage.batch_size,
        progress=lambda *p: seen.append(p),
    )

    assert (report.accepted, report.duplicate, report.rejected) == (31, 1, 1)
    with report.rejects.open() as handle:
        assert [(r["line"], r["event_id"]) for r in csv.DictReader(handle)] == [("34", "bad")]
    # After each batch of 7 rows: exactly the bytes of the header and the rows read so far; then the whole file.
    ends = [len(header.encode()) + sum(len(line.encode()) for line in lines[:n]) for n in (7, 14, 21, 28, 33)]
    assert seen == [(0, size), *((end, size) for end in ends), (size, size)]
    # Every call (2 minutes at $0.02) and the one-segment SMS landed, once, in the ledger and the daily totals.
    with db.reading() as s:
        assert s.scalar(select(func.count()).select_from(Entry).where(Entry.entry_type == "usage")) == 31
        daily = s.scalar(select(func.sum(DailyUsage.amount)))
    sms = -balances(db)["acme"] - 15 * 4_000
    assert sms > 0
    assert balances(db) == {"acme": -(15 * 4_000 + sms), "birch": -15 * 4_000}
    assert daily == 30 * 4_000 + sms
    assert verify(db).ok


# --- the age of usage events (issue 13 item 10) ---------------------------------------------------------------


def test_an_event_older_than_max_age_days_is_rejected_with_the_reason(db, clock):
    settings = load_settings(None, environ={"RECHARGED_USAGE__MAX_AGE_DAYS": "30"})
    add_account(db, settings, clock, created_at="2026-01-01T00:00:00Z")
    recorder = UsageRecorder(db, settings, clock)
    day_31 = (NOW - timedelta(days=30, seconds=1)).isoformat()
    day_30 = (NOW - timedelta(days=30)).isoformat()
    outcomes = recorder.record(
        [call("old", at=day_31), call("edge", at=day_30), call("year-1", at="0001-01-01T00:00Z")]
    )
    assert [o.status for o in outcomes] == ["rejected", "accepted", "rejected"]
    assert "more than 30 days ago (usage.max_age_days" in outcomes[0].reason
    assert outcomes[2].reason.startswith("started_at 0001-01-01T00:00:00+00:00 is more than 30 days ago")
    with db.reading() as s:
        assert s.get(Account, "acme").first_usage_at == NOW - timedelta(days=30)


def test_the_default_age_limit_keeps_a_year_of_usage_and_refuses_year_one(db, settings, clock):
    add_account(db, settings, clock, created_at="2025-01-01T00:00:00Z")
    a_year_ago = (NOW - timedelta(days=366)).isoformat()
    outcomes = UsageRecorder(db, settings, clock).record(
        [call("year", at=a_year_ago), call("y1", at="0001-01-01T00:00Z")]
    )
    assert [o.status for o in outcomes] == ["accepted", "rejected"]
    assert "usage.max_age_days" in outcomes[1].reason


def test_the_api_answers_an_old_event_rejected_with_the_reason(make_api):
    api = make_api(usage__max_age_days="10")
    add_account(api.db, api.settings, api.clock)
    response = api.post_usage([call("old", at="2026-11-01T10:00:00Z"), call("new", at="2026-11-20T10:00:00Z")])
    assert response.status_code == 200
    old, new = response.json()["results"]
    assert (old["status"], new["status"]) == ("rejected", "accepted")
    assert "more than 10 days ago" in old["reason"]


# --- duplicate keys in JSON (issue 13 item 10) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('{"events": [{"event_id": "c1", "account_id": "acme", "account_id": "birch", "kind": "dialer", '
         '"started_at": "2026-11-20T10:00:00Z", "duration_seconds": 70}]}', "account_id"),
        ('{"events": [], "events": [{"event_id": "c1", "account_id": "acme", "kind": "dialer", '
         '"started_at": "2026-11-20T10:00:00Z", "duration_seconds": 70}]}', "events"),
    ],
)  # fmt: skip
def test_a_json_key_given_twice_is_refused_naming_the_key(make_api, body, key):
    api = make_api()
    add_account(api.db, api.settings, api.clock)
    add_account(api.db, api.settings, api.clock, "birch")
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    response = api.client.post("/v1/usage", content=body.encode(), headers=headers)
    assert response.status_code == 400
    assert f"the key '{key}' appears twice in one object" in response.json()["error"]["message"]
    assert entry_count(api.db, "usage") == 0


# --- account ids (issue 13 item 10) ---------------------------------------------------------------------------


def fields(account_id="acme", **extra):
    return {"id": account_id, "email": "b@acme.example", "plan": "standard", "vat_percent": "20", **extra}


@pytest.mark.parametrize("account_id", ["acme-law", "A_1.b", "7eleven", "x" * 64])
def test_account_ids_of_letters_digits_and_safe_marks_are_accepted(settings, account_id):
    assert new_account(fields(account_id), settings, NOW).id == account_id


@pytest.mark.parametrize(
    "account_id", ["a/b", "a b", "a?b", "a%2Fb", "a#b", "..", ".hidden", "-x", "_x", "ünï", "a:b", "x" * 65]
)
def test_account_ids_outside_the_alphabet_are_refused_with_the_rule(settings, account_id):
    with pytest.raises(ValueError, match="not a valid account id: use 1 to 64 ASCII letters, digits"):
        new_account(fields(account_id), settings, NOW)


def test_creating_an_account_with_a_bad_id_is_refused_even_past_the_parser(db, settings, clock):
    good = new_account(fields("good"), settings, NOW)
    bad = NewAccount("a/b", "b@acme.example", "standard", "USD", good.vat_percent)
    with pytest.raises(InputError, match=r"not valid account ids .*'a/b'"):
        create_accounts(db, [good, bad], ACTOR, clock)
    assert balances(db) == {}


def test_an_import_with_a_bad_id_lists_its_line_and_imports_nothing(db, settings, tmp_path):
    path = tmp_path / "accounts.csv"
    path.write_text("id,email,plan,vat_percent\ngood,a@good.example,standard,20\nsales/eu,b@eu.example,standard,20\n")
    with pytest.raises(InputError, match=f"{path}:3: id 'sales/eu' is not a valid account id"):
        read_csv(path, settings, NOW)


# --- re-imported accounts (issue 13 item 8) -------------------------------------------------------------------

HEADER = (
    "id,email,plan,vat_percent,currency,created_at,opening_balance,auto_recharge,"
    "stripe_customer,payment_method,card_brand,card_last4,card_exp\n"
)
ACME = {
    "id": "acme",
    "email": "billing@acme.example",
    "plan": "standard",
    "vat_percent": "20",
    "currency": "USD",
    "created_at": "2026-09-01T00:00:00Z",
    "opening_balance": "25.00",
    "auto_recharge": "true",
    "stripe_customer": "cus_acme",
    "payment_method": "pm_acme",
    "card_brand": "visa",
    "card_last4": "4242",
    "card_exp": "12/2030",
}
BIRCH = {**ACME, "id": "birch", "email": "billing@birch.example", "stripe_customer": "", "payment_method": ""}
BIRCH |= {"card_brand": "", "card_last4": "", "card_exp": "", "opening_balance": "", "auto_recharge": ""}


def accounts_csv(path: Path, *rows: dict[str, str]) -> Path:
    path.write_text(HEADER + "".join(",".join(row.values()) + "\n" for row in rows))
    return path


def import_file(db, settings, clock, path: Path):
    return create_accounts(db, read_csv(path, settings, NOW), ACTOR, clock)


def test_reimporting_the_same_accounts_changes_nothing(db, settings, clock, tmp_path):
    path = accounts_csv(tmp_path / "accounts.csv", ACME, BIRCH)
    assert import_file(db, settings, clock, path).created == ["acme", "birch"]
    again = import_file(db, settings, clock, path)
    assert (again.created, again.unchanged) == ([], ["acme", "birch"])
    # an empty created_at means "when imported": not compared; 25 and 25.00000 are the same amount
    same = accounts_csv(
        tmp_path / "same.csv", {**ACME, "created_at": "", "opening_balance": "25", "card_exp": "12/2030"}
    )
    assert import_file(db, settings, clock, same).unchanged == ["acme"]


@pytest.mark.parametrize(
    ("column", "value", "recorded", "given"),
    [
        ("email", "ap@acme.example", "billing@acme.example", "ap@acme.example"),
        ("vat_percent", "19", "20", "19"),
        ("created_at", "2026-08-01T00:00:00Z", "2026-09-01T00:00:00+00:00", "2026-08-01T00:00:00+00:00"),
        ("opening_balance", "30.00", "25.00000", "30.00000"),
        ("opening_balance", "", "25.00000", "0.00000"),
        ("auto_recharge", "false", "true", "false"),
        ("payment_method", "pm_other", "pm_acme", "pm_other"),
        ("card_last4", "4444", "4242", "4444"),
        ("card_exp", "01/2031", "12/2030", "01/2031"),
    ],
)
def test_reimporting_an_account_that_differs_in_any_column_is_a_conflict_and_writes_nothing(
    db, settings, clock, tmp_path, column, value, recorded, given
):
    import_file(db, settings, clock, accounts_csv(tmp_path / "first.csv", ACME))
    changed = accounts_csv(tmp_path / "changed.csv", {**BIRCH, "id": "new"}, {**ACME, column: value})
    with pytest.raises(ConflictError) as caught:
        import_file(db, settings, clock, changed)
    assert f"{changed}:3: account acme: {column}: recorded {recorded}, given {given}" in str(caught.value)
    assert str(caught.value).count(": recorded ") == 1  # only the column that differs
    with db.reading() as s:
        assert s.get(Account, "new") is None
        assert s.scalar(select(func.count()).select_from(AuditRecord)) == 1


def test_a_card_in_the_file_that_the_account_lacks_is_a_conflict_a_row_without_one_says_nothing(
    db, settings, clock, tmp_path
):
    import_file(db, settings, clock, accounts_csv(tmp_path / "first.csv", ACME, BIRCH))
    swapped = accounts_csv(
        tmp_path / "swapped.csv",
        {
            **ACME,
            **{k: BIRCH[k] for k in ("stripe_customer", "payment_method", "card_brand", "card_last4", "card_exp")},
        },
        {
            **BIRCH,
            **{k: ACME[k] for k in ("stripe_customer", "payment_method", "card_brand", "card_last4", "card_exp")},
        },
    )
    with pytest.raises(ConflictError) as caught:
        import_file(db, settings, clock, swapped)
    message = str(caught.value)
    assert message.startswith("1 account already exists with other settings; nothing was written")
    # acme's row has no card: cards are managed with `sources` once an account exists, so it claims nothing
    assert "account acme" not in message
    assert f"{swapped}:3: account birch: stripe_customer: recorded (none), given cus_acme;" in message
    with db.reading() as s:
        assert s.scalars(select(FundingSource.account_id)).all() == ["acme"]


# --- adjustment references (issue 13 item 5) ------------------------------------------------------------------


def test_the_same_reference_on_two_accounts_is_two_adjustments(db, settings, clock):
    add_account(db, settings, clock, "acme")
    add_account(db, settings, clock, "birch")
    assert adjust_balance(db, "acme", 500_000, reason="outage", actor=ACTOR, clock=clock, reference="TICKET-1")
    assert adjust_balance(db, "birch", 500_000, reason="outage", actor=ACTOR, clock=clock, reference="TICKET-1")
    assert balances(db) == {"acme": 500_000, "birch": 500_000}
    assert [r.after["reference"] for r in audit_trail(db, "birch") if r.action == "balance.adjusted"] == ["TICKET-1"]
    assert verify(db).ok


def test_the_same_adjustment_again_changes_nothing(db, settings, clock):
    add_account(db, settings, clock)
    assert adjust_balance(db, "acme", -150_000, reason="reversal", actor=ACTOR, clock=clock, reference="r1")
    assert not adjust_balance(db, "acme", -150_000, reason="reversal", actor=ACTOR, clock=clock, reference=" r1 ")
    assert balances(db) == {"acme": -150_000}
    assert entry_count(db, "adjustment") == 1


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (-200_000, "this one is a debit of 2.00000"),
        (150_000, "this one is a credit of 1.50000"),  # the same amount the other way
    ],
)
def test_the_same_reference_with_another_amount_or_direction_is_a_conflict(db, settings, clock, amount, message):
    add_account(db, settings, clock)
    adjust_balance(db, "acme", -150_000, reason="reversal", actor=ACTOR, clock=clock, reference="r1")
    with pytest.raises(ConflictError) as caught:
        adjust_balance(db, "acme", amount, reason="reversal", actor=ACTOR, clock=clock, reference="r1")
    assert "account acme: adjustment 'r1' was recorded on 2026-11-22 12:00 UTC as a debit of 1.50000" in str(
        caught.value
    )
    assert message in str(caught.value)
    assert balances(db) == {"acme": -150_000}
    assert len(audit_trail(db, "acme")) == 2  # the creation and the first adjustment


@pytest.mark.parametrize("reference", ["", "   ", "x" * 129, "line\nbreak"])
def test_a_reference_that_is_empty_too_long_or_unprintable_is_refused(db, settings, clock, reference):
    add_account(db, settings, clock)
    with pytest.raises(InputError, match=r"--reference .* must be 1 to 128 printable characters"):
        adjust_balance(db, "acme", 100, reason="x", actor=ACTOR, clock=clock, reference=reference)
    assert entry_count(db, "adjustment") == 0


def test_adjustments_without_a_reference_are_each_recorded(db, settings, clock):
    add_account(db, settings, clock)
    assert adjust_balance(db, "acme", 100_000, reason="goodwill", actor=ACTOR, clock=clock)
    assert adjust_balance(db, "acme", 100_000, reason="goodwill", actor=ACTOR, clock=clock)  # the same second
    assert balances(db) == {"acme": 200_000}
    with db.reading() as s:
        references = s.scalars(select(Entry.reference).where(Entry.entry_type == "adjustment")).all()
    assert len(set(references)) == 2
    assert all(reference.startswith("adj-20261122T120000-") for reference in references)


def test_0008_gives_existing_adjustments_their_reference_per_account(db_url, settings, clock):
    """An adjustment recorded before 0008 (its reference in external_id) keeps it: a replay on its account changes
    nothing, another amount conflicts, and the same reference on another account is a new adjustment."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from recharged.store.engine import Database
    from recharged.store.models import Base

    db = Database(db_url)
    add_account(db, settings, clock, "acme")
    add_account(db, settings, clock, "birch")
    with db.engine.begin() as connection:
        config = db._alembic()
        config.attributes["connection"] = connection
        command.downgrade(config, "0007_processor_events")
    with db.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO entries (account_id, entry_type, external_id, amount, occurred_at, recorded_at, note) "
            "VALUES ('acme', 'adjustment', 'TICKET-1', 500000, '2026-11-02 00:00:00', '2026-11-02 00:00:00', 'x')"
        )
        connection.exec_driver_sql("UPDATE accounts SET balance = 500000 WHERE id = 'acme'")
    db.upgrade()
    with db.engine.connect() as connection:
        assert (
            compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata) == []
        )
    assert not adjust_balance(db, "acme", 500_000, reason="outage", actor=ACTOR, clock=clock, reference="TICKET-1")
    with pytest.raises(ConflictError, match=r"as a credit of 5\.00000"):
        adjust_balance(db, "acme", 600_000, reason="outage", actor=ACTOR, clock=clock, reference="TICKET-1")
    assert adjust_balance(db, "birch", 500_000, reason="outage", actor=ACTOR, clock=clock, reference="TICKET-1")
    assert balances(db) == {"acme": 500_000, "birch": 500_000}
    db.close()


def test_an_adjustment_naming_a_payment_is_found_by_its_reference(db, settings, clock):
    from recharged.store.reads import adjustments_referencing

    add_account(db, settings, clock, "acme")
    add_account(db, settings, clock, "birch")
    adjust_balance(db, "acme", 100_000, reason="paid by hand", actor=ACTOR, clock=clock, reference="pi_123")
    adjust_balance(db, "birch", 100_000, reason="paid by hand", actor=ACTOR, clock=clock, reference="pi_123")
    adjust_balance(db, "birch", 100_000, reason="goodwill", actor=ACTOR, clock=clock, reference="TICKET-2")
    with db.reading() as s:
        recent = adjustments_referencing(s, NOW - timedelta(days=1), [])
        by_id = adjustments_referencing(s, NOW + timedelta(days=1), ["pi_123"])
    assert sorted((e.account_id, e.reference) for e in recent) == [("acme", "pi_123"), ("birch", "pi_123")]
    assert sorted(e.account_id for e in by_id) == ["acme", "birch"]
