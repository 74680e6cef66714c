"""`recharged reconcile`: the processor's payments for our customers, matched one to one with the ledger.

Every PaymentIntent of the customers behind our funding sources created since a date is matched with the
ledger credit (a recharge or top-up entry) whose external id is its id, and with the recharge it paid.
Reported: a succeeded charge without a credit, a credit without a succeeded charge, a charge credited twice,
a credit with no recharge, amounts that differ (the amount charged against the recharge's total in minor
units; the amount credited against the recharge's amount), currencies that differ, and a charge whose
metadata names an account other than the one credited.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from recharged.money import MINOR_EXPONENT, Units, format_ledger, from_minor_units, to_minor_units
from recharged.payments import PaymentGateway, PaymentRecord
from recharged.store.engine import Database
from recharged.store.reads import account_currencies, credits_for, processor_customers, recharges_paid_by

# Charges created this long before `since` are listed too, to match credits posted after `since` (a charge
# still processing at the processor is credited later); only charges from `since` on are reported unmatched.
SLACK = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Credit:
    entry_type: str  # recharge | topup
    account_id: str
    payment_intent: str
    amount: Units
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class RechargeFacts:
    id: int
    account_id: str
    phase: str
    currency: str
    amount: Units  # to credit (net)
    total: Units  # to charge


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    payment_intent: str
    account: str | None
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "payment_intent": self.payment_intent,
            "account": self.account,
            "detail": self.detail,
        }


@dataclass
class ReconcileReport:
    since: datetime
    customers: int
    charges: int = 0  # PaymentIntents created since `since`, whatever their status
    succeeded: int = 0
    matched: int = 0  # succeeded charges with exactly one credit and no problem
    charged: dict[str, Units] = field(default_factory=dict)  # succeeded charges per currency
    credited: dict[str, Units] = field(default_factory=dict)  # their credits per account currency
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "ok": self.ok,
            "customers": self.customers,
            "charges": self.charges,
            "succeeded": self.succeeded,
            "matched": self.matched,
            "charged": {currency: format_ledger(units) for currency, units in sorted(self.charged.items())},
            "credited": {currency: format_ledger(units) for currency, units in sorted(self.credited.items())},
            "problems": [p.as_json() for p in self.problems],
        }


def _units(amount_minor: int, currency: str) -> Units | None:
    return from_minor_units(amount_minor, currency) if currency in MINOR_EXPONENT else None


def _money(units: Units, currency: str) -> str:
    return f"{format_ledger(units)} {currency}"


def match(
    charges: Sequence[PaymentRecord],
    credits: Sequence[Credit],
    recharges: Mapping[str, RechargeFacts],
    currencies: Mapping[str, str],
    since: datetime,
    customers: int,
) -> ReconcileReport:
    """Match the processor's charges with the ledger's credits and our recharges (pure). `currencies` maps the
    credited accounts to their currency; charges created before `since` only serve to match credits."""
    report = ReconcileReport(since, customers)
    by_intent: dict[str, list[Credit]] = {}
    for credit in credits:
        by_intent.setdefault(credit.payment_intent, []).append(credit)

    for charge in sorted(charges, key=lambda c: (c.created, c.id)):
        found = by_intent.pop(charge.id, [])
        recent = charge.created >= since
        succeeded = charge.status == "succeeded"
        report.charges += recent
        if succeeded and recent:
            report.succeeded += 1
            units = _units(charge.amount, charge.currency)
            if units is not None:
                report.charged[charge.currency] = report.charged.get(charge.currency, 0) + units
        if succeeded and found and found[0].account_id in currencies:
            currency = currencies[found[0].account_id]
            report.credited[currency] = report.credited.get(currency, 0) + found[0].amount
        problems = _problems(charge, found, recharges.get(charge.id), currencies, recent)
        report.matched += succeeded and bool(found) and not problems
        report.problems += problems

    for pi, left in sorted(by_intent.items()):
        for credit in left:
            if credit.occurred_at >= since:
                report.problems.append(
                    Problem(
                        "credit_without_charge",
                        pi,
                        credit.account_id,
                        f"{credit.entry_type} credit of {format_ledger(credit.amount)} on "
                        f"{credit.occurred_at:%Y-%m-%d %H:%M} UTC, but our customers have no such payment",
                    )
                )
    return report


def _problems(
    charge: PaymentRecord,
    found: Sequence[Credit],
    recharge: RechargeFacts | None,
    currencies: Mapping[str, str],
    recent: bool,
) -> list[Problem]:
    """What is wrong with one charge, its credits and its recharge."""
    problems: list[Problem] = []

    def problem(kind: str, detail: str, account: str | None) -> None:
        problems.append(Problem(kind, charge.id, account, detail))

    if charge.status != "succeeded":
        for credit in found:
            problem(
                "credit_without_charge",
                f"{credit.entry_type} credit of {format_ledger(credit.amount)} on "
                f"{credit.occurred_at:%Y-%m-%d %H:%M} UTC, but the PaymentIntent is {charge.status}",
                credit.account_id,
            )
        return problems
    named = charge.metadata.get("recharged_account")
    if not found:
        if not recent:
            return problems
        if recharge is not None:
            why = f"recharge {recharge.id} is {recharge.phase}"
            why += "; `recharged recover` credits it" if recharge.phase == "paid" else ""
        elif "recharged_recharge" in charge.metadata:
            why = f"its metadata names recharge {charge.metadata['recharged_recharge']}, which it did not pay"
        else:
            why = "no recharge of ours made it"
        problem(
            "charge_without_credit",
            f"{charge.amount} {charge.currency} minor units charged on {charge.created:%Y-%m-%d %H:%M} UTC and "
            f"never credited: {why}",
            named or (recharge.account_id if recharge else None),
        )
        return problems

    credit = found[0]
    if len(found) > 1:
        credited = ", ".join(f"{format_ledger(c.amount)} to {c.account_id} ({c.entry_type})" for c in found)
        problem("credited_twice", f"credited {credited}", credit.account_id)
    if recharge is None:
        problem("no_recharge", f"credited {format_ledger(credit.amount)}, but no recharge records this charge",
                credit.account_id)  # fmt: skip
    else:
        try:
            expected: int | None = to_minor_units(recharge.total, recharge.currency)
        except (KeyError, ValueError):
            expected = None
        if charge.amount != expected:
            problem(
                "amount_mismatch",
                f"charged {charge.amount} {charge.currency} minor units, but recharge {recharge.id}'s total is "
                f"{_money(recharge.total, recharge.currency)}",
                credit.account_id,
            )
        if credit.amount != recharge.amount:
            problem(
                "amount_mismatch",
                f"credited {format_ledger(credit.amount)}, but recharge {recharge.id} credits "
                f"{_money(recharge.amount, recharge.currency)}",
                credit.account_id,
            )
    others = {c for c in (recharge.currency if recharge else None, currencies.get(credit.account_id)) if c}
    if others - {charge.currency}:
        problem(
            "currency_mismatch",
            f"charged in {charge.currency}, but the recharge or account {credit.account_id} is in "
            + ", ".join(sorted(others - {charge.currency})),
            credit.account_id,
        )
    if named is not None and named != credit.account_id:
        problem(
            "account_mismatch",
            f"the charge's metadata names account {named}, but account {credit.account_id} was credited",
            credit.account_id,
        )
    return problems


def reconcile(db: Database, gateway: PaymentGateway, since: datetime) -> ReconcileReport:
    """List our customers' payments at the processor since `since` and match them with the ledger."""
    with db.reading() as session:
        customers = processor_customers(session)
    charges: dict[str, PaymentRecord] = {}
    for customer in customers:
        charges.update((c.id, c) for c in gateway.list_payments(customer, since - SLACK))
    with db.reading() as session:
        credits = [
            Credit(e.entry_type, e.account_id, e.external_id, e.amount, e.occurred_at)
            for e in credits_for(session, since, list(charges))
        ]
        paid = recharges_paid_by(session, [*charges, *(c.payment_intent for c in credits)])
        recharges = {
            pi: RechargeFacts(r.id, r.account_id, r.phase, r.currency, r.amount, r.total) for pi, r in paid.items()
        }
        currencies = account_currencies(session, sorted({c.account_id for c in credits}))
    return match(list(charges.values()), credits, recharges, currencies, since, len(customers))
