"""The reference model of tests/model/test_system.py: what recharged must hold, worked out in plain Python.

It imports nothing of recharged on purpose. It keeps its own table of Stripe's rules for the currencies the model
bills in, its own rounding, its own rating of calls, and its own record of what the test asked for (accounts,
usage, adjustments, the policy an admin set and when). The test compares the database and the Stripe-compatible
server with it after every step.

Money is an `int` of 1/100,000 of the currency unit, as in the ledger; nothing here touches a float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

SCALE = 100_000
DAY = timedelta(days=1)
MAX_AGE = 400 * DAY  # usage older than this is refused (issue 13, item 10: usage.max_age_days, its default)


def units(text: str) -> int:
    """An exact decimal amount -> units; the model writes its amounts as decimal strings."""
    value = Decimal(text) * SCALE
    assert value == value.to_integral_value(), text
    return int(value)


def half_up(value: Fraction) -> int:
    """The nearest integer, halves away from zero."""
    sign = -1 if value < 0 else 1
    whole, rest = divmod(abs(value.numerator), value.denominator)
    return sign * (whole + (1 if 2 * rest >= value.denominator else 0))


# --- Stripe's rules for the model's currencies (docs.stripe.com/currencies) -------------------------------------


@dataclass(frozen=True)
class Money:
    """One currency as Stripe charges it: `minor` units per unit of its integer `amount`, which must be a multiple
    of `api_step`; the smallest charge (in that integer) where Stripe documents one."""

    code: str
    minor: int  # units in one unit of Stripe's integer amount
    api_step: int = 1
    minimum: int | None = None  # Stripe's integer amount
    maximum: int = 99_999_999
    display: int = 0  # units in the ISO minor unit customers read (0: `minor`)

    @property
    def step(self) -> int:
        """Units in the smallest amount that can be charged."""
        return self.minor * self.api_step

    @property
    def display_step(self) -> int:
        return self.display or self.minor

    def minor_units(self, amount: int) -> int:
        assert amount % self.minor == 0, (amount, self.code)
        return amount // self.minor

    def from_minor(self, amount_minor: int) -> int:
        return amount_minor * self.minor

    def vat(self, net: int, percent: Decimal) -> int:
        """VAT on a charge: `percent` of the net amount, rounded half-up to the charge step."""
        return half_up(Fraction(net) * Fraction(percent) / 100 / self.step) * self.step

    def refusal(self, net: int, percent: Decimal) -> str | None:
        """Why Stripe would not take a charge of `net` plus VAT, or None."""
        if net <= 0:
            return "not positive"
        if net % self.step:
            return "off the charge step"
        total = self.minor_units(net + self.vat(net, percent))
        if self.minimum is not None and total < self.minimum:
            return "below the minimum"
        if total > self.maximum:
            return "above the maximum"
        return None


CURRENCIES = {
    "USD": Money("USD", 1_000, minimum=50),
    "EUR": Money("EUR", 1_000, minimum=50),
    "JPY": Money("JPY", 100_000, minimum=50),
    # Three decimals: Stripe's amount counts thousandths and its last digit must be 0; no documented minimum.
    "KWD": Money("KWD", 100, api_step=10),
}


def share(credited: int, charged: int, given_back: int) -> int:
    """What money given back (`given_back` of a charge of `charged`, both in units) takes off a credit of
    `credited`: the same proportion, rounded half-up to the unit, each refund or dispute on its own."""
    return half_up(Fraction(credited * given_back, charged))


# --- plans and policy, as the test's configuration sets them -----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A plan of the test's config: a dialer billed per started minute and lookups per unit."""

    name: str
    currency: str
    per_minute: str
    per_lookup: str

    def cost(self, kind: str, amount: int) -> int:
        if kind == "dialer":
            return -(-amount // 60) * units(self.per_minute)
        return amount * units(self.per_lookup)


PLANS = {
    "USD": Plan("model_usd", "USD", "0.02", "0.01"),
    "EUR": Plan("model_eur", "EUR", "0.018", "0.009"),
    "JPY": Plan("model_jpy", "JPY", "3", "1"),
    "KWD": Plan("model_kwd", "KWD", "0.006", "0.003"),
}

AMOUNTS = ("min_threshold", "min_recharge", "max_recharge", "max_charged_per_day", "max_charged_per_30_days")


@dataclass(frozen=True)
class Policy:
    """The recharge amounts in force, in units (None: no cap)."""

    min_threshold: int
    min_recharge: int
    max_recharge: int | None
    max_charged_per_day: int | None
    max_charged_per_30_days: int | None
    threshold_days: int = 7
    recharge_days: int = 14
    window_days: int = 30

    def with_overrides(self, overrides: dict[str, int | None]) -> Policy:
        merged = {name: getattr(self, name) for name in AMOUNTS}
        merged |= {name: value for name, value in overrides.items() if value is not None}
        return Policy(**merged)


def _policy(*amounts: str) -> Policy:
    values = [units(a) for a in amounts]
    return Policy(*values)


# Small enough that the caps bite within a few days of busy usage.
DEFAULT_POLICIES = {
    "USD": _policy("5", "10", "60", "120", "600"),
    "EUR": _policy("5", "10", "50", "100", "500"),
    "JPY": _policy("700", "1500", "9000", "18000", "90000"),
    "KWD": _policy("1.5", "3", "18", "36", "180"),
}


def policy_table(code: str) -> dict[str, str]:
    """The config's amounts of a currency as decimal strings."""
    policy = DEFAULT_POLICIES[code]
    return {name: str(Decimal(getattr(policy, name)) / SCALE) for name in AMOUNTS}


# --- what the test did ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    event_id: str
    account: str
    kind: str  # dialer (duration) or lookup (quantity)
    started_at: datetime
    amount: int  # seconds or lookups
    cost: int
    after_recharge: int  # the last recharge id when it was recorded: recharges claimed later see it

    @property
    def content(self) -> tuple[object, ...]:
        return (self.account, self.kind, self.started_at, self.amount)


@dataclass
class Account:
    id: str
    currency: str
    vat_percent: Decimal  # at creation
    created_at: datetime
    opening: int
    customer: str
    default: Policy  # the config's amounts for its currency
    fields: dict[str, str | None] = field(default_factory=dict)  # as created (an import row)
    auto_recharge: bool = False
    # The account's own amounts as an admin left them (None: the config's), each with the last recharge id that
    # existed when they were set: a recharge claimed later (a higher id) was decided under them.
    overrides: list[tuple[int, dict[str, int | None]]] = field(default_factory=list)
    vat_changes: list[tuple[int, Decimal]] = field(default_factory=list)  # (last recharge id then, new VAT percent)
    adjustments: dict[str, int] = field(default_factory=dict)  # reference -> amount

    @property
    def money(self) -> Money:
        return CURRENCIES[self.currency]

    @property
    def plan(self) -> Plan:
        return PLANS[self.currency]

    def override(self, last_recharge: int, changes: dict[str, int | None]) -> None:
        current = dict(self.overrides[-1][1]) if self.overrides else {}
        self.overrides.append((last_recharge, current | changes))

    def vat_for(self, recharge_id: int) -> Decimal:
        """The VAT percent in force when recharge `recharge_id` was claimed."""
        vat = self.vat_percent
        for last, percent in self.vat_changes:
            if last < recharge_id:
                vat = percent
        return vat

    @property
    def vat_now(self) -> Decimal:
        return self.vat_changes[-1][1] if self.vat_changes else self.vat_percent

    def policy_for(self, recharge_id: int) -> Policy:
        """The amounts in force when recharge `recharge_id` was claimed: the config's, with the account's own over
        them."""
        own: dict[str, int | None] = {}
        for last, state in self.overrides:
            if last < recharge_id:
                own = state
        return self.default.with_overrides(own)


@dataclass
class Model:
    start: datetime
    accounts: dict[str, Account] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)  # accepted events by id
    adjustment_refs: dict[str, str] = field(default_factory=dict)  # reference -> account that used it first

    def expect_usage(self, batch: list[Usage], now: datetime, tolerance: timedelta) -> list[str]:
        """What recording `batch` must answer, event by event: accepted, duplicate or rejected (from the future,
        older than any window, or an id used with other content). Accepted events are kept."""
        outcomes: list[str] = []
        seen: dict[str, Usage] = {}
        for event in batch:
            known = self.usage.get(event.event_id) or seen.get(event.event_id)
            if event.started_at > now + tolerance or event.started_at < now - MAX_AGE:
                outcomes.append("rejected")
            elif known is not None:
                outcomes.append("duplicate" if known.content == event.content else "rejected")
            else:
                outcomes.append("accepted")
                seen[event.event_id] = event
        self.usage.update(seen)
        return outcomes

    def seen_by(self, account: str, recharge_id: int) -> list[Usage]:
        """The account's usage recorded before recharge `recharge_id` was claimed."""
        return [u for u in self.usage.values() if u.account == account and u.after_recharge < recharge_id]

    def window_usage(self, account: str, at: datetime, recharge_id: int, days: int) -> int:
        """Cost of the usage a recharge claimed at `at` saw that started in the `days` full UTC days before `at`'s
        day."""
        end = start_of_day(at)
        start = end - days * DAY
        return sum(u.cost for u in self.seen_by(account, recharge_id) if start <= u.started_at < end)

    def history_span(self, account: str, at: datetime, recharge_id: int, window_days: int) -> tuple[Fraction, int]:
        """The time the window's usage covers at `at`, from the later of the window's start and the account's start
        (the earlier of its creation and its first usage) to the window's end: exactly, in days, and in the whole UTC
        days the window's usage is counted by. An average divided by less than the first runs high (issue 13,
        item 7); by more than the second (or 1), low."""
        first = [u.started_at for u in self.seen_by(account, recharge_id)]
        began = min([self.accounts[account].created_at, *first])
        end = start_of_day(at)
        start = max(began, end - window_days * DAY)
        exact = Fraction(int((end - start).total_seconds()), int(DAY.total_seconds()))
        whole = (end - start_of_day(start)) // DAY
        return exact, max(1, whole)


def start_of_day(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


# --- the spend caps, over what the card was charged --------------------------------------------------------------


@dataclass(frozen=True)
class Charge:
    """An automatic charge the card paid (or is paying): when, how much with VAT, and the claim it came from."""

    payment_intent: str
    at: datetime
    gross: int
    net: int  # credited: the amount without VAT
    recharge_id: int
    claimed_at: datetime


def cap_violations(account: Account, charges: list[Charge]) -> list[str]:
    """Each automatic charge within max_recharge, and every 24 h and 30 d window of them within the caps in force
    when the charge was claimed, all counted as charged: the amount plus VAT. A violation that only VAT makes is
    marked as issue 13's item 2."""
    found = []
    show = account.money
    ordered = sorted(charges, key=lambda c: c.at)

    def why(net_total: int, cap: int, window: list[Charge] | None = None) -> str:
        if net_total <= cap:
            return " (issue 13, item 2: caps ignore VAT)"
        if window is not None and (
            len({c.claimed_at for c in window}) < len(window) or any(c.at - c.claimed_at > timedelta(0) for c in window)
        ):
            # Two claims at one time, or a charge made after it was claimed (recovered): counted by credit time.
            return " (issue 13, item 3: the caps count credits, by the time they were posted)"
        return ""

    for charge in ordered:
        policy = account.policy_for(charge.recharge_id)
        if policy.max_recharge is not None and charge.gross > policy.max_recharge:
            found.append(
                f"{account.id}: {charge.payment_intent} charged {fmt(charge.gross, show)} at {charge.at:%m-%d %H:%M}, "
                f"over max_recharge {fmt(policy.max_recharge, show)} (VAT {account.vat_for(charge.recharge_id)}%)"
                + why(charge.net, policy.max_recharge)
            )
        for cap, span, name in (
            (policy.max_charged_per_day, DAY, "max_charged_per_day"),
            (policy.max_charged_per_30_days, 30 * DAY, "max_charged_per_30_days"),
        ):
            if cap is None:
                continue
            window = [c for c in ordered if charge.at - span < c.at <= charge.at]
            total = sum(c.gross for c in window)
            if total > cap:
                listed = ", ".join(f"{fmt(c.gross, show)} at {c.at:%m-%d %H:%M:%S}" for c in window)
                found.append(
                    f"{account.id}: {fmt(total, show)} charged in the {span.days} day(s) up to {charge.at:%m-%d %H:%M}"
                    f" ({listed}), over {name} {fmt(cap, show)} (VAT {account.vat_for(charge.recharge_id)}%)"
                    + why(sum(c.net for c in window), cap, window)
                )
    return list(dict.fromkeys(found))  # two charges at the same second see the same window


def fmt(amount: int, money: Money) -> str:
    return f"{Decimal(amount) / SCALE:f} {money.code}"
