"""`recharged verify`: prove the invariants the ledger keeps, on the database as it is.

- every account's cached balance equals the sum of its ledger entries;
- every usage entry matches its rated event: re-rating the recorded duration or quantity with the recorded
  rate snapshot gives the recorded billable quantity and amount;
- the per-day usage totals equal the usage entries summed per account, UTC day and kind;
- every account's first usage time is the earliest of its usage entries;
- every credited recharge has exactly one ledger credit, for its PaymentIntent and its net amount; every
  charge credit belongs to a credited recharge; no recharge has two succeeded attempts;
- every recharge's phase agrees with its attempts (one pending attempt while charging and only then, one
  succeeded attempt once paid, none when failed), and accounts' recharge states have what they need;
- uniqueness, again: one ledger entry per origin, one open recharge and one default card per account;
- receipt numbers run from 1 with no gap per issuer, up to the issuer's counter; every credited recharge has
  one receipt with its amounts, and every receipt its email in the outbox; sent messages are complete.
The database enforces uniqueness and "usage is a debit" itself; verify checks again what an index dropped by
hand or a restore without constraints could break.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

from recharged.authorizations import reserved_problems
from recharged.mail.admin import outbox_problems
from recharged.mail.receipts import receipt_problems
from recharged.money import format_ledger
from recharged.rating import rate_event, rate_from_snapshot
from recharged.store.engine import Database
from recharged.store.integrity import (
    balance_mismatches,
    recharge_credit_problems,
    recharge_phase_problems,
    uniqueness_problems,
    usage_entries_with_rates,
)
from recharged.store.ledger import daily_usage_rows, first_usage_times
from recharged.words import plural


@dataclass(frozen=True, slots=True)
class Report:
    checked_entries: int
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


def verify(db: Database, progress: Callable[[int], None] | None = None, limit: int = 100) -> Report:
    """Check every invariant; returns the violations found (at most `limit` listed per check)."""
    violations: list[str] = []

    def report(kind: str, found: list[str]) -> None:
        violations.extend(found[:limit])
        if len(found) > limit:
            violations.append(f"{kind}: {len(found) - limit} more not listed")

    with db.reading() as session:
        report(
            "balance",
            [
                f"account {account}: cached balance {format_ledger(cached)} != sum of entries {format_ledger(total)}"
                for account, cached, total in balance_mismatches(session)
            ],
        )

        rating_problems: list[str] = []
        daily: dict[tuple[str, date, str], list[int]] = {}
        first: dict[str, datetime] = {}
        checked = 0
        for row in usage_entries_with_rates(session):
            checked += 1
            if progress is not None and checked % 100_000 == 0:
                progress(checked)
            cost = -row.amount
            if row.rate_id is not None:
                rated = rate_event(
                    rate_from_snapshot(row._mapping),
                    duration_seconds=row.duration_seconds,
                    quantity=row.quantity,
                )
                if (rated.billable_quantity, rated.cost) != (row.billable_quantity, cost):
                    rating_problems.append(
                        f"usage {row.external_id}: recorded {row.billable_quantity} billable, {format_ledger(cost)}; "
                        f"its rate gives {rated.billable_quantity} for {format_ledger(rated.cost)}"
                    )
            totals = daily.setdefault((row.account_id, row.occurred_at.date(), row.kind), [0, 0, 0])
            totals[0] += 1
            totals[1] += row.billable_quantity
            totals[2] += cost
            if row.account_id not in first or row.occurred_at < first[row.account_id]:
                first[row.account_id] = row.occurred_at
        report("rating", rating_problems)

        daily_problems: list[str] = []
        for kept in daily_usage_rows(session):
            key = (kept.account_id, kept.day, kept.kind)
            expected = daily.pop(key, [0, 0, 0])
            if [kept.events, kept.quantity, kept.amount] != expected:
                daily_problems.append(
                    f"daily usage {kept.account_id} {kept.day} {kept.kind}: kept {plural(kept.events, 'event')}, "
                    f"{kept.quantity} billable, {format_ledger(kept.amount)}; entries give {expected[0]}, "
                    f"{expected[1]}, {format_ledger(expected[2])}"
                )
        daily_problems.extend(f"daily usage {a} {d} {k}: missing" for (a, d, k) in daily)
        report("daily", daily_problems)

        report(
            "first usage",
            [
                f"account {account}: first_usage_at {kept} but earliest usage is {first.get(account)}"
                for account, kept in first_usage_times(session).items()
                if kept != first.get(account)
            ],
        )
        report("charging", recharge_credit_problems(session))
        report("phases", recharge_phase_problems(session))
        report("uniqueness", uniqueness_problems(session))
        report("receipts", receipt_problems(session))
        report("outbox", outbox_problems(session))
        report("reservations", reserved_problems(session))
    return Report(checked, violations)
