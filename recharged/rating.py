"""Usage -> cost. Pure: rates are given, nothing is read from the world.

Time-based kinds are billed from the moment of dialing: `duration_seconds` is the whole leg. The billable
time is the duration raised to the rate's minimum, then rounded up to its increment (60 = per minute,
1 = per second, 6 = six-second increments), so a 70-second call on a per-minute rate is 2 minutes and an
83-second call on a per-second rate is 83 seconds. A leg of 0 seconds never connected and costs nothing.
The cost is the connect fee plus price-per-minute x billable seconds / 60, rounded half-up to 1/100,000.
Count-based kinds (SMS segments, lookups, connected calls, tasks) cost price-per-unit x quantity exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from recharged.money import Units, div_half_up
from recharged.states import Measure


@dataclass(frozen=True, slots=True)
class TimeRate:
    """A per-minute price billed in increments of seconds."""

    price_per_minute: Units
    increment_seconds: int = 60
    minimum_seconds: int = 0
    connect_fee: Units = 0

    @property
    def measure(self) -> Literal[Measure.TIME]:
        return Measure.TIME

    @property
    def unit(self) -> str:
        return "second"


@dataclass(frozen=True, slots=True)
class CountRate:
    """A price per counted unit (segment, lookup, call, task, ...)."""

    price_per_unit: Units
    unit: str = "unit"

    @property
    def measure(self) -> Literal[Measure.COUNT]:
        return Measure.COUNT


Rate = TimeRate | CountRate


@dataclass(frozen=True, slots=True)
class Rated:
    """The outcome of rating one event: billable quantity (seconds or units) and its cost."""

    billable_quantity: int
    cost: Units


def billable_seconds(duration_seconds: int, rate: TimeRate) -> int:
    """Seconds billed for a leg of `duration_seconds`: minimum first, then up to the increment."""
    if duration_seconds < 0:
        raise ValueError("duration_seconds must not be negative")
    if duration_seconds == 0:
        return 0
    seconds = max(duration_seconds, rate.minimum_seconds)
    increment = rate.increment_seconds
    return -(-seconds // increment) * increment


def rate_time(duration_seconds: int, rate: TimeRate) -> Rated:
    """Rate a call leg."""
    billed = billable_seconds(duration_seconds, rate)
    if billed == 0:
        return Rated(0, 0)
    return Rated(billed, rate.connect_fee + div_half_up(rate.price_per_minute * billed, 60))


def longest_call(balance: Units, rate: TimeRate, *, limit_seconds: int = 30 * 86_400) -> int:
    """The longest call, in seconds, whose cost the balance covers (0 when not even the shortest one is
    covered), found with `rate_time` itself so it can never disagree with how calls are billed."""
    if balance <= 0 or rate_time(1, rate).cost > balance:
        return 0
    if rate_time(limit_seconds, rate).cost <= balance:
        return limit_seconds
    low, high = 1, limit_seconds  # cost(low) <= balance < cost(high); cost never falls as calls get longer
    while high - low > 1:
        middle = (low + high) // 2
        if rate_time(middle, rate).cost <= balance:
            low = middle
        else:
            high = middle
    return low


def rate_count(quantity: int, rate: CountRate) -> Rated:
    """Rate a counted event (segments, lookups, ...)."""
    if quantity < 0:
        raise ValueError("quantity must not be negative")
    return Rated(quantity, rate.price_per_unit * quantity)


def rate_event(rate: Rate, *, duration_seconds: int | None, quantity: int | None) -> Rated:
    """Rate an event by its rate's measure; the caller has checked which field the measure needs."""
    if isinstance(rate, TimeRate):
        if duration_seconds is None:
            raise ValueError("a time-based kind needs duration_seconds")
        return rate_time(duration_seconds, rate)
    if quantity is None:
        raise ValueError("a count-based kind needs a quantity")
    return rate_count(quantity, rate)


def rate_snapshot(kind_rate: Rate) -> dict[str, Any]:
    """A rate as the columns of its stored snapshot (the `rates` table)."""
    if isinstance(kind_rate, TimeRate):
        return {
            "measure": Measure.TIME,
            "price": kind_rate.price_per_minute,
            "increment_seconds": kind_rate.increment_seconds,
            "minimum_seconds": kind_rate.minimum_seconds,
            "connect_fee": kind_rate.connect_fee,
            "unit": "second",
        }
    return {
        "measure": Measure.COUNT,
        "price": kind_rate.price_per_unit,
        "increment_seconds": 0,
        "minimum_seconds": 0,
        "connect_fee": 0,
        "unit": kind_rate.unit,
    }


def rate_from_snapshot(columns: Mapping[str, Any]) -> Rate:
    """The rate a stored snapshot describes: `verify` re-rates recorded events with it."""
    if columns["measure"] == Measure.TIME:
        return TimeRate(
            columns["price"], columns["increment_seconds"], columns["minimum_seconds"], columns["connect_fee"]
        )
    return CountRate(columns["price"], columns["unit"])
