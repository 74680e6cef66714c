"""Rating: billable time from the moment of dialing, increments, minimums, connect fees, count-based kinds."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recharged.money import parse_amount
from recharged.rating import (
    CountRate,
    Rated,
    TimeRate,
    billable_seconds,
    longest_call,
    rate_count,
    rate_event,
    rate_time,
)

PER_MINUTE = TimeRate(price_per_minute=1_000)  # 0.01 per minute, billed per started minute
PER_SECOND = TimeRate(price_per_minute=6_000, increment_seconds=1)  # 0.06 per minute, billed per second
SIX_SECOND = TimeRate(price_per_minute=6_000, increment_seconds=6)


# --- billable time ---------------------------------------------------------------------------------------


def test_70_second_call_bills_two_minutes() -> None:
    assert billable_seconds(70, PER_MINUTE) == 120
    assert rate_time(70, PER_MINUTE) == Rated(120, 2_000)


def test_61_seconds_bill_two_minutes() -> None:
    assert rate_time(61, PER_MINUTE) == Rated(120, 2_000)


def test_60_seconds_bill_one_minute() -> None:
    assert rate_time(60, PER_MINUTE) == Rated(60, 1_000)


def test_1_second_on_per_minute_plan_bills_one_minute() -> None:
    assert rate_time(1, PER_MINUTE) == Rated(60, 1_000)


def test_83_seconds_per_second_bill_83_seconds() -> None:
    # 0.06/min = 0.001/s; 83 s -> 0.083 = 8,300 Units
    assert rate_time(83, PER_SECOND) == Rated(83, 8_300)


def test_zero_second_leg_costs_nothing() -> None:
    rate = TimeRate(price_per_minute=1_000, minimum_seconds=60, connect_fee=5_000)
    assert billable_seconds(0, rate) == 0
    assert rate_time(0, rate) == Rated(0, 0)


def test_minimum_duration_applies() -> None:
    rate = TimeRate(price_per_minute=6_000, increment_seconds=6, minimum_seconds=30)
    assert billable_seconds(1, rate) == 30
    assert billable_seconds(30, rate) == 30
    assert billable_seconds(31, rate) == 36  # past the minimum, increments resume
    assert rate_time(10, rate) == Rated(30, 3_000)  # 0.001/s x 30 s


def test_minimum_is_rounded_up_to_the_increment() -> None:
    rate = TimeRate(price_per_minute=1_000, increment_seconds=60, minimum_seconds=30)
    assert billable_seconds(10, rate) == 60


def test_six_second_increments() -> None:
    assert billable_seconds(1, SIX_SECOND) == 6
    assert billable_seconds(12, SIX_SECOND) == 12
    assert billable_seconds(13, SIX_SECOND) == 18
    assert rate_time(13, SIX_SECOND) == Rated(18, 1_800)


def test_connect_fee_added_once() -> None:
    rate = TimeRate(price_per_minute=1_200, connect_fee=2_500)
    # 125 s -> 3 minutes x 1,200 = 3,600, plus one connect fee of 2,500 (not one per minute)
    assert rate_time(125, rate) == Rated(180, 6_100)


def test_cost_rounds_half_up_to_a_unit() -> None:
    # 0.01234/min for 45 s per-second: 0.01234 x 45 / 60 = 0.009255 -> exactly half a Unit past 925
    rate = TimeRate(price_per_minute=1_234, increment_seconds=1)
    exact = Decimal("0.01234") * 45 / 60
    assert exact == Decimal("0.009255")
    assert rate_time(45, rate).cost == 926


def test_cost_below_half_a_unit_rounds_down() -> None:
    # 0.00001/min for 29 s per-second: 29/60 of a Unit -> 0 Units; 30 s: exactly half -> 1 Unit
    rate = TimeRate(price_per_minute=1, increment_seconds=1)
    assert rate_time(29, rate).cost == 0
    assert rate_time(30, rate).cost == 1


def test_negative_duration_is_an_error() -> None:
    with pytest.raises(ValueError, match="duration_seconds must not be negative"):
        billable_seconds(-1, PER_MINUTE)


# --- count-based kinds -----------------------------------------------------------------------------------


def test_count_cost_is_exact_price_times_quantity() -> None:
    rate = CountRate(price_per_unit=750, unit="segment")  # 0.0075 per segment
    assert rate_count(3, rate) == Rated(3, 2_250)
    assert rate_count(0, rate) == Rated(0, 0)


def test_negative_quantity_is_an_error() -> None:
    with pytest.raises(ValueError, match="quantity must not be negative"):
        rate_count(-1, CountRate(price_per_unit=750))


def test_rate_event_dispatches_on_measure() -> None:
    assert rate_event(PER_MINUTE, duration_seconds=70, quantity=None) == Rated(120, 2_000)
    assert rate_event(CountRate(price_per_unit=400), duration_seconds=None, quantity=5) == Rated(5, 2_000)


def test_rate_event_needs_the_field_of_its_measure() -> None:
    with pytest.raises(ValueError, match="duration_seconds"):
        rate_event(PER_MINUTE, duration_seconds=None, quantity=3)
    with pytest.raises(ValueError, match="quantity"):
        rate_event(CountRate(price_per_unit=400), duration_seconds=60, quantity=None)


def test_rate_measures() -> None:
    assert PER_MINUTE.measure == "time"
    assert CountRate(price_per_unit=1).measure == "count"


# --- properties ------------------------------------------------------------------------------------------

INCREMENTS = st.sampled_from([1, 6, 30, 60])
TIME_RATES = st.builds(
    TimeRate,
    price_per_minute=st.integers(min_value=0, max_value=10**7),
    increment_seconds=INCREMENTS,
    minimum_seconds=st.integers(min_value=0, max_value=300),
    connect_fee=st.integers(min_value=0, max_value=10**6),
)
DURATIONS = st.integers(min_value=0, max_value=100_000)


@given(DURATIONS, TIME_RATES)
def test_billable_seconds_bounds(duration: int, rate: TimeRate) -> None:
    billed = billable_seconds(duration, rate)
    assert billed >= duration
    assert billed % rate.increment_seconds == 0
    assert billed < max(duration, rate.minimum_seconds) + rate.increment_seconds
    if duration > 0:
        assert billed >= rate.minimum_seconds


@given(DURATIONS, DURATIONS, TIME_RATES)
def test_cost_never_decreases_as_duration_grows(a: int, b: int, rate: TimeRate) -> None:
    short, long = sorted((a, b))
    assert rate_time(short, rate).cost <= rate_time(long, rate).cost


@given(st.integers(min_value=1, max_value=100_000), TIME_RATES)
def test_cost_matches_decimal_formula(duration: int, rate: TimeRate) -> None:
    billed = billable_seconds(duration, rate)
    exact = Decimal(rate.price_per_minute) * billed / 60
    expected = rate.connect_fee + int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert rate_time(duration, rate) == Rated(billed, expected)


def test_longest_call_is_the_longest_duration_the_balance_covers():
    rate = TimeRate(price_per_minute=parse_amount("0.02"), increment_seconds=60)
    # $0.05 buys two whole minutes at 2 cents; a 121-second call bills three.
    assert longest_call(parse_amount("0.05"), rate) == 120
    assert rate_time(120, rate).cost <= parse_amount("0.05") < rate_time(121, rate).cost


def test_longest_call_counts_the_connect_fee_and_minimum():
    rate = TimeRate(
        price_per_minute=parse_amount("0.06"),
        increment_seconds=6,
        minimum_seconds=30,
        connect_fee=parse_amount("0.01"),
    )
    assert longest_call(parse_amount("0.0099"), rate) == 0  # not even the connect fee
    assert longest_call(parse_amount("0.04"), rate) == 30  # 0.01 + 30 s at 0.001/s
    assert longest_call(parse_amount("0.0459"), rate) == 30
    assert longest_call(parse_amount("0.046"), rate) == 36


def test_longest_call_is_zero_without_balance_and_capped_for_a_free_rate():
    rate = TimeRate(price_per_minute=parse_amount("0.02"))
    assert longest_call(0, rate) == 0
    assert longest_call(-5, rate) == 0
    assert longest_call(parse_amount("1"), TimeRate(price_per_minute=0), limit_seconds=3600) == 3600


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from([1, 6, 30, 60]), st.integers(0, 120))
def test_longest_call_never_disagrees_with_the_rater(balance, increment, minimum):
    rate = TimeRate(price_per_minute=1234, increment_seconds=increment, minimum_seconds=minimum, connect_fee=7)
    seconds = longest_call(balance, rate, limit_seconds=10**6)
    if seconds < 10**6:
        assert rate_time(seconds + 1, rate).cost > balance
    if seconds:
        assert rate_time(seconds, rate).cost <= balance
