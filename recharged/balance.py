"""The recharge decision: average daily usage, threshold, recharge amount, runway. Pure; `at` is a parameter.

The average daily usage at time T is the cost of usage started in the `window_days` full UTC calendar days
before T's UTC day (T's own day excluded), divided by `window_days`; an account with less history, counted
from the earlier of its creation and its first usage, divides by its number of full days (at least 1).
Threshold = average x `threshold_days`, recharge amount = average x `recharge_days`, then the floors and caps.
When the balance is below the threshold the account is charged the recharge amount, or more if even that
would leave it under the threshold (the charge then covers the shortfall), within `max_recharge` and the
spend caps, and within the processor's limits on one charge (amount plus VAT): raised to its minimum when
smaller (unless `max_recharge` or a spend cap forbids that: then nothing is charged, `cap_reached`), capped
at its maximum when larger.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Literal

from recharged.clock import as_utc, start_of_day
from recharged.money import (
    CURRENCIES,
    Units,
    ceil_to_charge,
    charge_step,
    div_half_up,
    floor_to_charge,
    fraction_to_charge,
    largest_net_within,
    smallest_net_reaching,
    with_vat,
)
from recharged.states import RechargeState

DAY = timedelta(days=1)

Reason = Literal[
    "below_threshold",
    "above_threshold",
    "auto_recharge_off",
    "cap_reached",
    "suspended",
    "action_required",
    "no_funding_source",
    "recharge_in_progress",
    "backing_off",
    "disputed",
]


@dataclass(frozen=True, slots=True)
class Policy:
    """How much reserve to keep and how much to add; amounts in the account's currency units."""

    window_days: int = 30
    threshold_days: int = 7
    recharge_days: int = 14
    min_threshold: Units = 0
    min_recharge: Units = 0
    max_recharge: Units | None = None
    max_charged_per_day: Units | None = None
    max_charged_per_30_days: Units | None = None

    def overridden(self, overrides: dict[str, int | None]) -> Policy:
        """This policy with the given non-None fields replaced (an account's own settings)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True, slots=True)
class Window:
    """The UTC days [start, end) whose usage makes the average at time `at`."""

    start: datetime
    end: datetime

    @classmethod
    def before(cls, at: datetime, days: int) -> Window:
        end = start_of_day(at)
        return cls(end - days * DAY, end)


@dataclass(frozen=True, slots=True)
class AccountFigures:
    """What the decision needs to know about one account at one moment."""

    currency: str
    balance: Units
    created_at: datetime
    first_usage_at: datetime | None
    window_usage: Units  # cost of usage started inside the window, a positive amount
    auto_recharge: bool
    policy: Policy
    charged_last_day: Units = 0
    charged_last_30_days: Units = 0
    state: RechargeState = RechargeState.OK
    retry_at: datetime | None = None  # while backing off: when the next try is allowed
    has_funding_source: bool = True
    in_progress: bool = False
    vat_percent: Decimal = Decimal(0)  # the processor's limits apply to the charge plus VAT


@dataclass(frozen=True, slots=True)
class Decision:
    """The decision the next cycle would take for one account, with every figure behind it."""

    balance: Units
    history_days: int
    average_daily: Units
    threshold: Units
    recharge_amount: Units
    runway_days: Decimal | None  # None: no usage, the balance lasts indefinitely
    action: Literal["charge", "skip"]
    reason: Reason
    charge_amount: Units = 0
    # The floor or cap that bounded the charge amount, if any: "shortfall", "max_recharge", a spend cap, or the
    # processor's own limits on one charge ("processor_minimum", "processor_maximum").
    limited_by: str | None = None


def history_days(at: datetime, created_at: datetime, first_usage_at: datetime | None, window_days: int) -> int:
    """Full UTC days of history before `at`'s day, between 1 and `window_days`."""
    end = start_of_day(at)
    start = as_utc(created_at)
    if first_usage_at is not None:
        start = min(start, as_utc(first_usage_at))
    full_days = (end - start) // DAY
    return max(1, min(window_days, full_days))


def runway_days(balance: Units, window_usage: Units, days: int) -> Decimal | None:
    """Days the balance lasts at the average rate, rounded down to 0.1 day; None when there is no usage."""
    if window_usage <= 0:
        return None
    if balance <= 0:
        return Decimal("0.0")
    return (Decimal(balance * days) / Decimal(window_usage)).quantize(Decimal("0.1"), rounding=ROUND_FLOOR)


def runs_out_within(runway: Decimal | None, wait: timedelta) -> bool:
    """Whether a balance lasting `runway` days (None: indefinitely) runs out before `wait` has passed; exact,
    in whole microseconds."""
    return runway is not None and runway * (DAY // timedelta(microseconds=1)) < wait // timedelta(microseconds=1)


def decide(figures: AccountFigures, at: datetime) -> Decision:
    """The recharge decision for one account at time `at`."""
    policy = figures.policy
    currency = figures.currency
    days = history_days(at, figures.created_at, figures.first_usage_at, policy.window_days)
    usage = max(0, figures.window_usage)

    threshold = max(policy.min_threshold, div_half_up(usage * policy.threshold_days, days))
    # Charges are whole charge steps: floors round up to one, ceilings round down.
    step = charge_step(currency)
    min_recharge = ceil_to_charge(policy.min_recharge, currency)
    max_recharge = None if policy.max_recharge is None else floor_to_charge(policy.max_recharge, currency)
    recharge = max(min_recharge, fraction_to_charge(usage * policy.recharge_days, days, currency))
    capped = max_recharge is not None and recharge > max_recharge
    if max_recharge is not None:
        recharge = min(recharge, max_recharge)

    skip = Decision(
        balance=figures.balance,
        history_days=days,
        average_daily=div_half_up(usage, days),
        threshold=threshold,
        recharge_amount=recharge,
        runway_days=runway_days(figures.balance, usage, days),
        action="skip",
        reason="above_threshold",
    )
    if not figures.auto_recharge:
        return replace(skip, reason="auto_recharge_off")
    if figures.state == RechargeState.SUSPENDED:
        return replace(skip, reason="suspended")
    if figures.state == RechargeState.ACTION_REQUIRED:
        return replace(skip, reason="action_required")
    if figures.state == RechargeState.DISPUTED:  # a payment was disputed: paused until an admin enables it
        return replace(skip, reason="disputed")
    if not figures.has_funding_source:
        return replace(skip, reason="no_funding_source")
    if figures.in_progress:
        return replace(skip, reason="recharge_in_progress")
    if figures.balance >= threshold:
        return skip
    if figures.state == RechargeState.BACKING_OFF and figures.retry_at is not None and at < figures.retry_at:
        return replace(skip, reason="backing_off")

    # One charge always lifts the balance to the threshold: cover the shortfall when the recharge is too small.
    charge = max(recharge, ceil_to_charge(threshold - figures.balance, currency))
    limited_by: str | None = "shortfall" if charge > recharge else ("max_recharge" if capped else None)
    if max_recharge is not None and charge > max_recharge:
        charge, limited_by = max_recharge, "max_recharge"
    if charge < step:  # a ceiling below one charge step leaves nothing to charge
        return replace(skip, reason="cap_reached", limited_by="max_recharge")
    ceilings: list[tuple[str, Units]] = [] if max_recharge is None else [("max_recharge", max_recharge)]
    for cap_name, cap, spent in (
        ("max_charged_per_day", policy.max_charged_per_day, figures.charged_last_day),
        ("max_charged_per_30_days", policy.max_charged_per_30_days, figures.charged_last_30_days),
    ):
        if cap is None:
            continue
        allowed = floor_to_charge(cap - spent, currency)
        if allowed < step:
            return replace(skip, reason="cap_reached", limited_by=cap_name)
        ceilings.append((cap_name, allowed))
        if charge > allowed:
            charge, limited_by = allowed, cap_name

    # The processor's limits apply to what is charged: the amount plus VAT. Above the maximum, charge the most it
    # takes; below the minimum, charge the least it takes, unless a ceiling of the customer's forbids that.
    limits = CURRENCIES[currency]
    vat = figures.vat_percent
    most = largest_net_within(limits.maximum_units, vat, currency)
    if charge > most:
        charge, limited_by = most, "processor_maximum"
    if limits.minimum_units is not None and with_vat(charge, vat, currency) < limits.minimum_units:
        least = smallest_net_reaching(limits.minimum_units, vat, currency)
        blocking = next((name for name, ceiling in ceilings if least > ceiling), None)
        if blocking is not None:
            return replace(skip, reason="cap_reached", limited_by=blocking)
        charge, limited_by = least, "processor_minimum"
    return replace(skip, action="charge", reason="below_threshold", charge_amount=charge, limited_by=limited_by)


@dataclass(frozen=True, slots=True)
class AccountPlan:
    """One account's decision with what it was made from."""

    account_id: str
    currency: str
    auto_recharge: bool
    policy: Policy
    window: Window
    decision: Decision
