"""Money: integers of 1/100,000 of the currency unit, and every rounding rule recharged has.

Amounts are plain `int`s of units (`Units`): 1 USD = 100,000 units, the 5-decimal precision that usage
billing works in. Nothing here touches a float. Rounding happens only in this module, always explicitly:

- rating rounds a cost half-up to the unit (`div_half_up`);
- a charge is rounded half-up to the currency's minor unit (`round_to_minor`), except the part of a charge
  that covers a shortfall, which rounds up (`ceil_to_minor`) so the balance really reaches the threshold.

"Half-up" means half away from zero, Decimal's ROUND_HALF_UP.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TypeAlias

Units: TypeAlias = int

SCALE = 100_000
PLACES = 5
_QUANTUM = Decimal(1).scaleb(-PLACES)
MAX_UNITS = 2**63 - 1  # what a BIGINT column holds

# ISO 4217 minor-unit exponents of the currencies recharged accepts.
MINOR_EXPONENT: dict[str, int] = {
    **dict.fromkeys(
        "USD EUR GBP CAD AUD NZD CHF SEK NOK DKK PLN CZK HUF RON MXN BRL INR SGD HKD ZAR ILS AED SAR TRY "
        "PHP THB MYR IDR TWD CNY".split(),
        2,
    ),
    **dict.fromkeys("JPY KRW VND CLP ISK UGX".split(), 0),
    **dict.fromkeys("BHD KWD JOD OMR TND".split(), 3),
}
SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}


def check_currency(code: str) -> str:
    """The upper-case ISO code, or ValueError listing what is accepted."""
    upper = code.strip().upper()
    if upper not in MINOR_EXPONENT:
        raise ValueError(f"unknown currency {code!r}; use one of {', '.join(sorted(MINOR_EXPONENT))}")
    return upper


def minor_step(currency: str) -> Units:
    """Units in one minor unit of `currency` (1,000 for cents, 100,000 for yen)."""
    step: int = 10 ** (PLACES - MINOR_EXPONENT[currency])
    return step


def parse_amount(value: str | int | Decimal, *, what: str = "amount") -> Units:
    """An exact decimal amount in currency units -> Units.

    More than 5 decimal places is an error, not a silent rounding: input money is never rounded.
    """
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{what} {value!r} is not a decimal number") from None
    if not amount.is_finite():
        raise ValueError(f"{what} {value!r} is not a finite number")
    if amount and amount.adjusted() > 18 - PLACES:  # checked before scaling: 1E+999999999 would not fit
        raise ValueError(f"{what} {value!r} is too large")
    # Compared exactly: scaling first would round past the context's 28 digits and let 1.000...0001 through.
    if amount != amount.quantize(_QUANTUM):
        raise ValueError(f"{what} {value!r} has more than {PLACES} decimal places")
    units = int(amount.scaleb(PLACES))
    if abs(units) > MAX_UNITS:
        raise ValueError(f"{what} {value!r} is too large")
    return units


def div_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half away from zero, in exact integer arithmetic."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    sign = -1 if numerator < 0 else 1
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder >= denominator:
        quotient += 1
    return sign * quotient


def decimal_to_units_half_up(value: Decimal) -> Units:
    """A Decimal in currency units -> Units, rounded half-up to 1/100,000."""
    return int(value.quantize(_QUANTUM, rounding=ROUND_HALF_UP).scaleb(PLACES))


def round_to_minor(units: Units, currency: str) -> Units:
    """Round half-up to the currency's minor unit (a charge): 12.34500 USD -> 12.35000."""
    step = minor_step(currency)
    return div_half_up(units, step) * step


def ceil_to_minor(units: Units, currency: str) -> Units:
    """Round up (towards +infinity) to the currency's minor unit."""
    step = minor_step(currency)
    return -((-units) // step) * step


def to_minor_units(units: Units, currency: str) -> int:
    """Units that sit exactly on a minor unit -> the processor's integer amount (cents)."""
    step = minor_step(currency)
    if units % step:
        raise ValueError(f"{format_ledger(units)} {currency} is not a whole number of minor units")
    return units // step


def from_minor_units(amount: int, currency: str) -> Units:
    """The processor's integer amount (cents) -> Units; the inverse of `to_minor_units`."""
    return amount * minor_step(currency)


def to_decimal(units: Units) -> Decimal:
    """Units -> an exact Decimal with 5 places (for JSON and arithmetic at the edges)."""
    return Decimal(units).scaleb(-PLACES).quantize(_QUANTUM)


def format_ledger(units: Units) -> str:
    """Ledger form: always 5 decimals, e.g. '-0.01250'."""
    return f"{to_decimal(units):.{PLACES}f}"


def format_customer(units: Units, currency: str) -> str:
    """What a customer reads: rounded half-up to the minor unit, with the currency, e.g. '$12.35'."""
    exponent = MINOR_EXPONENT[currency]
    rounded = Decimal(round_to_minor(units, currency)).scaleb(-PLACES)
    text = f"{abs(rounded):,.{exponent}f}"
    sign = "-" if units < 0 and rounded != 0 else ""
    symbol = SYMBOLS.get(currency)
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency}"


def floor_to_minor(units: Units, currency: str) -> Units:
    """Round down (towards -infinity) to the currency's minor unit: used for what a cap still allows."""
    step = minor_step(currency)
    return (units // step) * step


def fraction_to_minor(numerator: int, denominator: int, currency: str) -> Units:
    """(numerator / denominator) Units rounded half-up to the minor unit in one step (no double rounding)."""
    step = minor_step(currency)
    return div_half_up(numerator, denominator * step) * step


def percent_of(units: Units, percent: Decimal, currency: str) -> Units:
    """`percent`% of an amount, rounded half-up to the currency's minor unit (VAT on a charge)."""
    step = minor_step(currency)
    exact = Decimal(units) * percent / Decimal(100) / Decimal(step)
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)) * step
