"""`accounts history`: usage per day and kind, the ledger's balance at each midnight, the day's threshold and
the recharges, checked against figures worked out by hand; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from recharged.accounts import adjust_balance
from recharged.errors import InputError, NotFoundError
from recharged.funding import add_source
from recharged.history import account_history, parse_period
from recharged.money import parse_amount
from recharged.recharge import RechargeService
from recharged.usage import UsageRecorder
from tests.helpers import add_account, call, card_on_file

DAYS = [date(2026, 11, d) for d in range(17, 23)]


@pytest.fixture
def history(stripe_client, gateway_factory, db, settings, clock):
    """An account created 2026-11-10 with 100.00, some calls, an adjustment on the 21st and a top-up on the 22nd
    (the clock's day), seen from the 17th to the 22nd."""
    add_account(db, settings, clock, "acme", created_at="2026-11-10T00:00:00Z", opening_balance="100.00")
    UsageRecorder(db, settings, clock).record(
        [
            call("c1", seconds=70, at="2026-11-18T10:00:00Z"),  # bills 2 minutes: 0.04
            call("c2", seconds=300 * 60, at="2026-11-19T09:00:00Z"),  # 6.00
            call("c3", seconds=300 * 60, at="2026-11-19T15:00:00Z"),  # 6.00
            call("c4", seconds=30, at="2026-11-20T23:59:59Z"),  # bills 1 minute: 0.02
            {
                "event_id": "l1",
                "account_id": "acme",
                "kind": "lookup",
                "started_at": "2026-11-20T08:00:00Z",
                "quantity": "2",
            },
        ]
    )
    now = clock.now()
    clock.set(datetime(2026, 11, 21, 8, 0, tzinfo=UTC))
    adjust_balance(db, "acme", parse_amount("5.00"), reason="goodwill", actor="Jane Doe", clock=clock)
    clock.set(now)
    add_source(db, "acme", card_on_file(stripe_client, "pm_card_visa"), actor="Jane Doe", clock=clock)
    RechargeService(db, settings, gateway_factory, clock).topup("acme", parse_amount("20.00"), "Jane Doe")
    return account_history(db, settings, "acme", DAYS[0], DAYS[-1])


def test_70_second_call_bills_two_minutes_in_the_day_usage(history):
    day = {d.day: d for d in history.days}
    [dialer] = day[date(2026, 11, 18)].usage
    assert (dialer.kind, dialer.events, dialer.quantity, dialer.unit, dialer.amount) == ("dialer", 1, 120, "s", 4_000)
    kinds = {u.kind: (u.events, u.quantity, u.unit, u.amount) for u in day[date(2026, 11, 20)].usage}
    assert kinds == {"dialer": (1, 60, "s", 2_000), "lookup": (1, 2, "lookup", 2_000)}
    assert [d.usage_total for d in history.days] == [0, 4_000, 1_200_000, 4_000, 0, 0]


def test_balance_at_the_end_of_each_day_is_the_ledger_sum_with_the_day_recharges(history):
    assert history.opening_balance == 10_000_000
    assert [d.credits_and_adjustments for d in history.days] == [0, 0, 0, 0, 500_000, 2_000_000]
    assert [d.balance for d in history.days] == [
        10_000_000,  # 17th: nothing happened
        9_996_000,  # 18th: -0.04
        8_796_000,  # 19th: -12.00
        8_792_000,  # 20th: -0.02 - 0.02
        9_292_000,  # 21st: +5.00 adjustment
        11_292_000,  # 22nd: +20.00 top-up (the clock's day)
    ]
    assert [d.recharges for d in history.days[:-1]] == [()] * 5
    [topup] = history.days[-1].recharges
    assert (topup.kind, topup.amount, topup.total, topup.phase) == ("topup", 2_000_000, 2_400_000, "finished")
    assert "visa" in topup.outcome
    assert [amount for _, amount in history.credited] == [2_000_000]


def test_threshold_is_the_decision_at_the_start_of_each_day(history):
    # 7 days x the average over the full days since creation (at most 30), at least min_threshold 5.00
    assert [d.threshold for d in history.days] == [
        500_000,  # no usage yet: the floor
        500_000,
        500_000,  # 0.04 x 7 / 9 days: under the floor
        842_800,  # 12.04 x 7 / 10
        768_727,  # 12.08 x 7 / 11 = 7.687272...
        704_667,  # 12.08 x 7 / 12 = 7.046666...
    ]
    assert history.days[3].average_daily == 120_400


def test_json_has_decimal_strings_and_the_chart_is_a_png(history, tmp_path):
    data = history.as_json()
    assert (data["since"], data["until"], data["opening_balance"]) == ("2026-11-17", "2026-11-22", "100.00000")
    assert data["days"][1]["usage"]["dialer"] == {"events": 1, "quantity": 120, "unit": "s", "amount": "0.04000"}
    assert data["days"][-1]["balance"] == "112.92000"
    assert data["days"][-1]["recharges"][0]["charged"] == "24.00000"
    path = history.chart(tmp_path / "acme.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_account_is_not_found(db, settings):
    with pytest.raises(NotFoundError, match="no account 'ghost'"):
        account_history(db, settings, "ghost", DAYS[0], DAYS[-1])


TODAY = date(2026, 11, 22)


@pytest.mark.parametrize(
    ("days", "since", "until", "expected"),
    [
        (None, None, None, (date(2026, 10, 24), TODAY)),
        (7, None, None, (date(2026, 11, 16), TODAY)),
        (1, None, "2026-11-01", (date(2026, 11, 1), date(2026, 11, 1))),
        (None, "2026-11-01", None, (date(2026, 11, 1), TODAY)),
        (None, "2026-11-01", "2026-11-05", (date(2026, 11, 1), date(2026, 11, 5))),
    ],
)
def test_period_from_the_options(days, since, until, expected):
    assert parse_period(days, since, until, TODAY) == expected


@pytest.mark.parametrize(
    ("days", "since", "until", "message"),
    [
        (3, "2026-11-01", None, "either --days or --since"),
        (None, "2026-13-01", None, "--since '2026-13-01' is not a date"),
        (None, None, "yesterday", "--until 'yesterday' is not a date"),
        (None, "2026-11-05", "2026-11-01", "after --until"),
        (None, "2025-01-01", "2026-11-01", "longer than 366 days"),
    ],
)
def test_bad_periods_are_input_errors(days, since, until, message):
    with pytest.raises(InputError, match=message):
        parse_period(days, since, until, TODAY)
