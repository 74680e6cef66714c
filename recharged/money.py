"""Money: integers of 1/100,000 of the currency unit, the table of currencies, and every rounding rule recharged
has.

Amounts are plain `int`s of units (`Units`): 1 USD = 100,000 units, the 5-decimal precision that usage
billing works in. Nothing here touches a float. Rounding happens only in this module, always explicitly:

- rating rounds a cost half-up to the unit (`div_half_up`);
- what a customer reads is rounded half-up to the currency's ISO 4217 minor unit, its *display step*
  (`round_to_display`, `format_customer`): 0.001 KWD, 1 ISK, 0.01 USD;
- a charge is rounded half-up to the currency's *charge step* (`round_to_charge`), the smallest amount the
  processor can charge: 0.010 KWD, 1 ISK, 0.01 USD, 1 MGA. So are VAT on a charge (`percent_of`), the floors
  and caps applied to a charge (`ceil_to_charge` for floors, `floor_to_charge` for what a cap still allows)
  and the recharge amount (`fraction_to_charge`); the part of a charge that covers a shortfall rounds up
  (`ceil_to_charge`) so the balance really reaches the threshold;
- money given back after a charge (a refund, a dispute) takes its share of the credit off the balance, VAT given
  back in the same proportion, rounded half-up to the unit (`credit_reversed`).

A charge step is always a whole number of display steps, so every amount charged shows exactly.
`to_minor_units` / `from_minor_units` convert Units to and from the processor's integer amount. The
processor's minimum and maximum charge are in the table too (`Currency.minimum_units`, `maximum_units`,
`check_charge`). No other module computes a power of ten for a currency.

"Half-up" means half away from zero, Decimal's ROUND_HALF_UP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from types import MappingProxyType
from typing import TypeAlias

Units: TypeAlias = int

SCALE = 100_000
PLACES = 5
_QUANTUM = Decimal(1).scaleb(-PLACES)
MAX_UNITS = 2**63 - 1  # what a BIGINT column holds

# The bounds of the ledger. Balances and amounts are BIGINT columns (signed 64-bit: about 92 trillion currency
# units). Past that, SQLite silently turns the sum into a REAL (and later fails with "integer overflow") while
# PostgreSQL refuses it, so recharged keeps far inside: one amount entering the ledger (an opening balance, an
# adjustment, a top-up or recharge, a usage event's cost) is at most MAX_AMOUNT either way, and no balance is
# ever allowed past MAX_BALANCE either way. 10 billion and 100 billion units of any currency are far beyond any
# real prepaid account (even in VND or IDR, where a dollar is some 16,000-25,000 units), and beyond Stripe's
# largest charge (99,999,999 in its integer amount) in every currency, while sums over many entries and many
# balances (verify, status, the daily totals) still fit 64 bits: some 900 accounts at the limit do.
MAX_AMOUNT: Units = 10**10 * SCALE  # 10,000,000,000.00000
MAX_BALANCE: Units = 10**11 * SCALE  # 100,000,000,000.00000

STRIPE_MAXIMUM = 99_999_999  # the largest amount Stripe charges, in its integer amount (8 digits), any currency


@dataclass(frozen=True, slots=True)
class Currency:
    """One currency as recharged shows it and as Stripe charges it.

    `exponent` is ISO 4217's: what the ledger rounds to for display and what customers read. `api_exponent` is
    what Stripe's integer `amount` counts (10**-api_exponent of the unit), and `api_step` what that integer
    must be a multiple of. `minimum` and `maximum` are Stripe's limits on one charge, in that integer.
    """

    code: str
    exponent: int
    api_exponent: int
    api_step: int = 1
    minimum: int | None = None
    maximum: int = STRIPE_MAXIMUM

    def __post_init__(self) -> None:
        if not (0 <= self.exponent <= PLACES and 0 <= self.api_exponent <= PLACES and self.api_step >= 1):
            raise ValueError(f"{self.code}: exponents must be 0..{PLACES} and the step positive")
        if self.charge_step % self.display_step:
            raise ValueError(f"{self.code}: a charge step must be a whole number of display steps")
        if self.minimum is not None and (self.minimum % self.api_step or not 0 < self.minimum <= self.maximum):
            raise ValueError(f"{self.code}: the minimum must be on the API step and below the maximum")

    @property
    def display_step(self) -> Units:
        """Units in one ISO minor unit (what customers read): 1,000 for cents, 100 for fils, 100,000 for yen."""
        step: int = 10 ** (PLACES - self.exponent)
        return step

    @property
    def api_unit(self) -> Units:
        """Units in one unit of Stripe's integer amount: 1,000 for USD, 100,000 for JPY, 1,000 for ISK."""
        unit: int = 10 ** (PLACES - self.api_exponent)
        return unit

    @property
    def charge_step(self) -> Units:
        """Units in the smallest amount that can be charged: 1,000 for USD, 1,000 for KWD (0.010), 100,000 for
        ISK (1 krona, sent as 100)."""
        return self.api_unit * self.api_step

    @property
    def minimum_units(self) -> Units | None:
        """Stripe's minimum charge in Units (None: no currency-specific minimum)."""
        return None if self.minimum is None else self.minimum * self.api_unit

    @property
    def maximum_units(self) -> Units:
        """The largest amount Stripe charges, in Units, on the charge step."""
        return self.maximum // self.api_step * self.charge_step


def _table(*currencies: Currency) -> Mapping[str, Currency]:
    return MappingProxyType({c.code: c for c in currencies})


def _two(code: str, minimum: int | None = None) -> Currency:
    return Currency(code, 2, 2, 1, minimum)


def _zero(code: str, minimum: int | None = None, *, exponent: int = 0) -> Currency:
    return Currency(code, exponent, 0, 1, minimum)


# Every currency recharged accepts, from ISO 4217 and Stripe's rules (docs.stripe.com/currencies, 2026).
# - Two-decimal: the API amount counts cents. HUF and TWD charge as ordinary two-decimal currencies: Stripe's
#   "divisible by 100" rule for them applies to payouts only, which recharged never makes.
# - Zero-decimal at the API: the amount is whole units. MGA's ISO exponent is 2 (customers may read
#   ariary with decimals), but Stripe charges whole ariary only.
# - ISK and UGX: whole units (ISO exponent 0), but Stripe keeps them two-decimal for backward compatibility:
#   5 ISK is sent as 500 and the amount must be a multiple of 100 (no fractions can be charged).
# - Three-decimal: the API amount counts thousandths, and its last digit must be 0 (charges, refunds and
#   disputes): recharged charges whole multiples of 0.010.
# Minimums are Stripe's, in the API's integer amount, for the currencies it documents one for. Stripe checks
# the minimum after converting to the settlement currency, so a charge in a currency without one here (or
# just over one, in another settlement currency) may still be refused as amount_too_small: the charge flow
# treats that as our fault, not the card's. Every currency's maximum is 99,999,999 in the API's integer.
CURRENCIES: Mapping[str, Currency] = _table(
    _two("USD", 50),
    _two("EUR", 50),
    _two("GBP", 30),
    _two("CAD", 50),
    _two("AUD", 50),
    _two("NZD", 50),
    _two("CHF", 50),
    _two("SEK", 300),
    _two("NOK", 300),
    _two("DKK", 250),
    _two("PLN", 200),
    _two("CZK", 1_500),
    _two("HUF", 17_500),
    _two("RON", 200),
    _two("MXN", 1_000),
    _two("BRL", 50),
    _two("INR", 50),
    _two("SGD", 50),
    _two("HKD", 400),
    _two("ZAR"),
    _two("ILS"),
    _two("AED", 200),
    _two("SAR"),
    _two("TRY"),
    _two("PHP"),
    _two("THB", 1_000),
    _two("MYR", 200),
    _two("IDR"),
    _two("TWD"),
    _two("CNY"),
    _zero("JPY", 50),
    _zero("KRW"),
    _zero("VND"),
    _zero("CLP"),
    _zero("BIF"),
    _zero("DJF"),
    _zero("GNF"),
    _zero("KMF"),
    _zero("MGA", exponent=2),
    _zero("PYG"),
    _zero("RWF"),
    _zero("VUV"),
    _zero("XAF"),
    _zero("XOF"),
    _zero("XPF"),
    Currency("ISK", 0, 2, 100),
    Currency("UGX", 0, 2, 100),
    *(Currency(code, 3, 3, 10) for code in ("BHD", "JOD", "KWD", "OMR", "TND")),
)
# ISO 4217 exponents (what customers read), derived from the table.
MINOR_EXPONENT: Mapping[str, int] = MappingProxyType({code: c.exponent for code, c in CURRENCIES.items()})
SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}


def check_currency(code: str) -> str:
    """The upper-case ISO code, or ValueError listing what is accepted."""
    upper = code.strip().upper()
    if upper not in CURRENCIES:
        raise ValueError(f"unknown currency {code!r}; use one of {', '.join(sorted(CURRENCIES))}")
    return upper


def display_step(currency: str) -> Units:
    """Units in one ISO minor unit of `currency` (1,000 for cents, 100,000 for yen, 100 for fils)."""
    return CURRENCIES[currency].display_step


def charge_step(currency: str) -> Units:
    """Units in the smallest amount of `currency` that can be charged (1,000 for USD, 1,000 for KWD, 100,000
    for ISK)."""
    return CURRENCIES[currency].charge_step


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


def _round_half_up(units: Units, step: Units) -> Units:
    return div_half_up(units, step) * step


def round_to_display(units: Units, currency: str) -> Units:
    """Round half-up to the currency's ISO minor unit (what a customer reads): 1.23450 KWD -> 1.23500."""
    return _round_half_up(units, display_step(currency))


def round_to_charge(units: Units, currency: str) -> Units:
    """Round half-up to the currency's charge step: 12.34500 USD -> 12.35000, 5.12450 KWD -> 5.12000
    (5.125 -> 5.130), 1.5 ISK -> 2."""
    return _round_half_up(units, charge_step(currency))


def ceil_to_charge(units: Units, currency: str) -> Units:
    """Round up (towards +infinity) to the charge step: floors and the shortfall."""
    step = charge_step(currency)
    return -((-units) // step) * step


def floor_to_charge(units: Units, currency: str) -> Units:
    """Round down (towards -infinity) to the charge step: used for what a cap still allows."""
    step = charge_step(currency)
    return (units // step) * step


def fraction_to_charge(numerator: int, denominator: int, currency: str) -> Units:
    """(numerator / denominator) Units rounded half-up to the charge step in one step (no double rounding)."""
    step = charge_step(currency)
    return div_half_up(numerator, denominator * step) * step


def percent_of(units: Units, percent: Decimal, currency: str) -> Units:
    """`percent`% of an amount, rounded half-up to the charge step (VAT on a charge)."""
    step = charge_step(currency)
    exact = Decimal(units) * percent / Decimal(100) / Decimal(step)
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)) * step


def with_vat(net: Units, percent: Decimal, currency: str) -> Units:
    """What is charged for a net amount: the amount plus its VAT."""
    return net + percent_of(net, percent, currency)


def _net_of(total: Units, percent: Decimal) -> Units:
    """total / (1 + percent/100), truncated: the estimate the two searches below start from."""
    return int(Decimal(total) * 100 / (100 + percent))


def smallest_net_reaching(total: Units, percent: Decimal, currency: str) -> Units:
    """The smallest net amount on the charge step whose amount plus VAT is at least `total` (raising a charge
    to the processor's minimum). Amount plus VAT grows with the amount, by one or two steps at a time."""
    step = charge_step(currency)
    net = max(step, ceil_to_charge(_net_of(total, percent), currency))
    while net > step and with_vat(net - step, percent, currency) >= total:
        net -= step
    while with_vat(net, percent, currency) < total:
        net += step
    return net


def largest_net_within(total: Units, percent: Decimal, currency: str) -> Units:
    """The largest net amount on the charge step whose amount plus VAT is at most `total` (capping a charge at
    the processor's maximum); 0 when not even one step fits."""
    step = charge_step(currency)
    net = max(0, floor_to_charge(_net_of(total, percent), currency))
    while with_vat(net + step, percent, currency) <= total:
        net += step
    while net > 0 and with_vat(net, percent, currency) > total:
        net -= step
    return net


def credit_reversed(given_back: Units, charged: Units, credited: Units) -> Units:
    """The part of a credit that money given back takes off the balance (a refund, a dispute's withdrawn funds,
    or its reinstated funds): the card was charged `charged` (the amount plus VAT) and the balance credited
    `credited` (the amount), so giving back `given_back` of the charge reverses credited x given_back / charged,
    rounded half-up to the ledger's unit (1/100,000) in one exact integer step. The VAT goes back in the same
    proportion: a refund of 12.00 of a charge of 120.00 (100.00 + 20% VAT) takes 10.00 off the balance.

    All of a charge given back reverses exactly the credit. Each refund is rounded on its own, so that the
    entries do not depend on the order refunds are seen in; refunds in parts may therefore differ from one refund
    of the whole by at most 1/100,000 each."""
    if charged <= 0 or given_back < 0:
        raise ValueError("a reversal needs a positive charge and a non-negative amount given back")
    return div_half_up(credited * given_back, charged)


def to_minor_units(units: Units, currency: str) -> int:
    """Units on the charge step -> Stripe's integer amount (cents; yen; 100 per krona; thousandths ending in
    0 for KWD). ValueError for an amount off the charge step."""
    info = CURRENCIES[currency]
    if units % info.charge_step:
        raise ValueError(
            f"{format_amount(units, currency)} is not a whole multiple of "
            f"{format_amount(info.charge_step, currency)}, the smallest amount Stripe charges in {currency}"
        )
    return units // info.api_unit


def from_minor_units(amount: int, currency: str) -> Units:
    """Stripe's integer amount -> Units; the inverse of `to_minor_units`. ValueError for an amount off Stripe's
    step (a KWD amount not ending in 0, an ISK amount not a multiple of 100)."""
    info = CURRENCIES[currency]
    if amount % info.api_step:
        raise ValueError(f"{amount} is not a multiple of {info.api_step}, as Stripe's {currency} amounts are")
    return amount * info.api_unit


def check_charge(net: Units, vat: Units, currency: str, *, what: str = "charge") -> None:
    """ValueError, in words a customer's admin reads, unless `net` (plus `vat`) can be charged: positive, on the
    charge step, and within the processor's minimum and maximum (which apply to the amount plus VAT)."""
    info = CURRENCIES[currency]
    shown = format_amount(net, currency)
    if net <= 0:
        raise ValueError(f"{what} of {shown} must be positive")
    if net % info.charge_step:
        raise ValueError(
            f"{what} of {shown} is not a whole multiple of {format_amount(info.charge_step, currency)}, "
            f"the smallest amount Stripe charges in {currency}"
        )
    total = net + vat
    charged = f"{what} of {shown}" + (f" ({format_amount(total, currency)} with VAT)" if vat else "")
    minimum = info.minimum_units
    if minimum is not None and total < minimum:
        raise ValueError(f"{charged} is below Stripe's minimum charge of {format_amount(minimum, currency)}")
    if total > info.maximum_units:
        raise ValueError(f"{charged} is above Stripe's maximum charge of {format_amount(info.maximum_units, currency)}")


def check_amount(amount: Units, currency: str, *, what: str = "amount") -> None:
    """ValueError, naming the amount and the limit, unless `amount` is within MAX_AMOUNT either way."""
    if abs(amount) > MAX_AMOUNT:
        raise ValueError(
            f"{what} of {format_amount(amount, currency)} is over the limit of {format_amount(MAX_AMOUNT, currency)} "
            "for one amount in the ledger"
        )


def check_balance(balance: Units, amount: Units, currency: str, *, what: str = "amount") -> None:
    """ValueError, naming the amount, the balance it would make and the limit, unless adding `amount` keeps the
    balance within MAX_BALANCE either way."""
    after = balance + amount
    if abs(after) > MAX_BALANCE:
        raise ValueError(
            f"{what} of {format_amount(amount, currency)} would take the balance from "
            f"{format_amount(balance, currency)} to {format_amount(after, currency)}, past the limit of "
            f"{'-' if after < 0 else ''}{format_amount(MAX_BALANCE, currency)} for a balance"
        )


def to_decimal(units: Units) -> Decimal:
    """Units -> an exact Decimal with 5 places (for JSON and arithmetic at the edges)."""
    return Decimal(units).scaleb(-PLACES).quantize(_QUANTUM)


def to_display_decimal(units: Units, currency: str) -> Decimal:
    """Units rounded half-up to the ISO minor unit, as a Decimal with exactly that many places ('12.35')."""
    places = CURRENCIES[currency].exponent
    return Decimal(round_to_display(units, currency)).scaleb(-PLACES).quantize(Decimal(1).scaleb(-places))


def format_ledger(units: Units) -> str:
    """Ledger form: always 5 decimals, e.g. '-0.01250'."""
    return f"{to_decimal(units):.{PLACES}f}"


def format_amount(units: Units, currency: str) -> str:
    """An exact amount with its code for messages: at least the ISO places, more when it has them:
    '0.50 USD', '1.234 KWD', '0.105 USD', '5 ISK'."""
    exact = to_decimal(units).normalize()
    places = max(CURRENCIES[currency].exponent, -int(exact.as_tuple().exponent))
    return f"{exact:.{places}f} {currency}"


def format_customer(units: Units, currency: str) -> str:
    """What a customer reads: rounded half-up to the ISO minor unit, with the currency, e.g. '$12.35'."""
    rounded = to_display_decimal(units, currency)
    text = f"{abs(rounded):,.{CURRENCIES[currency].exponent}f}"
    sign = "-" if units < 0 and rounded != 0 else ""
    symbol = SYMBOLS.get(currency)
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency}"
