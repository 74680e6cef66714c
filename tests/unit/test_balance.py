"""The recharge decision: history, average, threshold, recharge amount, shortfall, caps, runway."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recharged.balance import (
    AccountFigures,
    Policy,
    Window,
    contradictions,
    decide,
    history_days,
    recompute,
    runway_days,
    stored_decision,
    stored_mismatches,
)
from recharged.money import CURRENCIES, with_vat

AT = datetime(2026, 11, 22, 15, 30, tzinfo=UTC)
MIDNIGHT = datetime(2026, 11, 22, tzinfo=UTC)
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
DAY_SECONDS = 86_400
NO_FLOORS = Policy()  # window 30, threshold 7 days, recharge 14 days, no floors, no caps

# 30.00 USD over a full 30-day window: 1.00 a day, threshold 7.00, recharge 14.00.
USAGE_1_PER_DAY = 3_000_000


def figures(
    *,
    balance: int = 0,
    window_usage: int = USAGE_1_PER_DAY,
    created_at: datetime = LONG_AGO,
    first_usage_at: datetime | None = None,
    auto_recharge: bool = True,
    policy: Policy = NO_FLOORS,
    currency: str = "USD",
    charged_last_day: int = 0,
    charged_last_30_days: int = 0,
) -> AccountFigures:
    return AccountFigures(
        currency=currency,
        balance=balance,
        created_at=created_at,
        first_usage_at=first_usage_at,
        window_usage=window_usage,
        auto_recharge=auto_recharge,
        policy=policy,
        charged_last_day=charged_last_day,
        charged_last_30_days=charged_last_30_days,
    )


# --- the window ------------------------------------------------------------------------------------------


def test_window_excludes_today_and_covers_30_full_days() -> None:
    window = Window.before(AT, 30)
    assert window.end == datetime(2026, 11, 22, tzinfo=UTC)
    assert window.start == datetime(2026, 10, 23, tzinfo=UTC)
    assert window.end - window.start == timedelta(days=30)


def test_window_at_midnight_still_excludes_the_new_day() -> None:
    window = Window.before(MIDNIGHT, 30)
    assert window.end == MIDNIGHT
    assert window.start == datetime(2026, 10, 23, tzinfo=UTC)


def test_window_uses_the_utc_day() -> None:
    # 01:00 at +05:00 is 20:00 UTC the day before
    at = datetime(2026, 11, 22, 1, 0, tzinfo=timezone(timedelta(hours=5)))
    window = Window.before(at, 30)
    assert window.end == datetime(2026, 11, 21, tzinfo=UTC)
    assert window.start == datetime(2026, 10, 22, tzinfo=UTC)


# --- history ---------------------------------------------------------------------------------------------


def test_young_account_divides_by_its_full_days() -> None:
    created = datetime(2026, 11, 19, tzinfo=UTC)  # 19, 20, 21 Nov: three full days
    assert history_days(AT, created, None, 30) == 3
    decision = decide(figures(created_at=created, window_usage=300_000), AT)
    assert decision.history_days == 3
    assert decision.average_daily == 100_000  # 3.00 / 3
    assert decision.threshold == 700_000
    assert decision.recharge_amount == 1_400_000


def test_account_created_mid_day_divides_by_the_time_its_usage_covers() -> None:
    # The window holds the usage from 19 Nov 10:00 on: 2 days 14 hours, not 2 full days.
    created = datetime(2026, 11, 19, 10, 0, tzinfo=UTC)
    assert history_days(AT, created, None, 30) == Decimal("2.58")
    decision = decide(figures(created_at=created, window_usage=310_000), AT)
    assert decision.average_daily == 120_000  # 3.10 / (2 + 14/24) days


# Usage at exactly 1.00 a day since the account's creation: the average must say 1.00, whatever the hour.
def _steady_usage(created: datetime, at: datetime) -> int:
    covered = Window.before(at, 30).end - max(created, Window.before(at, 30).start)
    return int(Decimal(100_000) * Decimal(covered.total_seconds()) / 86_400)


@pytest.mark.parametrize(
    ("created", "at"),
    [
        (datetime(2026, 11, 20, 0, 0, tzinfo=UTC), datetime(2026, 11, 22, 0, 0, tzinfo=UTC)),  # at midnight
        (datetime(2026, 11, 20, 12, 0, tzinfo=UTC), datetime(2026, 11, 22, 0, 0, tzinfo=UTC)),  # created mid-day
        (datetime(2026, 11, 20, 1, 0, tzinfo=UTC), datetime(2026, 11, 22, 9, 0, tzinfo=UTC)),  # created at 01:00
        (datetime(2026, 10, 23, 12, 0, tzinfo=UTC), datetime(2026, 11, 22, 9, 0, tzinfo=UTC)),  # day 30
        (datetime(2026, 10, 22, 12, 0, tzinfo=UTC), datetime(2026, 11, 22, 9, 0, tzinfo=UTC)),  # day 31: full window
    ],
)
def test_young_accounts_average_is_the_rate_of_their_usage(created: datetime, at: datetime) -> None:
    """A young account's average was up to ~2x too high when its creation day's usage was divided by the full
    days only (the second day of an account created at 01:00: 1.96 days of usage over 1 day)."""
    decision = decide(figures(created_at=created, window_usage=_steady_usage(created, at)), at)
    assert decision.average_daily == 100_000
    assert decision.recharge_amount == 1_400_000


def test_account_on_its_first_full_day_divides_by_one_day_at_least() -> None:
    # Created 21 Nov 18:00, usage of 6 hours in the window: never divided by less than a day (a short stretch
    # would make a large rate from little usage); the average stays below the rate, the safe side.
    created = datetime(2026, 11, 21, 18, 0, tzinfo=UTC)
    assert history_days(AT, created, None, 30) == 1
    assert decide(figures(created_at=created, window_usage=25_000), AT).average_daily == 25_000


def test_account_created_today_has_one_day() -> None:
    assert history_days(AT, datetime(2026, 11, 22, 9, 0, tzinfo=UTC), None, 30) == 1
    assert history_days(AT, datetime(2026, 11, 21, 23, 0, tzinfo=UTC), None, 30) == 1


def test_first_usage_before_creation_starts_history() -> None:
    created = datetime(2026, 11, 20, tzinfo=UTC)
    first_usage = datetime(2026, 11, 10, tzinfo=UTC)  # imported usage older than the account
    assert history_days(AT, created, first_usage, 30) == 12


def test_first_usage_after_creation_does_not_shorten_history() -> None:
    created = datetime(2026, 11, 10, tzinfo=UTC)
    first_usage = datetime(2026, 11, 20, tzinfo=UTC)
    assert history_days(AT, created, first_usage, 30) == 12


def test_history_is_capped_at_window() -> None:
    assert history_days(AT, LONG_AGO, None, 30) == 30
    assert history_days(AT, datetime(2026, 10, 22, tzinfo=UTC), None, 30) == 30  # 31 full days
    assert history_days(AT, datetime(2026, 10, 23, tzinfo=UTC), None, 30) == 30  # exactly 30
    assert history_days(AT, datetime(2026, 10, 24, tzinfo=UTC), None, 30) == 29
    assert history_days(AT, datetime(2026, 10, 22, 12, tzinfo=UTC), None, 30) == 30  # the window, not 30.5
    decision = decide(figures(window_usage=USAGE_1_PER_DAY), AT)
    assert decision.history_days == 30
    assert decision.average_daily == 100_000


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="has no UTC offset"):
        history_days(datetime(2026, 11, 22, 12, 0), LONG_AGO, None, 30)


# --- threshold and recharge amount -----------------------------------------------------------------------


def test_recharge_amount_rounds_half_up_to_cents() -> None:
    # 750 Units over 3 days: 250/day x 14 = 3,500 Units = 0.035 USD -> 0.04
    decision = decide(figures(created_at=datetime(2026, 11, 19, tzinfo=UTC), window_usage=750), AT)
    assert decision.recharge_amount == 4_000


def test_recharge_amount_rounds_in_one_step() -> None:
    # 322 Units over 3 days x 14 = 1,502.67 Units = 0.0150267 USD -> 0.02. Rounding the average to a Unit
    # first (107 x 14 = 1,498 -> 0.01) would give a different answer.
    exact_cents = Decimal(322) * 14 / 3 / 1_000
    expected = int(exact_cents.quantize(Decimal(1), rounding=ROUND_HALF_UP)) * 1_000
    assert expected == 2_000
    decision = decide(figures(created_at=datetime(2026, 11, 19, tzinfo=UTC), window_usage=322), AT)
    assert decision.recharge_amount == expected


def test_jpy_recharge_rounds_to_whole_yen() -> None:
    # 3 yen over 2 days with recharge_days 1: 1.5 yen -> 2 yen
    policy = Policy(recharge_days=1)
    decision = decide(
        figures(currency="JPY", created_at=datetime(2026, 11, 20, tzinfo=UTC), window_usage=300_000, policy=policy),
        AT,
    )
    assert decision.history_days == 2
    assert decision.recharge_amount == 200_000


def test_min_threshold_floor() -> None:
    # 3.00 over 30 days: 0.10/day, threshold 0.70, raised to the 5.00 floor
    policy = Policy(min_threshold=500_000)
    decision = decide(figures(window_usage=300_000, balance=400_000, policy=policy), AT)
    assert decision.threshold == 500_000
    assert decision.action == "charge"
    assert decision.reason == "below_threshold"


def test_min_threshold_applies_without_usage() -> None:
    policy = Policy(min_threshold=500_000, min_recharge=1_000_000)
    decision = decide(figures(window_usage=0, balance=0, policy=policy), AT)
    assert decision.average_daily == 0
    assert decision.threshold == 500_000
    assert decision.action == "charge"
    assert decision.charge_amount == 1_000_000


def test_min_recharge_floor() -> None:
    # 0.10/day x 14 = 1.40, raised to 10.00
    policy = Policy(min_recharge=1_000_000)
    decision = decide(figures(window_usage=300_000, balance=0, policy=policy), AT)
    assert decision.recharge_amount == 1_000_000
    assert decision.action == "charge"
    assert decision.charge_amount == 1_000_000


def test_max_recharge_caps_the_charge() -> None:
    policy = Policy(max_recharge=1_000_000)
    decision = decide(figures(balance=0, policy=policy), AT)  # 14.00 would be due
    assert decision.recharge_amount == 1_000_000
    assert decision.action == "charge"
    assert decision.charge_amount == 1_000_000


def test_max_recharge_caps_the_shortfall() -> None:
    # balance -20.00, threshold 7.00: shortfall 27.00 is more than max_recharge 20.00
    policy = Policy(max_recharge=2_000_000)
    decision = decide(figures(balance=-2_000_000, policy=policy), AT)
    assert decision.action == "charge"
    assert decision.charge_amount == 2_000_000
    assert decision.limited_by == "max_recharge"


# --- the decision ----------------------------------------------------------------------------------------


def test_auto_recharge_off_skips() -> None:
    decision = decide(figures(balance=-5_000_000, auto_recharge=False), AT)
    assert decision.action == "skip"
    assert decision.reason == "auto_recharge_off"
    assert decision.charge_amount == 0


def test_above_threshold_skips() -> None:
    decision = decide(figures(balance=2_000_000), AT)
    assert decision.action == "skip"
    assert decision.reason == "above_threshold"
    assert decision.charge_amount == 0


def test_usage_at_threshold_is_not_charged() -> None:
    decision = decide(figures(balance=700_000), AT)
    assert decision.threshold == 700_000
    assert decision.action == "skip"
    assert decision.reason == "above_threshold"


def test_one_unit_below_threshold_is_charged_the_recharge_amount() -> None:
    decision = decide(figures(balance=699_999), AT)
    assert decision.action == "charge"
    assert decision.reason == "below_threshold"
    assert decision.charge_amount == 1_400_000
    assert decision.limited_by is None


def test_shortfall_is_covered_in_one_charge() -> None:
    # 30.00010 over 30 days: threshold = 3,000,010 x 7 / 30 = 700,002.33 -> 700,002 Units;
    # recharge = 3,000,010 x 14 / 30 = 1,400,004.67 Units -> 14.00.
    # Balance -8.00: shortfall 15.00002, rounded UP to 15.01 (rounding half-up would leave it short).
    decision = decide(figures(balance=-800_000, window_usage=3_000_010), AT)
    assert decision.threshold == 700_002
    assert decision.recharge_amount == 1_400_000
    assert decision.action == "charge"
    assert decision.charge_amount == 1_501_000
    assert decision.limited_by == "shortfall"
    assert decision.balance + decision.charge_amount >= decision.threshold


def test_daily_cap_limits_the_charge() -> None:
    # 14.00 due; the daily cap of 20.00 has 15.00 used, so 5.00 remains
    policy = Policy(max_charged_per_day=2_000_000)
    decision = decide(figures(balance=0, policy=policy, charged_last_day=1_500_000), AT)
    assert decision.action == "charge"
    assert decision.charge_amount == 500_000
    assert decision.limited_by == "max_charged_per_day"


def test_cap_allowance_rounds_down_to_the_minor_unit() -> None:
    # 20.00 - 14.99001 = 5.00999 still allowed -> 5.00
    policy = Policy(max_charged_per_day=2_000_000)
    decision = decide(figures(balance=0, policy=policy, charged_last_day=1_499_001), AT)
    assert decision.charge_amount == 500_000


def test_thirty_day_cap_limits_the_charge() -> None:
    policy = Policy(max_charged_per_30_days=10_000_000)
    decision = decide(figures(balance=0, policy=policy, charged_last_30_days=9_200_000), AT)
    assert decision.action == "charge"
    assert decision.charge_amount == 800_000
    assert decision.limited_by == "max_charged_per_30_days"


def test_cap_with_room_does_not_limit() -> None:
    policy = Policy(max_charged_per_day=2_000_000, max_charged_per_30_days=10_000_000)
    decision = decide(figures(balance=0, policy=policy), AT)
    assert decision.charge_amount == 1_400_000
    assert decision.limited_by is None


def test_cap_reached_skips() -> None:
    # 0.00500 left under the cap: less than one cent
    policy = Policy(max_charged_per_day=2_000_000)
    decision = decide(figures(balance=0, policy=policy, charged_last_day=1_999_500), AT)
    assert decision.action == "skip"
    assert decision.reason == "cap_reached"
    assert decision.limited_by == "max_charged_per_day"
    assert decision.charge_amount == 0


def test_cap_overspent_skips() -> None:
    policy = Policy(max_charged_per_30_days=10_000_000)
    decision = decide(figures(balance=0, policy=policy, charged_last_30_days=10_500_000), AT)
    assert decision.reason == "cap_reached"
    assert decision.limited_by == "max_charged_per_30_days"


def test_exactly_one_cent_left_is_charged() -> None:
    # In a currency without a processor minimum (in USD, 0.01 is below Stripe's 0.50: test_money.py)
    policy = Policy(max_charged_per_day=2_000_000)
    decision = decide(figures(currency="ZAR", balance=0, policy=policy, charged_last_day=1_999_000), AT)
    assert decision.action == "charge"
    assert decision.charge_amount == 1_000


def test_negative_window_usage_counts_as_none() -> None:
    decision = decide(figures(window_usage=-100_000, balance=0), AT)
    assert decision.average_daily == 0
    assert decision.threshold == 0
    assert decision.runway_days is None
    assert decision.reason == "above_threshold"


def test_policy_overrides_replace_only_given_fields() -> None:
    policy = Policy(min_recharge=1_000_000).overridden({"min_recharge": None, "max_recharge": 5_000_000})
    assert policy.min_recharge == 1_000_000
    assert policy.max_recharge == 5_000_000


# --- runway ----------------------------------------------------------------------------------------------


def test_runway_is_balance_over_average() -> None:
    assert runway_days(500_000, USAGE_1_PER_DAY, 30 * DAY_SECONDS) == Decimal("5.0")
    assert decide(figures(balance=500_000), AT).runway_days == Decimal("5.0")


def test_runway_rounds_down_to_a_tenth() -> None:
    # 1.23456 / 1.00 a day = 1.23456 days -> 1.2; 0.19999 -> 0.1
    assert runway_days(123_456, USAGE_1_PER_DAY, 30 * DAY_SECONDS) == Decimal("1.2")
    assert runway_days(19_999, USAGE_1_PER_DAY, 30 * DAY_SECONDS) == Decimal("0.1")
    # 3.00 over 3 days with 2.99999 balance: 2.99999 -> 2.9, not 3.0
    assert runway_days(299_999, 300_000, 3 * DAY_SECONDS) == Decimal("2.9")


def test_runway_is_none_without_usage() -> None:
    assert runway_days(500_000, 0, 30 * DAY_SECONDS) is None
    assert decide(figures(balance=500_000, window_usage=0), AT).runway_days is None


@pytest.mark.parametrize("balance", [0, -1, -500_000])
def test_runway_is_zero_when_balance_is_not_positive(balance: int) -> None:
    assert runway_days(balance, USAGE_1_PER_DAY, 30 * DAY_SECONDS) == Decimal("0")


def test_runway_uses_history_days_of_a_young_account() -> None:
    # 3.00 over 3 days = 1.00/day; 4.50 lasts 4.5 days
    decision = decide(figures(balance=450_000, window_usage=300_000, created_at=datetime(2026, 11, 19, tzinfo=UTC)), AT)
    assert decision.runway_days == Decimal("4.5")


# --- properties ------------------------------------------------------------------------------------------

STEPS = {"USD": 1_000, "JPY": 100_000, "KWD": 1_000}  # charge steps: KWD charges whole 0.010s
BALANCES = st.integers(min_value=-(10**9), max_value=10**9)
USAGES = st.integers(min_value=0, max_value=10**10)
CREATED = st.datetimes(
    min_value=datetime(2026, 9, 1),
    max_value=datetime(2026, 11, 22, 15, 30),
    timezones=st.just(UTC),
)


@st.composite
def uncapped_figures(draw: st.DrawFn) -> AccountFigures:
    currency = draw(st.sampled_from(sorted(STEPS)))
    step = STEPS[currency]
    policy = Policy(
        window_days=draw(st.integers(min_value=1, max_value=60)),
        threshold_days=draw(st.integers(min_value=0, max_value=30)),
        recharge_days=draw(st.integers(min_value=0, max_value=60)),
        min_threshold=draw(st.integers(min_value=0, max_value=10**8)),
        # floors are configured in whole minor units
        min_recharge=draw(st.integers(min_value=0, max_value=10**8 // step)) * step,
    )
    return figures(
        currency=currency,
        balance=draw(BALANCES),
        window_usage=draw(USAGES),
        created_at=draw(CREATED),
        first_usage_at=draw(st.none() | CREATED),
        policy=policy,
    )


@given(uncapped_figures())
def test_a_charge_is_on_a_minor_unit_and_reaches_the_threshold(account: AccountFigures) -> None:
    decision = decide(account, AT)
    step = STEPS[account.currency]
    if decision.action == "charge":
        assert decision.charge_amount > 0
        assert decision.charge_amount % step == 0
        if decision.limited_by == "processor_maximum":  # the most Stripe charges at once (about 100,000 KWD)
            assert decision.charge_amount == CURRENCIES[account.currency].maximum_units  # no VAT here
            return
        assert account.balance + decision.charge_amount >= decision.threshold
        assert decision.charge_amount >= decision.recharge_amount
    else:
        assert decision.reason == "above_threshold"
        assert account.balance >= decision.threshold


@given(uncapped_figures())
def test_threshold_and_recharge_follow_the_average(account: AccountFigures) -> None:
    decision = decide(account, AT)
    policy = account.policy
    assert decision.inputs is not None
    days = Decimal(decision.inputs.history_seconds) / DAY_SECONDS  # exact: the shown history_days is rounded
    assert 1 <= days <= policy.window_days
    assert abs(decision.history_days - days) <= Decimal("0.005")
    exact_threshold = Decimal(account.window_usage) * policy.threshold_days / days
    assert decision.threshold == max(
        policy.min_threshold, int(exact_threshold.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    )
    step = STEPS[account.currency]
    exact_recharge_steps = Decimal(account.window_usage) * policy.recharge_days / days / step
    assert decision.recharge_amount == max(
        policy.min_recharge, int(exact_recharge_steps.quantize(Decimal(1), rounding=ROUND_HALF_UP)) * step
    )
    if account.window_usage > 0 and account.balance > 0:
        exact_runway = Decimal(account.balance) * days / account.window_usage
        assert decision.runway_days == exact_runway.quantize(Decimal("0.1"), rounding=ROUND_FLOOR)


@given(uncapped_figures())
def test_never_charges_when_auto_recharge_is_off(account: AccountFigures) -> None:
    decision = decide(replace(account, auto_recharge=False), AT)
    assert decision.action == "skip"
    assert decision.reason == "auto_recharge_off"
    assert decision.charge_amount == 0


@given(
    uncapped_figures(),
    st.none() | st.integers(min_value=0, max_value=10**9),
    st.none() | st.integers(min_value=0, max_value=10**9),
    st.none() | st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.sampled_from([Decimal(0), Decimal("7.7"), Decimal(20), Decimal("27")]),
)
def test_a_charge_stays_within_max_recharge_and_caps(
    account: AccountFigures,
    max_recharge: int | None,
    per_day: int | None,
    per_30_days: int | None,
    charged_day: int,
    charged_30_days: int,
    vat: Decimal,
) -> None:
    """The caps bound what the card is charged: the amount plus VAT (they used to bound the amount alone, so a
    20% VAT account with max_recharge 20.00 paid 24.00)."""
    step = STEPS[account.currency]
    if max_recharge is not None:
        # configured in whole minor units, at least one: with max_recharge below one minor unit decide()
        # returns action "charge" with charge_amount 0 (the spec does not say what it should do then).
        max_recharge = max(step, max_recharge // step * step)
    policy = replace(
        account.policy, max_recharge=max_recharge, max_charged_per_day=per_day, max_charged_per_30_days=per_30_days
    )
    account = replace(
        account, policy=policy, charged_last_day=charged_day, charged_last_30_days=charged_30_days, vat_percent=vat
    )
    decision = decide(account, AT)
    assert decision.inputs is not None
    assert recompute(decision.inputs) == decision  # what a recharge keeps gives the same decision again
    if decision.action != "charge":
        return
    assert decision.charge_amount % step == 0
    assert decision.charge_amount >= step
    charged = with_vat(decision.charge_amount, vat, account.currency)
    if max_recharge is not None:
        assert charged <= max_recharge
    if per_day is not None:
        assert charged_day + charged <= per_day
    if per_30_days is not None:
        assert charged_30_days + charged <= per_30_days


def test_max_recharge_bounds_the_amount_plus_vat() -> None:
    policy = Policy(max_recharge=2_000_000)  # 20.00
    decision = decide(replace(figures(policy=policy, balance=0, window_usage=30_000_000), vat_percent=Decimal(20)), AT)
    assert decision.action == "charge"
    assert decision.limited_by == "max_recharge"
    assert decision.charge_amount == 1_667_000  # 16.67 + 3.33 VAT = 20.00
    assert with_vat(decision.charge_amount, Decimal(20), "USD") == 2_000_000


def test_daily_cap_counts_what_the_card_paid() -> None:
    # 2,000 a day, with 20% VAT: 1,200 charged already (1,000 + VAT) leaves 800 for the card, 666.67 + VAT.
    policy = Policy(max_charged_per_day=200_000_000, recharge_days=14)
    account = replace(
        figures(policy=policy, balance=0, window_usage=300_000_000),
        vat_percent=Decimal(20),
        charged_last_day=120_000_000,
    )
    decision = decide(account, AT)
    assert decision.limited_by == "max_charged_per_day"
    assert decision.charge_amount == 66_667_000
    assert 120_000_000 + with_vat(decision.charge_amount, Decimal(20), "USD") <= 200_000_000


def test_a_decision_keeps_its_nominal_figures_and_recomputes() -> None:
    # 10.00 a day: nominal reserve 70.00, nominal recharge 140.00; a balance of -600.00 needs 670.00.
    policy = Policy(min_threshold=500_000, min_recharge=1_000_000)
    decision = decide(figures(policy=policy, balance=-60_000_000, window_usage=30_000_000), AT)
    assert (decision.nominal_threshold, decision.threshold) == (7_000_000, 7_000_000)
    assert (decision.nominal_recharge, decision.recharge_amount) == (14_000_000, 14_000_000)
    assert (decision.charge_amount, decision.limited_by) == (67_000_000, "shortfall")
    assert decision.inputs is not None
    stored = stored_decision(decision, AT)
    assert stored_mismatches(stored) == []
    assert stored_mismatches({**stored, "charge_amount": 14_000_000}) == [
        "charge_amount 14000000 (recomputed 67000000)"
    ]


def test_cards_resting_after_declines_skip_until_usable() -> None:
    until = AT + timedelta(hours=5)
    decision = decide(replace(figures(balance=0), cards_resting_until=until), AT)
    assert (decision.action, decision.reason, decision.next_try_at) == ("skip", "cards_resting", until)
    assert decide(replace(figures(balance=0), cards_resting_until=until), until + timedelta(seconds=1)).action == (
        "charge"
    )


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (Policy(min_recharge=2_000_000, max_recharge=1_000_000), "min_recharge 20.00 USD is above max_recharge 10.00"),
        (
            Policy(max_recharge=3_000_000, max_charged_per_day=2_000_000),
            "max_recharge 30.00 USD is above max_charged_per_day 20.00 USD",
        ),
        (
            Policy(max_charged_per_day=3_000_000, max_charged_per_30_days=2_000_000),
            "max_charged_per_day 30.00 USD is above max_charged_per_30_days 20.00 USD",
        ),
        (Policy(max_recharge=3_000_000, max_charged_per_30_days=2_000_000), "max_recharge 30.00 USD is above max_c"),
        (Policy(max_recharge=30_000), "max_recharge 0.30 USD is below the processor's minimum charge of 0.50 USD"),
        (Policy(min_threshold=-1), "min_threshold -0.00001 USD is negative"),
    ],
)
def test_contradictions_name_both_settings(policy: Policy, message: str) -> None:
    assert any(message in problem for problem in contradictions(policy, "USD")), contradictions(policy, "USD")


def test_a_coherent_policy_has_no_contradictions() -> None:
    assert contradictions(Policy(500_000, 1_000_000, 100_000_000, 200_000_000, 1_000_000_000), "USD") == []


def test_a_balance_runs_out_within_a_wait_shorter_than_its_runway_only() -> None:
    from datetime import timedelta

    from recharged.balance import runs_out_within

    assert runs_out_within(Decimal("0.1"), timedelta(hours=3))  # 2.4 hours of runway
    assert not runs_out_within(Decimal("0.1"), timedelta(hours=2, minutes=24))  # exactly enough
    assert not runs_out_within(None, timedelta(days=365))  # no usage: it never runs out
