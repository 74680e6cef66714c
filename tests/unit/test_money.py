"""Money: integer Units of 1/100,000, half-up rounding to the display and charge steps, exact parsing; the table
of currencies (ISO 4217 exponents for what customers read, Stripe's rules for what is charged: the API exponent
and step, the minimum and maximum) and the processor's limits in the recharge decision."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recharged.balance import AccountFigures, Policy, decide
from recharged.money import CURRENCIES as TABLE
from recharged.money import (
    MINOR_EXPONENT,
    ceil_to_charge,
    charge_step,
    check_charge,
    check_currency,
    decimal_to_units_half_up,
    display_step,
    div_half_up,
    floor_to_charge,
    format_customer,
    format_ledger,
    fraction_to_charge,
    from_minor_units,
    largest_net_within,
    parse_amount,
    percent_of,
    round_to_charge,
    round_to_display,
    smallest_net_reaching,
    to_decimal,
    to_minor_units,
    with_vat,
)

# Units in the smallest chargeable amount, written out from Stripe's rules rather than taken from the module.
STEPS = {"USD": 1_000, "EUR": 1_000, "GBP": 1_000, "JPY": 100_000, "KWD": 1_000, "ISK": 100_000}
# Units in one ISO 4217 minor unit (what customers read).
DISPLAY_STEPS = {"USD": 1_000, "EUR": 1_000, "GBP": 1_000, "JPY": 100_000, "KWD": 100, "ISK": 100_000}
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
    with pytest.raises(ValueError, match=r"is not a (decimal|finite) number"):
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


@pytest.mark.parametrize(("currency", "step"), sorted(DISPLAY_STEPS.items()))
def test_display_step_matches_iso_exponent(currency: str, step: int) -> None:
    assert display_step(currency) == step


@pytest.mark.parametrize(("currency", "step"), sorted(STEPS.items()))
def test_charge_step_is_the_smallest_chargeable_amount(currency: str, step: int) -> None:
    assert charge_step(currency) == step


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
    with pytest.raises(ValueError, match="denominator must be positive"):
        div_half_up(1, denominator)


@given(st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=1, max_value=10**12))
def test_div_half_up_agrees_with_decimal_round_half_up(numerator: int, denominator: int) -> None:
    # Decimal with enough precision to be exact up to the rounding digit.
    with localcontext() as ctx:
        ctx.prec = 80
        exact = Decimal(numerator) / Decimal(denominator)
        expected = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert div_half_up(numerator, denominator) == expected


# --- rounding to the charge step --------------------------------------------------------------------------


def test_charge_rounds_half_up_to_cents() -> None:
    assert round_to_charge(1_234_500, "USD") == 1_235_000  # 12.34500 -> 12.35
    assert round_to_charge(1_234_499, "USD") == 1_234_000  # 12.34499 -> 12.34
    assert round_to_charge(1_234_000, "USD") == 1_234_000
    assert round_to_charge(500, "EUR") == 1_000  # 0.00500 -> 0.01


def test_jpy_has_no_minor_unit() -> None:
    assert round_to_charge(12_350_000, "JPY") == 12_400_000  # 123.5 -> 124
    assert round_to_charge(12_349_999, "JPY") == 12_300_000  # 123.49999 -> 123
    assert ceil_to_charge(12_300_001, "JPY") == 12_400_000
    assert floor_to_charge(12_399_999, "JPY") == 12_300_000


def test_kwd_shows_three_decimals_but_charges_whole_hundredths() -> None:
    assert round_to_display(123_450, "KWD") == 123_500  # 1.23450 -> 1.235
    assert round_to_display(123_449, "KWD") == 123_400  # 1.23449 -> 1.234
    assert round_to_charge(123_450, "KWD") == 123_000  # 1.2345 -> 1.230
    assert round_to_charge(123_500, "KWD") == 124_000  # 1.235 -> 1.240: half-up on the 0.010 step


def test_negative_amounts_round_half_away_from_zero() -> None:
    assert round_to_charge(-1_234_500, "USD") == -1_235_000
    assert round_to_charge(-1_234_499, "USD") == -1_234_000
    assert round_to_charge(-500, "USD") == -1_000
    assert round_to_charge(-12_350_000, "JPY") == -12_400_000
    assert round_to_display(-12_350_000, "JPY") == -12_400_000


def test_ceil_rounds_towards_positive_infinity() -> None:
    assert ceil_to_charge(1_234_001, "USD") == 1_235_000
    assert ceil_to_charge(1_234_000, "USD") == 1_234_000
    assert ceil_to_charge(-1_234_999, "USD") == -1_234_000
    assert ceil_to_charge(1, "USD") == 1_000


def test_floor_rounds_towards_negative_infinity() -> None:
    assert floor_to_charge(1_234_999, "USD") == 1_234_000
    assert floor_to_charge(-1, "USD") == -1_000
    assert floor_to_charge(0, "USD") == 0


def test_fraction_to_charge_rounds_in_one_step() -> None:
    # 6,172,498 / 5 = 1,234,499.6 Units = 12.344996 USD -> 12.34. Rounding to a Unit first would give
    # 1,234,500 (12.34500) and then 12.35: the double-rounding trap.
    assert fraction_to_charge(6_172_498, 5, "USD") == 1_234_000
    # 6,172,500 / 5 = 12.34500 exactly -> 12.35
    assert fraction_to_charge(6_172_500, 5, "USD") == 1_235_000
    assert fraction_to_charge(-6_172_500, 5, "USD") == -1_235_000


@given(UNITS, CURRENCIES)
def test_round_to_charge_is_on_a_step_and_within_half_a_step(units: int, currency: str) -> None:
    step = STEPS[currency]
    rounded = round_to_charge(units, currency)
    assert rounded % step == 0
    assert 2 * abs(rounded - units) <= step
    expected = (Decimal(units) / step).quantize(Decimal(1), rounding=ROUND_HALF_UP) * step
    assert rounded == int(expected)


@given(UNITS, CURRENCIES)
def test_round_to_display_is_on_an_iso_minor_unit(units: int, currency: str) -> None:
    step = DISPLAY_STEPS[currency]
    rounded = round_to_display(units, currency)
    expected = (Decimal(units) / step).quantize(Decimal(1), rounding=ROUND_HALF_UP) * step
    assert rounded == int(expected)


@given(UNITS, CURRENCIES)
def test_ceil_and_floor_bracket_the_input_within_one_step(units: int, currency: str) -> None:
    step = STEPS[currency]
    up = ceil_to_charge(units, currency)
    down = floor_to_charge(units, currency)
    assert up % step == 0
    assert down % step == 0
    assert down <= units <= up
    assert up - units < step
    assert units - down < step


# --- conversions and formatting --------------------------------------------------------------------------


def test_to_minor_units_gives_the_api_amount() -> None:
    assert to_minor_units(1_235_000, "USD") == 1_235
    assert to_minor_units(12_400_000, "JPY") == 124
    assert to_minor_units(123_000, "KWD") == 1_230
    assert to_minor_units(500_000_000, "ISK") == 500_000  # 5,000 ISK, sent as a two-decimal amount


def test_to_minor_units_refuses_a_fraction_of_a_cent() -> None:
    with pytest.raises(ValueError, match=r"0\.01245 USD is not a whole multiple of 0\.01 USD"):
        to_minor_units(1_245, "USD")


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
    assert format_customer(123_450, "KWD") == "1.235 KWD"  # the ISO exponent, not the 0.010 charge step
    assert format_customer(512_000_000, "ISK") == "5,120 ISK"


def test_format_customer_has_no_negative_zero() -> None:
    assert format_customer(-400, "USD") == "$0.00"


@given(UNITS)
def test_ledger_format_round_trips(units: int) -> None:
    assert parse_amount(format_ledger(units)) == units


PACKAGE = Path(__file__).resolve().parents[2] / "recharged"
AT = datetime(2026, 11, 22, 15, 30, tzinfo=UTC)
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)

# Written out from ISO 4217 and docs.stripe.com/currencies rather than taken from the module.
ACCEPTED_BEFORE = (
    "USD EUR GBP CAD AUD NZD CHF SEK NOK DKK PLN CZK HUF RON MXN BRL INR SGD HKD ZAR ILS AED SAR TRY PHP THB MYR "
    "IDR TWD CNY JPY KRW VND CLP ISK UGX BHD KWD JOD OMR TND"
).split()
STRIPE_ZERO_DECIMAL = "BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF VND VUV XAF XOF XPF".split()
THREE_DECIMAL = "BHD JOD KWD OMR TND".split()
MINIMUMS = {  # major units
    "USD": "0.50", "AED": "2.00", "AUD": "0.50", "BRL": "0.50", "CAD": "0.50", "CHF": "0.50", "CZK": "15.00",
    "DKK": "2.50", "EUR": "0.50", "GBP": "0.30", "HKD": "4.00", "HUF": "175.00", "INR": "0.50", "JPY": "50",
    "MXN": "10", "MYR": "2.00", "NOK": "3.00", "NZD": "0.50", "PLN": "2.00", "RON": "2.00", "SEK": "3.00",
    "SGD": "0.50", "THB": "10",
}  # fmt: skip

ALL = st.sampled_from(sorted(TABLE))
VAT = st.sampled_from([Decimal(0), Decimal(5), Decimal("8.875"), Decimal(20), Decimal(25), Decimal("27.5")])


def major(amount: str) -> int:
    """An amount in currency units, as Units."""
    return int(Decimal(amount) * 100_000)


# --- the table of currencies -----------------------------------------------------------------------------


def test_every_currency_accepted_before_is_still_accepted_with_its_iso_exponent() -> None:
    for code in ACCEPTED_BEFORE:
        assert check_currency(code.lower()) == code
    assert all(MINOR_EXPONENT[c] == 2 for c in ACCEPTED_BEFORE[:30])
    assert all(MINOR_EXPONENT[c] == 0 for c in "JPY KRW VND CLP ISK UGX".split())
    assert all(MINOR_EXPONENT[c] == 3 for c in THREE_DECIMAL)


def test_stripe_zero_decimal_currencies_are_accepted_and_charged_in_whole_units() -> None:
    for code in STRIPE_ZERO_DECIMAL:
        assert TABLE[code].api_exponent == 0
        assert charge_step(code) == 100_000
    assert MINOR_EXPONENT["MGA"] == 2  # ISO gives the ariary two decimals; Stripe charges whole ariary
    assert format_customer(major("1234.5"), "MGA") == "1,234.50 MGA"


def test_unknown_currency_keeps_its_message() -> None:
    with pytest.raises(ValueError, match=r"unknown currency 'XXX'; use one of AED, AUD, BHD, BIF, "):
        check_currency("XXX")


@pytest.mark.parametrize("code", ["ISK", "UGX"])
def test_isk_and_ugx_are_whole_units_sent_as_two_decimal_amounts(code: str) -> None:
    info = TABLE[code]
    assert (info.exponent, info.api_exponent, info.api_step) == (0, 2, 100)
    assert to_minor_units(major("5000"), code) == 500_000
    assert to_minor_units(major("5"), code) == 500
    assert from_minor_units(500, code) == major("5")
    assert charge_step(code) == display_step(code) == major("1")
    assert format_customer(major("5000"), code) == f"5,000 {code}"
    with pytest.raises(ValueError, match=rf"5.5 {code} is not a whole multiple of 1 {code}"):
        to_minor_units(major("5.5"), code)
    with pytest.raises(ValueError, match="550 is not a multiple of 100"):
        from_minor_units(550, code)


def test_jpy_is_sent_in_whole_yen() -> None:
    assert to_minor_units(major("5000"), "JPY") == 5_000
    assert from_minor_units(5_000, "JPY") == major("5000")


@pytest.mark.parametrize("code", THREE_DECIMAL)
def test_three_decimal_currencies_charge_multiples_of_ten(code: str) -> None:
    info = TABLE[code]
    assert (info.exponent, info.api_exponent, info.api_step) == (3, 3, 10)
    assert display_step(code) == 100  # customers read 0.001
    assert charge_step(code) == 1_000  # but 0.010 is the smallest charge
    # 5.124 rounds half-up on the 0.010 step: 5.120; 5.125 -> 5.130
    assert round_to_charge(major("5.124"), code) == major("5.120")
    assert round_to_charge(major("5.125"), code) == major("5.130")
    assert to_minor_units(major("5.120"), code) == 5_120
    with pytest.raises(ValueError, match=rf"1.234 {code} is not a whole multiple of 0.010 {code}"):
        to_minor_units(major("1.234"), code)
    with pytest.raises(ValueError, match="5125 is not a multiple of 10"):
        from_minor_units(5_125, code)


@pytest.mark.parametrize("code", ["HUF", "TWD"])
def test_huf_and_twd_charge_as_ordinary_two_decimal_currencies(code: str) -> None:
    info = TABLE[code]
    assert (info.exponent, info.api_exponent, info.api_step) == (2, 2, 1)
    assert to_minor_units(major("175.55"), code) == 17_555  # the divisible-by-100 rule is for payouts only


def test_minimums_are_stripes() -> None:
    documented = {code: c.minimum_units for code, c in TABLE.items() if c.minimum_units is not None}
    assert documented == {code: major(amount) for code, amount in MINIMUMS.items()}
    assert TABLE["HUF"].minimum == 17_500
    assert TABLE["JPY"].minimum == 50


def test_maximum_is_eight_digits_of_the_api_amount_on_its_step() -> None:
    assert all(c.maximum == 99_999_999 for c in TABLE.values())
    assert TABLE["USD"].maximum_units == major("999999.99")
    assert TABLE["JPY"].maximum_units == major("99999999")
    assert TABLE["KWD"].maximum_units == major("99999.990")
    assert TABLE["ISK"].maximum_units == major("999999")


@given(ALL, st.integers(min_value=0, max_value=10**8))
def test_an_api_amount_on_its_step_round_trips(code: str, multiple: int) -> None:
    amount = multiple * TABLE[code].api_step
    assert to_minor_units(from_minor_units(amount, code), code) == amount


@given(ALL, st.integers(min_value=-(10**14), max_value=10**14))
def test_a_charge_on_its_step_round_trips(code: str, multiple: int) -> None:
    charged = multiple * charge_step(code)
    assert from_minor_units(to_minor_units(charged, code), code) == charged


@given(ALL, st.integers(min_value=-(10**14), max_value=10**14), st.integers(min_value=1, max_value=90), VAT)
def test_every_amount_the_rounding_functions_charge_is_on_the_api_step(
    code: str, value: int, days: int, vat: Decimal
) -> None:
    for charged in (
        round_to_charge(value, code),
        ceil_to_charge(value, code),
        floor_to_charge(value, code),
        fraction_to_charge(value, days, code),
        percent_of(value, vat, code),
        with_vat(round_to_charge(value, code), vat, code),
    ):
        assert to_minor_units(charged, code) % TABLE[code].api_step == 0  # and it did not raise


@given(ALL)
def test_a_charge_step_shows_exactly_to_the_customer(code: str) -> None:
    assert charge_step(code) % display_step(code) == 0


# --- the processor's limits ------------------------------------------------------------------------------


@given(ALL, VAT, st.integers(min_value=1, max_value=10**12))
def test_smallest_net_reaching_a_total_is_the_least_on_the_step(code: str, vat: Decimal, total: int) -> None:
    net = smallest_net_reaching(total, vat, code)
    step = charge_step(code)
    assert net % step == 0
    assert net >= step
    assert with_vat(net, vat, code) >= total
    assert net == step or with_vat(net - step, vat, code) < total


@given(ALL, VAT, st.integers(min_value=0, max_value=10**14))
def test_largest_net_within_a_total_is_the_most_on_the_step(code: str, vat: Decimal, total: int) -> None:
    net = largest_net_within(total, vat, code)
    step = charge_step(code)
    assert net % step == 0
    assert net >= 0
    assert net == 0 or with_vat(net, vat, code) <= total
    assert with_vat(net + step, vat, code) > total


def test_smallest_net_reaching_the_usd_minimum_with_vat() -> None:
    assert smallest_net_reaching(major("0.50"), Decimal(20), "USD") == major("0.42")  # 0.42 + 0.08 = 0.50
    assert smallest_net_reaching(major("0.50"), Decimal(0), "USD") == major("0.50")
    # 25%: 0.40 + 0.10 = 0.50 exactly
    assert smallest_net_reaching(major("0.50"), Decimal(25), "USD") == major("0.40")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_a_top_up_below_the_minimum_names_what_is_charged_and_the_limit() -> None:
    message = "top-up of 0.10 USD (0.12 USD with VAT) is below Stripe's minimum charge of 0.50 USD"
    with pytest.raises(ValueError, match=exactly(message)):
        check_charge(major("0.10"), major("0.02"), "USD", what="top-up")
    with pytest.raises(ValueError, match=exactly("top-up of 40 JPY is below Stripe's minimum charge of 50 JPY")):
        check_charge(major("40"), 0, "JPY", what="top-up")


def test_a_top_up_above_the_maximum_names_the_limit() -> None:
    message = "top-up of 900000.00 USD (1080000.00 USD with VAT) is above Stripe's maximum charge of 999999.99 USD"
    with pytest.raises(ValueError, match=exactly(message)):
        check_charge(major("900000"), major("180000"), "USD", what="top-up")


def test_a_top_up_off_the_charge_step_or_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^top-up of 1.234 KWD is not a whole multiple of 0.010 KWD, the smallest"):
        check_charge(major("1.234"), 0, "KWD", what="top-up")
    with pytest.raises(ValueError, match=r"^top-up of 0.105 USD is not a whole multiple of 0.01 USD"):
        check_charge(major("0.105"), 0, "USD", what="top-up")
    with pytest.raises(ValueError, match=r"^top-up of 0.00 USD must be positive"):
        check_charge(0, 0, "USD", what="top-up")


def test_at_the_limits_a_charge_is_allowed() -> None:
    check_charge(major("0.42"), major("0.08"), "USD")
    check_charge(major("999999.99"), 0, "USD")
    check_charge(major("0.01"), 0, "ZAR")  # no documented minimum: only Stripe can refuse it (amount_too_small)


# --- the processor's limits in the recharge decision ------------------------------------------------------


def account(
    currency: str = "USD", *, vat: str = "20", policy: Policy | None = None, balance: int = 0, usage: int = 30_000
) -> AccountFigures:
    """30 days of `usage` Units in total; by default 0.01 a day in USD: a 0.14 recharge, below Stripe's 0.50."""
    return AccountFigures(
        currency=currency,
        balance=balance,
        created_at=LONG_AGO,
        first_usage_at=None,
        window_usage=usage,
        auto_recharge=True,
        policy=policy or Policy(),
        vat_percent=Decimal(vat),
    )


def test_a_recharge_below_the_minimum_is_raised_to_the_least_that_reaches_it() -> None:
    decision = decide(account(), AT)
    assert decision.recharge_amount == major("0.14")
    assert decision.action == "charge"
    assert decision.charge_amount == major("0.42")  # + 20% VAT = 0.50
    assert decision.limited_by == "processor_minimum"


def test_jpy_and_huf_recharges_are_raised_to_their_minimums() -> None:
    jpy = decide(account("JPY", vat="10", usage=major("300")), AT)  # 10 yen a day: 140 yen, 154 with VAT
    assert (jpy.charge_amount, jpy.limited_by) == (major("140"), None)
    jpy = decide(account("JPY", vat="10", usage=major("60")), AT)  # 2 yen a day: 28 yen
    assert (jpy.charge_amount, jpy.limited_by) == (major("45"), "processor_minimum")  # 45 + 5 = 50; 44 + 4 = 48
    huf = decide(account("HUF", vat="27", policy=Policy(min_recharge=major("10"))), AT)
    assert (huf.charge_amount, huf.limited_by) == (major("137.80"), "processor_minimum")  # + 37.21 = 175.01


def test_a_ceiling_below_the_minimum_means_nothing_is_charged() -> None:
    capped = decide(account(policy=Policy(max_recharge=major("0.30"))), AT)
    assert (capped.action, capped.reason, capped.limited_by) == ("skip", "cap_reached", "max_recharge")
    # The caps bound what the card pays: 0.42 + 20% VAT = 0.50, Stripe's minimum, needs a cap of 0.50.
    daily = decide(account(policy=Policy(max_charged_per_day=major("0.49"))), AT)
    assert (daily.action, daily.reason, daily.limited_by) == ("skip", "cap_reached", "max_charged_per_day")
    room = decide(account(policy=Policy(max_charged_per_day=major("0.50"))), AT)
    assert (room.action, room.charge_amount, room.limited_by) == ("charge", major("0.42"), "processor_minimum")


def test_a_charge_above_the_maximum_is_capped_at_it() -> None:
    decision = decide(account(balance=-major("2000000")), AT)  # a shortfall of 2,000,000 USD and no ceiling
    assert decision.action == "charge"
    assert decision.limited_by == "processor_maximum"
    assert decision.charge_amount == major("833333.32")  # + 20% VAT = 999,999.98; 833,333.33 would be 1,000,000
    assert with_vat(decision.charge_amount, Decimal(20), "USD") <= major("999999.99")


@given(ALL, VAT, st.integers(min_value=-(10**13), max_value=10**6), st.integers(min_value=0, max_value=10**10))
def test_every_automatic_charge_is_within_the_processors_limits(
    code: str, vat: Decimal, balance: int, usage: int
) -> None:
    decision = decide(account(code, vat=str(vat), balance=balance, usage=usage), AT)
    if decision.action != "charge":
        return
    info = TABLE[code]
    total = with_vat(decision.charge_amount, vat, code)
    to_minor_units(total, code)  # on the API step
    assert total <= info.maximum_units
    assert info.minimum_units is None or total >= info.minimum_units


# --- one table -------------------------------------------------------------------------------------------


def test_no_other_module_computes_a_power_of_ten_for_a_currency() -> None:
    """Exponents live in money.py; the Stripe-compatible test server (testing/) plays Stripe's side."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "testing" or relative == Path("money.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            power = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
            power = power and isinstance(node.left, ast.Constant) and node.left.value == 10
            scaled = isinstance(node, ast.Attribute) and node.attr == "scaleb"
            if power or scaled:
                found.append(f"recharged/{relative}:{node.lineno}")
    assert found == []
