"""`recharged accounts history`: one account day by day (UTC): usage by kind, the balance at the end of the
day, the threshold the recharge decision had that day, and the recharges.

The balance is the ledger's: its entries summed up to each midnight (usage through its per-day totals). The
threshold is what `planning` decides at the start of each day, so it follows the same rules as a cycle would
(with the account's policy as it is now).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from recharged.accounts import load_account
from recharged.charts import BalancePoint, balance_chart
from recharged.clock import midnight
from recharged.config import Settings
from recharged.errors import InputError
from recharged.money import Units, format_ledger
from recharged.planning import plans_in
from recharged.states import CREDIT_TYPES
from recharged.store.engine import Database
from recharged.store.reads import account_recharges, ledger_sum_before, non_usage_entries, usage_days

DAY = timedelta(days=1)
MAX_DAYS = 366


def parse_period(days: int | None, since: str | None, until: str | None, today: date) -> tuple[date, date]:
    """The first and last UTC day asked for: `--days N` (ending today, or on --until), or --since [--until]."""
    if days is not None and since is not None:
        raise InputError("give either --days or --since/--until, not both")

    def parse(value: str, option: str) -> date:
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise InputError(f"{option} {value!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-01") from None

    last = today if until is None else parse(until, "--until")
    first = parse(since, "--since") if since is not None else last - timedelta(days=(days or 30) - 1)
    if first > last:
        raise InputError(f"--since {first} is after --until {last}")
    if (last - first).days + 1 > MAX_DAYS:
        raise InputError(f"the period {first} to {last} is longer than {MAX_DAYS} days")
    return first, last


@dataclass(frozen=True, slots=True)
class KindUsage:
    kind: str
    events: int
    quantity: int  # billable seconds (time kinds) or units (count kinds)
    unit: str  # "s", or the count kind's unit (segment, lookup, ...)
    amount: Units  # cost, positive


@dataclass(frozen=True, slots=True)
class RechargeLine:
    id: int
    kind: str  # auto | topup
    at: datetime  # claimed
    amount: Units  # credited (net)
    total: Units  # charged, with VAT
    phase: str
    outcome: str


@dataclass(frozen=True, slots=True)
class HistoryDay:
    day: date
    usage: tuple[KindUsage, ...]
    usage_total: Units
    credits_and_adjustments: Units  # recharges, top-ups, adjustments (either sign), opening balance: that day's sum
    balance: Units  # at the end of the day
    threshold: Units  # as decided at the start of the day
    average_daily: Units
    recharges: tuple[RechargeLine, ...]


@dataclass(frozen=True, slots=True)
class AccountHistory:
    account_id: str
    currency: str
    first: date
    last: date
    opening_balance: Units  # at the start of the first day
    days: tuple[HistoryDay, ...]
    credited: tuple[tuple[datetime, Units], ...]  # recharge and top-up credits: when and how much

    def as_json(self) -> dict[str, Any]:
        return {
            "account": self.account_id,
            "currency": self.currency,
            "since": self.first.isoformat(),
            "until": self.last.isoformat(),
            "opening_balance": format_ledger(self.opening_balance),
            "days": [
                {
                    "day": d.day.isoformat(),
                    "usage": {
                        u.kind: {
                            "events": u.events,
                            "quantity": u.quantity,
                            "unit": u.unit,
                            "amount": format_ledger(u.amount),
                        }
                        for u in d.usage
                    },
                    "usage_total": format_ledger(d.usage_total),
                    "credits_and_adjustments": format_ledger(d.credits_and_adjustments),
                    "balance": format_ledger(d.balance),
                    "threshold": format_ledger(d.threshold),
                    "average_daily": format_ledger(d.average_daily),
                    "recharges": [
                        {
                            "recharge": r.id,
                            "kind": r.kind,
                            "at": r.at.isoformat(),
                            "amount": format_ledger(r.amount),
                            "charged": format_ledger(r.total),
                            "phase": r.phase,
                            "outcome": r.outcome,
                        }
                        for r in d.recharges
                    ],
                }
                for d in self.days
            ],
        }

    def chart(self, path: Path) -> Path:
        """A PNG of the balance at each midnight, the day's threshold, and the credits at the end of their day."""
        before = [self.opening_balance, *(d.balance for d in self.days[:-1])]
        points = [BalancePoint(midnight(d.day), b, d.threshold) for d, b in zip(self.days, before, strict=True)]
        end = self.days[-1]
        points.append(BalancePoint(midnight(end.day) + DAY, end.balance, end.threshold))
        credits: dict[datetime, Units] = {}
        for at, amount in self.credited:
            day_end = midnight(at.date()) + DAY
            credits[day_end] = credits.get(day_end, 0) + amount
        return balance_chart(
            path,
            title=f"{self.account_id}: balance, threshold and recharges, {self.first} to {self.last} (UTC)",
            currency=self.currency,
            points=points,
            recharges=sorted(credits.items()),
        )


def account_history(db: Database, settings: Settings, account_id: str, first: date, last: date) -> AccountHistory:
    """The account's days from `first` to `last` (UTC, both included). NotFoundError for an unknown account."""
    start, end = midnight(first), midnight(last) + DAY
    with db.reading() as session:
        account = load_account(session, account_id)
        plan = settings.plans.get(account.plan)
        rates = plan.rates if plan is not None else {}
        opening = ledger_sum_before(session, account_id, first)
        usage: dict[date, list[KindUsage]] = {}
        for row in usage_days(session, account_id, first, last + DAY):
            rate = rates.get(row.kind)
            unit = "s" if rate is None or rate.measure == "time" else rate.unit
            usage.setdefault(row.day, []).append(KindUsage(row.kind, row.events, row.quantity, unit, row.amount))
        posted: dict[date, Units] = {}
        credited = []
        for entry in non_usage_entries(session, account_id, start, end):
            day = entry.occurred_at.date()
            posted[day] = posted.get(day, 0) + entry.amount
            if entry.entry_type in CREDIT_TYPES:
                credited.append((entry.occurred_at, entry.amount))
        recharges: dict[date, list[RechargeLine]] = {}
        for r in account_recharges(session, account_id, start, end):
            line = RechargeLine(r.id, r.kind, r.created_at, r.amount, r.total, r.phase, r.outcome or "")
            recharges.setdefault(r.created_at.date(), []).append(line)

        days = []
        balance = opening
        day = first
        while day <= last:
            decision = next(plans_in(session, settings, midnight(day), [account_id])).decision
            kinds = tuple(usage.get(day, ()))
            spent = sum(u.amount for u in kinds)
            balance += posted.get(day, 0) - spent
            days.append(
                HistoryDay(
                    day=day,
                    usage=kinds,
                    usage_total=spent,
                    credits_and_adjustments=posted.get(day, 0),
                    balance=balance,
                    threshold=decision.threshold,
                    average_daily=decision.average_daily,
                    recharges=tuple(recharges.get(day, ())),
                )
            )
            day += DAY
        return AccountHistory(account_id, account.currency, first, last, opening, tuple(days), tuple(credited))
