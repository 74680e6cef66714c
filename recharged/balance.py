"""The recharge decision: average daily usage, threshold, recharge amount, runway. Pure; `at` is a parameter.

The average daily usage at time T is the cost of usage started in the `window_days` full UTC calendar days
before T's UTC day (T's own day excluded), divided by the length of time that usage covers: the whole window,
or for a younger account the time from its start (the earlier of its creation and its first usage) to the
window's end, in seconds, and never less than one day. So the usage of the day an account was created at noon
is divided by the half day it covers, not by a full day, and not left out of a divisor that counts only full days.

Threshold = average x `threshold_days`, recharge amount = average x `recharge_days`, then the floors
(`min_threshold`, `min_recharge`) and `max_recharge`. When the balance is below the threshold the account is
charged the recharge amount, or more if even that would leave it under the threshold (the charge then covers
the shortfall). The caps protect the customer's card, so they apply to what the card is charged, the amount
plus VAT: `max_recharge` bounds one charge, the spend caps what was charged in the last 24 hours and 30 days
(every automatic recharge that can still take money counts, by the time it was claimed). The processor's
limits on one charge apply to the amount plus VAT too: a smaller charge is raised to its minimum (unless a cap
forbids that: then nothing is charged, `cap_reached`), a larger one capped at its maximum.

`decide` keeps every figure it used (`Decision.inputs`); `recompute` takes them back and decides again, so a
receipt or the API can show why an amount was charged without re-deriving anything from today's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal
from itertools import pairwise
from typing import Any, Literal

from recharged.clock import as_utc, start_of_day
from recharged.money import (
    CURRENCIES,
    Units,
    ceil_to_charge,
    charge_step,
    div_half_up,
    floor_to_charge,
    format_amount,
    fraction_to_charge,
    largest_net_within,
    smallest_net_reaching,
    with_vat,
)
from recharged.states import RechargeState

DAY = timedelta(days=1)
SECONDS_PER_DAY = 86_400

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
    "cards_resting",
    "no_policy",
    "closed",
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

    def overridden(self, overrides: Mapping[str, int | None]) -> Policy:
        """This policy with the given non-None fields replaced (a plan's or an account's own settings)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


POLICY_FIELDS = tuple(Policy.__dataclass_fields__)
AMOUNT_FIELDS = ("min_threshold", "min_recharge", "max_recharge", "max_charged_per_day", "max_charged_per_30_days")


def contradictions(policy: Policy, currency: str) -> list[str]:
    """What in a policy can never hold together, each naming both settings: a floor above a cap, a cap above a
    larger window's cap, a cap below the processor's minimum charge, or a negative amount."""
    problems = [
        f"{name} {format_amount(value, currency)} is negative"
        for name in AMOUNT_FIELDS
        if (value := getattr(policy, name)) is not None and value < 0
    ]
    caps = [(name, getattr(policy, name)) for name in AMOUNT_FIELDS[2:] if getattr(policy, name) is not None]
    for cap_name, cap in caps:
        if policy.min_recharge > cap:
            problems.append(
                f"min_recharge {format_amount(policy.min_recharge, currency)} is above {cap_name} "
                f"{format_amount(cap, currency)}: the smallest recharge could never be charged"
            )
    for (small_name, small), (large_name, large) in pairwise(caps):
        if small > large:
            problems.append(
                f"{small_name} {format_amount(small, currency)} is above {large_name} "
                f"{format_amount(large, currency)}: the larger window would never allow it"
            )
    minimum = CURRENCIES[currency].minimum_units
    for cap_name, cap in caps:
        if minimum is not None and 0 <= cap < minimum:
            problems.append(
                f"{cap_name} {format_amount(cap, currency)} is below the processor's minimum charge of "
                f"{format_amount(minimum, currency)}: nothing could ever be charged"
            )
    return problems


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
    # What the card was charged (amount plus VAT) by automatic recharges claimed in the last 24 hours / 30 days
    # that can still take money (claimed, in flight or finished): what the spend caps count.
    charged_last_day: Units = 0
    charged_last_30_days: Units = 0
    state: RechargeState = RechargeState.OK
    retry_at: datetime | None = None  # while backing off: when the next try is allowed
    has_funding_source: bool = True
    # Every card is resting after declines (too many in 30 days, or one too recent): when the first is usable.
    cards_resting_until: datetime | None = None
    in_progress: bool = False
    vat_percent: Decimal = Decimal(0)  # the caps and the processor's limits apply to the charge plus VAT


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    """Every figure a charge decision is computed from, kept with the recharge it claimed: `recompute` gives
    the same decision again from these alone."""

    currency: str
    balance: Units
    window_usage: Units
    history_seconds: int
    policy: Policy
    charged_last_day: Units
    charged_last_30_days: Units
    vat_percent: Decimal

    @property
    def history_days(self) -> Decimal:
        return days_of(self.history_seconds)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: amounts as integers of Units, the VAT percent as a string."""
        return {
            "currency": self.currency,
            "balance": self.balance,
            "window_usage": self.window_usage,
            "history_seconds": self.history_seconds,
            "policy": {name: getattr(self.policy, name) for name in POLICY_FIELDS},
            "charged_last_day": self.charged_last_day,
            "charged_last_30_days": self.charged_last_30_days,
            "vat_percent": str(self.vat_percent),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionInputs:
        return cls(
            currency=str(data["currency"]),
            balance=int(data["balance"]),
            window_usage=int(data["window_usage"]),
            history_seconds=int(data["history_seconds"]),
            policy=Policy(**{name: data["policy"][name] for name in POLICY_FIELDS}),
            charged_last_day=int(data["charged_last_day"]),
            charged_last_30_days=int(data["charged_last_30_days"]),
            vat_percent=Decimal(str(data["vat_percent"])),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The decision the next cycle would take for one account, with every figure behind it."""

    balance: Units
    history_days: Decimal  # the time the window's usage covers, in days (0.01 day)
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
    # The average times threshold_days and recharge_days, before the floors and caps.
    nominal_threshold: Units = 0
    nominal_recharge: Units = 0
    next_try_at: datetime | None = None  # skipped for resting cards or a back-off: when a charge may be tried
    inputs: DecisionInputs | None = None


def history_seconds(at: datetime, created_at: datetime, first_usage_at: datetime | None, window_days: int) -> int:
    """Seconds of time the window's usage covers at `at`: from the later of the window's start and the account's
    start (the earlier of its creation and its first usage) to the window's end; at least one day."""
    end = start_of_day(at)
    start = as_utc(created_at)
    if first_usage_at is not None:
        start = min(start, as_utc(first_usage_at))
    start = max(start, end - window_days * DAY)
    return max(SECONDS_PER_DAY, (end - start) // timedelta(seconds=1))


def days_of(seconds: int) -> Decimal:
    """Seconds as days, to 0.01 day (what is shown: "over the last 29.5 days")."""
    days = (Decimal(seconds) / SECONDS_PER_DAY).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return days.quantize(Decimal(1)) if days == days.to_integral_value() else days.normalize()


def history_days(at: datetime, created_at: datetime, first_usage_at: datetime | None, window_days: int) -> Decimal:
    """`history_seconds` in days, to 0.01 day: between 1 and `window_days`."""
    return days_of(history_seconds(at, created_at, first_usage_at, window_days))


def runway_days(balance: Units, window_usage: Units, seconds: int) -> Decimal | None:
    """Days the balance lasts at the average rate (the usage over `seconds` of history), rounded down to 0.1
    day; None when there is no usage."""
    if window_usage <= 0:
        return None
    if balance <= 0:
        return Decimal("0.0")
    return (Decimal(balance * seconds) / Decimal(window_usage * SECONDS_PER_DAY)).quantize(
        Decimal("0.1"), rounding=ROUND_FLOOR
    )


def runs_out_within(runway: Decimal | None, wait: timedelta) -> bool:
    """Whether a balance lasting `runway` days (None: indefinitely) runs out before `wait` has passed; exact,
    in whole microseconds."""
    return runway is not None and runway * (DAY // timedelta(microseconds=1)) < wait // timedelta(microseconds=1)


def decide(figures: AccountFigures, at: datetime) -> Decision:
    """The recharge decision for one account at time `at`."""
    policy = figures.policy
    inputs = DecisionInputs(
        currency=figures.currency,
        balance=figures.balance,
        window_usage=max(0, figures.window_usage),
        history_seconds=history_seconds(at, figures.created_at, figures.first_usage_at, policy.window_days),
        policy=policy,
        charged_last_day=figures.charged_last_day,
        charged_last_30_days=figures.charged_last_30_days,
        vat_percent=figures.vat_percent,
    )
    skip = _figures(inputs)
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
    if figures.balance >= skip.threshold:
        return skip
    if figures.state == RechargeState.BACKING_OFF and figures.retry_at is not None and at < figures.retry_at:
        return replace(skip, reason="backing_off", next_try_at=figures.retry_at)
    if figures.cards_resting_until is not None and at <= figures.cards_resting_until:
        return replace(skip, reason="cards_resting", next_try_at=figures.cards_resting_until)
    return _charge(inputs, skip)


def recompute(inputs: DecisionInputs) -> Decision:
    """The decision `inputs` were kept from, computed again (charge or skip, by the amounts alone)."""
    skip = _figures(inputs)
    return skip if inputs.balance >= skip.threshold else _charge(inputs, skip)


FIGURES = ("average_daily", "nominal_threshold", "threshold", "nominal_recharge", "recharge_amount", "charge_amount")


def stored_decision(decision: Decision, at: datetime) -> dict[str, Any]:
    """A charge decision as kept with its recharge: when it was taken, its inputs and its figures (JSON)."""
    if decision.inputs is None:
        raise ValueError("a decision without its inputs cannot be kept")
    return {
        "decided_at": as_utc(at).isoformat(),
        "inputs": decision.inputs.to_json(),
        "history_days": str(decision.history_days),
        **{name: getattr(decision, name) for name in FIGURES},
        "limited_by": decision.limited_by,
    }


def stored_mismatches(stored: Mapping[str, Any]) -> list[str]:
    """How a kept decision's figures differ from those its inputs give again (none: it recomputes)."""
    again = recompute(DecisionInputs.from_json(stored["inputs"]))
    wrong = [
        f"{name} {stored.get(name)} (recomputed {getattr(again, name)})"
        for name in FIGURES
        if stored.get(name) != getattr(again, name)
    ]
    if stored.get("limited_by") != again.limited_by:
        wrong.append(f"limited_by {stored.get('limited_by')} (recomputed {again.limited_by})")
    return wrong


def _figures(inputs: DecisionInputs) -> Decision:
    """The average, threshold and recharge amount of `inputs`, as a decision to skip."""
    policy, currency, usage, seconds = inputs.policy, inputs.currency, inputs.window_usage, inputs.history_seconds
    per_day = usage * SECONDS_PER_DAY  # usage per day is this / seconds
    nominal_threshold = div_half_up(per_day * policy.threshold_days, seconds)
    nominal_recharge = fraction_to_charge(per_day * policy.recharge_days, seconds, currency)
    recharge = max(ceil_to_charge(policy.min_recharge, currency), nominal_recharge)
    ceiling = _max_recharge(inputs)
    if ceiling is not None:
        recharge = min(recharge, ceiling)
    return Decision(
        balance=inputs.balance,
        history_days=inputs.history_days,
        average_daily=div_half_up(per_day, seconds),
        threshold=max(policy.min_threshold, nominal_threshold),
        recharge_amount=recharge,
        runway_days=runway_days(inputs.balance, usage, seconds),
        action="skip",
        reason="above_threshold",
        nominal_threshold=nominal_threshold,
        nominal_recharge=nominal_recharge,
        inputs=inputs,
    )


def _max_recharge(inputs: DecisionInputs) -> Units | None:
    """The largest amount one charge may credit: the one whose amount plus VAT is within `max_recharge`."""
    cap = inputs.policy.max_recharge
    if cap is None:
        return None
    return largest_net_within(floor_to_charge(cap, inputs.currency), inputs.vat_percent, inputs.currency)


def _charge(inputs: DecisionInputs, skip: Decision) -> Decision:
    """The charge for an account below its threshold, within the caps and the processor's limits."""
    policy, currency, vat = inputs.policy, inputs.currency, inputs.vat_percent
    step = charge_step(currency)
    recharge = skip.recharge_amount
    max_recharge = _max_recharge(inputs)
    # One charge always lifts the balance to the threshold: cover the shortfall when the recharge is too small.
    charge = max(recharge, ceil_to_charge(skip.threshold - inputs.balance, currency))
    capped = max_recharge is not None and recharge < max(
        ceil_to_charge(policy.min_recharge, currency), skip.nominal_recharge
    )
    limited_by: str | None = "shortfall" if charge > recharge else ("max_recharge" if capped else None)
    if max_recharge is not None and charge > max_recharge:
        charge, limited_by = max_recharge, "max_recharge"
    if charge < step:  # a ceiling below one charge step leaves nothing to charge
        return replace(skip, reason="cap_reached", limited_by="max_recharge")
    ceilings: list[tuple[str, Units]] = [] if max_recharge is None else [("max_recharge", max_recharge)]
    for cap_name, cap, spent in (
        ("max_charged_per_day", policy.max_charged_per_day, inputs.charged_last_day),
        ("max_charged_per_30_days", policy.max_charged_per_30_days, inputs.charged_last_30_days),
    ):
        if cap is None:
            continue
        # What the card may still be charged, amount plus VAT, and the largest amount that stays within it.
        allowed = largest_net_within(floor_to_charge(cap - spent, currency), vat, currency) if cap > spent else 0
        if allowed < step:
            return replace(skip, reason="cap_reached", limited_by=cap_name)
        ceilings.append((cap_name, allowed))
        if charge > allowed:
            charge, limited_by = allowed, cap_name

    # The processor's limits apply to what is charged: the amount plus VAT. Above the maximum, charge the most it
    # takes; below the minimum, charge the least it takes, unless a ceiling of the customer's forbids that.
    limits = CURRENCIES[currency]
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
