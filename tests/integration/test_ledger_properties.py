"""Property: whatever batches of events arrive, in whatever order and with whatever repeats, the ledger
keeps its invariants and each event id is counted exactly once, at its first accepted content."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from sqlalchemy import select

from recharged.clock import FixedClock
from recharged.config import load_settings
from recharged.store.engine import Database
from recharged.store.models import Account
from recharged.usage import UsageRecorder
from recharged.verify import verify
from tests.helpers import NOW, add_account

SETTINGS = load_settings(None, environ={})
RATES = SETTINGS.plans["standard"].rate_table()

events = st.builds(
    lambda n, account, kind, day, second, amount: {
        "event_id": f"e{n}",
        "account_id": account,
        "kind": kind,
        "started_at": f"2026-11-{day:02d}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z",
        **({"quantity": str(amount + 1)} if kind in ("sms_out", "lookup") else {"duration_seconds": str(amount)}),
    },
    n=st.integers(0, 30),  # few ids: repeats and conflicting repeats are common
    account=st.sampled_from(["a", "b", "ghost"]),
    kind=st.sampled_from(["dialer", "recording", "sms_out", "lookup", "fax"]),
    day=st.integers(1, 22),
    second=st.integers(0, 86_399),
    amount=st.integers(0, 4_000),
)


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(events, max_size=12), max_size=5))
def test_ledger_invariants_hold_for_any_batches(sqlite_template: Path, batches):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prop.db"
        shutil.copy(sqlite_template, path)
        db = Database(f"sqlite:///{path}")
        clock = FixedClock(NOW)
        for account in ("a", "b"):
            add_account(db, SETTINGS, clock, account)
        recorder = UsageRecorder(db, SETTINGS, clock)
        first_accepted: dict[str, dict[str, str]] = {}
        for batch in batches:
            for raw, outcome in zip(batch, recorder.record(batch), strict=True):
                if outcome.status == "accepted":
                    assert raw["event_id"] not in first_accepted
                    first_accepted[raw["event_id"]] = raw
                elif outcome.status == "duplicate":
                    assert raw["event_id"] in first_accepted
        expected = {"a": 0, "b": 0}
        for raw in first_accepted.values():
            kind_rate = RATES[raw["kind"]]
            if kind_rate.measure == "time":
                seconds = int(raw["duration_seconds"])
                billed = -(-seconds // kind_rate.increment_seconds) * kind_rate.increment_seconds if seconds else 0
                cost = (kind_rate.price_per_minute * billed * 2 + 60) // 120 if billed else 0
            else:
                cost = kind_rate.price_per_unit * int(raw["quantity"])
            expected[raw["account_id"]] -= cost
        with db.transaction() as s:
            assert {r.id: r.balance for r in s.execute(select(Account.id, Account.balance))} == expected
        report = verify(db)
        assert report.ok, report.violations
        assert report.checked_entries == len(first_accepted)
        db.close()
