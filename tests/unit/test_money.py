"""Money: integer Units of 1/100,000, half-up rounding to the minor unit, exact parsing."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recharged.money import (
    ceil_to_minor,
    check_currency,
    decimal_to_units_half_up,
    div_half_up,
    floor_to_minor,
    format_customer,
    format_ledger,
    fraction_to_minor,
    minor_step,
    parse_amount,
    round_to_minor,
    to_decimal,
    to_minor_units,
)

# Units in one minor unit, written out from ISO 4217 rather than taken from the module.
STEPS = {"USD": 1_000, "EUR": 1_000, "GBP": 1_000, "JPY": 100_000, "KWD": 100}
CURRENCIES = st.sampled_from(sorted(STEPS))
UNITS = st.integers(min_value=-(10**15), max_value=10**15)


# --- parsing ---------------------------------------------------------------------------------------------


def test_parse_amount_scales_to_units() -> None:
    assert parse_amount("12.34") == 1_234_000
    assert parse_amount("0.00001") == 1
    assert parse_amount("-0.01250") == -1_250
    assert parse_amount(3) == 300_000
    assert parse_amount(Decimal("1.5")) == 150_000
    assert parse_amount("  7  ") == 700_000


@pytest.mark.parametrize("text", ["0.000001", "1.123456", "-12.345671", "0.000005"])
def test_more_than_five_decimals_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="more than 5 decimal places"):
        parse_amount(text)


def test_more_than_five_decimals_as_decimal_is_an_error() -> None:
    with pytest.raises(ValueError, match="more than 5 decimal places"):
        parse_amount(Decimal("0.123455"))


@pytest.mark.parametrize("text", ["abc", "", "1,00", "NaN", "Infinity", "-inf"])
def test_non_numbers_are_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_amount(text)


def test_parse_error_names_what_was_parsed() -> None:
    with pytest.raises(ValueError, match="min_recharge"):
        parse_amount("ten", what="min_recharge")


# --- currencies ------------------------------------------------------------------------------------------


def test_check_currency_normalises_case_and_space() -> None:
    assert check_currency(" usd ") == "USD"
    assert check_currency("jpy") == "JPY"


def test_unknown_currency_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown currency"):
        check_currency("XXX")


@pytest.mark.parametrize(("currency", "step"), sorted(STEPS.items()))
def test_minor_step_matches_iso_exponent(currency: str, step: int) -> None:
    assert minor_step(currency) == step


# --- div_half_up -----------------------------------------------------------------------------------------


def test_div_half_up_rounds_half_away_from_zero() -> None:
    assert div_half_up(5, 10) == 1
    assert div_half_up(4, 10) == 0
    assert div_half_up(15, 10) == 2
    assert div_half_up(25, 10) == 3  # not banker's rounding
    assert div_half_up(-5, 10) == -1
    assert div_half_up(-4, 10) == 0
    assert div_half_up(-15, 10) == -2
    assert div_half_up(0, 7) == 0


@pytest.mark.parametrize("denominator", [0, -1])
def test_div_half_up_refuses_non_positive_denominator(denominator: int) -> None:
    with pytest.raises(ValueError):
        div_half_up(1, denominator)


@given(st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=1, max_value=10**12))
def test_div_half_up_agrees_with_decimal_round_half_up(numerator: int, denominator: int) -> None:
    # Decimal with enough precision to be exact up to the rounding digit.
    with localcontext() as ctx:
        ctx.prec = 80
        exact = Decimal(numerator) / Decimal(denominator)
        expected = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert div_half_up(numerator, denominator) == expected


# --- rounding to the minor unit --------------------------------------------------------------------------


def test_charge_rounds_half_up_to_cents() -> None:
    assert round_to_minor(1_234_500, "USD") == 1_235_000  # 12.34500 -> 12.35
    assert round_to_minor(1_234_499, "USD") == 1_234_000  # 12.34499 -> 12.34
    assert round_to_minor(1_234_000, "USD") == 1_234_000
    assert round_to_minor(500, "EUR") == 1_000  # 0.00500 -> 0.01


def test_jpy_has_no_minor_unit() -> None:
    assert round_to_minor(12_350_000, "JPY") == 12_400_000  # 123.5 -> 124
    assert round_to_minor(12_349_999, "JPY") == 12_300_000  # 123.49999 -> 123
    assert ceil_to_minor(12_300_001, "JPY") == 12_400_000
    assert floor_to_minor(12_399_999, "JPY") == 12_300_000


def test_kwd_has_three_decimals() -> None:
    assert round_to_minor(123_450, "KWD") == 123_500  # 1.23450 -> 1.235
    assert round_to_minor(123_449, "KWD") == 123_400  # 1.23449 -> 1.234


def test_negative_amounts_round_half_away_from_zero() -> None:
    assert round_to_minor(-1_234_500, "USD") == -1_235_000
    assert round_to_minor(-1_234_499, "USD") == -1_234_000
    assert round_to_minor(-500, "USD") == -1_000
    assert round_to_minor(-12_350_000, "JPY") == -12_400_000


def test_ceil_rounds_towards_positive_infinity() -> None:
    assert ceil_to_minor(1_234_001, "USD") == 1_235_000
    assert ceil_to_minor(1_234_000, "USD") == 1_234_000
    assert ceil_to_minor(-1_234_999, "USD") == -1_234_000
    assert ceil_to_minor(1, "USD") == 1_000


def test_floor_rounds_towards_negative_infinity() -> None:
    assert floor_to_minor(1_234_999, "USD") == 1_234_000
    assert floor_to_minor(-1, "USD") == -1_000
    assert floor_to_minor(0, "USD") == 0


def test_fraction_to_minor_rounds_in_one_step() -> None:
    # 6,172,498 / 5 = 1,234,499.6 Units = 12.344996 USD -> 12.34. Rounding to a Unit first would give
    # 1,234,500 (12.34500) and then 12.35: the double-rounding trap.
    assert fraction_to_minor(6_172_498, 5, "USD") == 1_234_000
    # 6,172,500 / 5 = 12.34500 exactly -> 12.35
    assert fraction_to_minor(6_172_500, 5, "USD") == 1_235_000
    assert fraction_to_minor(-6_172_500, 5, "USD") == -1_235_000


@given(UNITS, CURRENCIES)
def test_round_to_minor_is_on_a_step_and_within_half_a_step(units: int, currency: str) -> None:
    step = STEPS[currency]
    rounded = round_to_minor(units, currency)
    assert rounded % step == 0
    assert 2 * abs(rounded - units) <= step
    expected = (Decimal(units) / step).quantize(Decimal(1), rounding=ROUND_HALF_UP) * step
    assert rounded == int(expected)


@given(UNITS, CURRENCIES)
def test_ceil_and_floor_bracket_the_input_within_one_step(units: int, currency: str) -> None:
    step = STEPS[currency]
    up = ceil_to_minor(units, currency)
    down = floor_to_minor(units, currency)
    assert up % step == 0
    assert down % step == 0
    assert down <= units <= up
    assert up - units < step
    assert units - down < step


# --- conversions and formatting --------------------------------------------------------------------------


def test_to_minor_units_gives_cents() -> None:
    assert to_minor_units(1_235_000, "USD") == 1_235
    assert to_minor_units(12_400_000, "JPY") == 124
    assert to_minor_units(123_500, "KWD") == 1_235


def test_to_minor_units_refuses_a_fraction_of_a_cent() -> None:
    with pytest.raises(ValueError, match="not a whole number of minor units"):
        to_minor_units(1_234_500, "USD")


def test_format_ledger_always_shows_five_decimals() -> None:
    assert format_ledger(-1_250) == "-0.01250"
    assert format_ledger(0) == "0.00000"
    assert format_ledger(1_234_500) == "12.34500"
    assert format_ledger(1) == "0.00001"


def test_to_decimal_is_exact() -> None:
    assert to_decimal(1_234_567) == Decimal("12.34567")
    assert str(to_decimal(100_000)) == "1.00000"


def test_decimal_to_units_half_up() -> None:
    assert decimal_to_units_half_up(Decimal("0.000015")) == 2
    assert decimal_to_units_half_up(Decimal("0.000014999")) == 1
    assert decimal_to_units_half_up(Decimal("-0.000015")) == -2


def test_format_customer_rounds_half_up_to_the_minor_unit() -> None:
    assert format_customer(1_234_500, "USD") == "$12.35"
    assert format_customer(123_456_789_000, "USD") == "$1,234,567.89"
    assert format_customer(-1_234_500, "EUR") == "-€12.35"
    assert format_customer(12_350_000, "JPY") == "¥124"
    assert format_customer(123_450, "KWD") == "1.235 KWD"


def test_format_customer_has_no_negative_zero() -> None:
    assert format_customer(-400, "USD") == "$0.00"


@given(UNITS)
def test_ledger_format_round_trips(units: int) -> None:
    assert parse_amount(format_ledger(units)) == units
