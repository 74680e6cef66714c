"""Recording usage into the ledger, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy import func, select

from recharged.store import ledger as db_module
from recharged.store.models import Account, DailyUsage, Entry
from recharged.usage import UsageRecorder
from recharged.verify import verify
from tests.helpers import add_account, call


def balance(db, account="acme") -> int:
    with db.transaction() as s:
        return s.scalar(select(Account.balance).where(Account.id == account))


def count_entries(db) -> int:
    with db.transaction() as s:
        return s.scalar(select(func.count()).select_from(Entry))


def test_70_second_dialer_call_debits_two_minutes(db, settings, clock):
    add_account(db, settings, clock)
    outcome = UsageRecorder(db, settings, clock).record([call("c1", seconds=70)])
    assert [o.status for o in outcome] == ["accepted"]
    assert balance(db) == -4_000  # 2 minutes x $0.02 = $0.04000
    with db.transaction() as s:
        entry = s.scalar(select(Entry).where(Entry.external_id == "c1"))
        assert (entry.duration_seconds, entry.billable_quantity, entry.amount) == (70, 120, -4_000)


def test_feeding_the_same_event_twice_changes_nothing(db, settings, clock):
    add_account(db, settings, clock)
    recorder = UsageRecorder(db, settings, clock)
    assert recorder.record([call("c1")])[0].status == "accepted"
    assert recorder.record([call("c1")])[0].status == "duplicate"
    # and a fresh recorder (another process) sees the same through the database's unique constraint
    assert UsageRecorder(db, settings, clock).record([call("c1")])[0].status == "duplicate"
    assert balance(db) == -4_000
    assert count_entries(db) == 1


def test_same_event_id_with_other_content_is_rejected_and_names_the_field(db, settings, clock):
    add_account(db, settings, clock)
    recorder = UsageRecorder(db, settings, clock)
    recorder.record([call("c1", seconds=70)])
    outcome = recorder.record([call("c1", seconds=300)])[0]
    assert outcome.status == "rejected"
    assert "duration_seconds" in outcome.reason
    assert balance(db) == -4_000


def test_bad_events_are_rejected_one_by_one_and_good_ones_recorded(db, settings, clock):
    add_account(db, settings, clock)
    batch = [
        call("ok1", seconds=30),
        call("neg", seconds=-5),
        call("ghost", account="nobody"),
        {**call("nokind"), "kind": "fax"},
        call("future", at="2026-11-23T12:00:00Z"),
        {**call("nodur"), "duration_seconds": ""},
        {
            "event_id": "sms1",
            "account_id": "acme",
            "kind": "sms_out",
            "started_at": "2026-11-20T10:00:00Z",
            "text": "hi",
        },
        {**call("both"), "kind": "sms_out", "duration_seconds": "", "quantity": "2", "text": "hi"},
        call("badtime", at="yesterday"),
        call("ok2", seconds=61),
    ]
    outcomes = UsageRecorder(db, settings, clock).record(batch, positions=list(range(2, 12)))
    by_id = {o.event_id: o for o in outcomes}
    assert [o.position for o in outcomes] == list(range(2, 12))
    assert {e for e, o in by_id.items() if o.status == "accepted"} == {"ok1", "ok2", "sms1"}
    assert "at least 0" in by_id["neg"].reason
    assert "unknown account 'nobody'" in by_id["ghost"].reason
    assert "unknown kind 'fax'" in by_id["nokind"].reason
    assert "in the future" in by_id["future"].reason
    assert "duration_seconds is missing" in by_id["nodur"].reason
    assert "not both" in by_id["both"].reason
    assert "ISO 8601" in by_id["badtime"].reason
    # 30 s -> 1 min ($0.02), 61 s -> 2 min ($0.04), one SMS segment $0.0079
    assert balance(db) == -(2_000 + 4_000 + 790)
    assert verify(db).ok


def test_a_failed_batch_leaves_nothing_half_written(db, settings, clock, monkeypatch):
    add_account(db, settings, clock)

    def broken(*args, **kwargs):  # fails after the entries, totals and balances were written
        raise RuntimeError("disk full")

    monkeypatch.setattr("recharged.usage.existing_entries", broken)
    with pytest.raises(RuntimeError):
        UsageRecorder(db, settings, clock).record([call("c1"), call("c2")])
    assert count_entries(db) == 0
    assert balance(db) == 0
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(DailyUsage)) == 0
    monkeypatch.setattr("recharged.usage.existing_entries", db_module.existing_entries)
    assert [o.status for o in UsageRecorder(db, settings, clock).record([call("c1")])] == ["accepted"]
    assert verify(db).ok


def test_daily_totals_follow_the_utc_day_of_dialing(db, settings, clock):
    add_account(db, settings, clock)
    UsageRecorder(db, settings, clock).record(
        [
            call("late", seconds=60, at="2026-11-20T23:59:59Z"),
            call("early", seconds=60, at="2026-11-21T00:00:00Z"),
            call("offset", seconds=60, at="2026-11-21T01:30:00+02:00"),  # 23:30 UTC on the 20th
        ]
    )
    with db.transaction() as s:
        rows = {(r.day, r.kind): (r.events, r.quantity, r.amount) for r in s.scalars(select(DailyUsage))}
    assert rows == {
        (date(2026, 11, 20), "dialer"): (2, 120, 4_000),
        (date(2026, 11, 21), "dialer"): (1, 60, 2_000),
    }


def test_sms_text_is_billed_by_segments(db, settings, clock):
    add_account(db, settings, clock)
    long_text = "x" * 161  # GSM-7, two segments
    unicode_text = "ç" * 71  # UCS-2, two segments
    UsageRecorder(db, settings, clock).record(
        [
            {
                "event_id": "s1",
                "account_id": "acme",
                "kind": "sms_out",
                "started_at": "2026-11-20T10:00:00Z",
                "text": long_text,
            },
            {
                "event_id": "s2",
                "account_id": "acme",
                "kind": "sms_out",
                "started_at": "2026-11-20T10:00:00Z",
                "text": unicode_text,
            },
        ]
    )
    with db.transaction() as s:
        assert {e.external_id: e.quantity for e in s.scalars(select(Entry))} == {"s1": 2, "s2": 2}
    assert balance(db) == -4 * 790


def test_pre_rated_cost_is_used_as_given(db, settings, clock):
    add_account(db, settings, clock)
    UsageRecorder(db, settings, clock).record([{**call("c1", seconds=70), "cost": "0.12345"}])
    assert balance(db) == -12_345
    assert verify(db).ok


def test_first_usage_time_is_the_earliest_started_at(db, settings, clock):
    add_account(db, settings, clock)
    recorder = UsageRecorder(db, settings, clock)
    recorder.record([call("b", at="2026-11-10T10:00:00Z")])
    recorder.record([call("a", at="2026-11-01T10:00:00Z"), call("c", at="2026-11-15T10:00:00Z")])
    with db.transaction() as s:
        assert s.get(Account, "acme").first_usage_at.isoformat() == "2026-11-01T10:00:00+00:00"


def test_a_repeat_inside_one_batch_is_a_duplicate(db, settings, clock):
    add_account(db, settings, clock)
    outcomes = UsageRecorder(db, settings, clock).record(
        [call("c1"), call("c1"), {**call("c1"), "duration_seconds": "9"}]
    )
    assert [o.status for o in outcomes] == ["accepted", "duplicate", "rejected"]
    assert balance(db) == -4_000


def test_each_copy_in_a_batch_is_judged_against_what_is_recorded(db, settings, clock):
    """An exact resend of a recorded event is a duplicate even when an earlier row of its batch reused the id with
    other content; a copy that differs from the one recorded names the field. Found by the model (issue 13)."""
    add_account(db, settings, clock)
    recorder = UsageRecorder(db, settings, clock)
    assert recorder.record([call("c1", seconds=70)])[0].status == "accepted"
    outcomes = recorder.record([call("c1", seconds=300), call("c1", seconds=70), call("c1", seconds=5)])
    assert [o.status for o in outcomes] == ["rejected", "duplicate", "rejected"]
    assert "duration_seconds" in outcomes[0].reason
    assert "duration_seconds" in outcomes[2].reason
    # an id new to the database: the first good copy is recorded, the rest are judged against it
    outcomes = recorder.record(
        [{**call("c2"), "kind": "telex"}, call("c2", seconds=10), call("c2", seconds=10), call("c2", seconds=20)]
    )
    assert [o.status for o in outcomes] == ["rejected", "accepted", "duplicate", "rejected"]
    assert "unknown kind" in outcomes[0].reason
    assert "duration_seconds" in outcomes[3].reason
    assert balance(db) == -4_000 - 2_000  # c1's two minutes, then c2's one minute
    assert count_entries(db) == 2


def test_verify_finds_a_tampered_balance(db, settings, clock):
    add_account(db, settings, clock)
    UsageRecorder(db, settings, clock).record([call("c1")])
    with db.transaction() as s:
        s.get(Account, "acme").balance += 1
    report = verify(db)
    assert not report.ok
    assert "cached balance" in report.violations[0]


def test_verify_finds_an_entry_that_does_not_match_its_rate(db, settings, clock):
    add_account(db, settings, clock)
    UsageRecorder(db, settings, clock).record([call("c1")])
    with db.transaction() as s:
        s.scalar(select(Entry).where(Entry.external_id == "c1")).billable_quantity = 70
    assert any("its rate gives 120" in v for v in verify(db).violations)
