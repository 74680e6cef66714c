"""`recharged reconcile`: the processor's payments for our customers, and the money given back since, matched
one to one with the ledger.

Charges. Every PaymentIntent of the customers behind our funding sources created since a date is matched with the
ledger credit whose external id is its id (a recharge or top-up entry, or a manual adjustment that names it:
`recharged adjust --reference pi_...`), and with the recharge it paid (recorded on the recharge, or named in the
payment's metadata). Reported: a succeeded charge without a credit (and when its recharge is still open, that
`recharged recover` will credit it: it must not be credited by hand), a credit without a succeeded charge, a
charge credited twice (a recharge's credit and an adjustment, say), a credit with no recharge, amounts that
differ (the amount charged against the recharge's total; the amount credited against the
recharge's amount), currencies that differ, and a charge whose metadata names another account than the one
credited. A customer whose payments cannot be listed (deleted at the processor) is reported, not taken as one
that paid nothing.

Money given back. Every refund and dispute of those payments' latest charges, every refund and dispute created
since the date, and every ledger reversal since the date are matched by the processor's object id: a succeeded
refund has its `refund` entry (a failed or canceled one none, or its entry and the entry that undid it), a
dispute whose funds were withdrawn its `dispute` entry, reinstated funds their `reinstated` entry, each for the
share of the credit `money.credit_reversed` gives. Reported: a refund or dispute without its reversal, a reversal
without a refund or dispute, and reversals of another amount.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from recharged.errors import PaymentError, TransientPaymentError
from recharged.money import (
    MINOR_EXPONENT,
    Units,
    credit_reversed,
    format_amount,
    format_ledger,
    from_minor_units,
    to_minor_units,
)
from recharged.payments import CustomerRecord, DisputeRecord, PaymentGateway, PaymentRecord, RefundRecord
from recharged.states import REVERSAL_TYPES, EntryType, Phase
from recharged.store.engine import Database
from recharged.store.reads import (
    account_currencies,
    adjustments_referencing,
    credits_for,
    customers_in_use,
    processor_customers,
    recharges_by_id,
    recharges_paid_by,
    reversals_for,
    source_customers,
)

# Charges created this long before `since` are listed too, to match credits posted after `since` (a charge
# still processing at the processor is credited later); only charges from `since` on are reported unmatched.
SLACK = timedelta(days=1)
FAILED_SUFFIX = ":failed"  # the entry that undoes a refund the bank returned: `re_...:failed`


@dataclass(frozen=True, slots=True)
class Credit:
    entry_type: str  # recharge | topup | adjustment (one that names the PaymentIntent)
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
    payment_intent: str | None = None  # recorded once paid
    customer: str | None = None  # the processor's customer of the card it was charged on


@dataclass(frozen=True, slots=True)
class Reversal:
    """A ledger entry that reverses part of a credit: a refund (or the undoing of one), a dispute, reinstated
    funds. `object_id` is the refund's or dispute's id."""

    entry_type: str
    external_id: str
    account_id: str
    payment_intent: str | None
    amount: Units
    occurred_at: datetime

    @property
    def object_id(self) -> str:
        return self.external_id.removesuffix(FAILED_SUFFIX)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    payment_intent: str | None  # None: a problem with a customer, not with one payment
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
    refunded: dict[str, Units] = field(default_factory=dict)  # succeeded refunds of our payments, per currency
    disputed: dict[str, Units] = field(default_factory=dict)  # disputed funds withdrawn and not reinstated
    reversed: dict[str, Units] = field(default_factory=dict)  # taken off balances by those (net of VAT)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        def amounts(values: dict[str, Units]) -> dict[str, str]:
            return {currency: format_ledger(units) for currency, units in sorted(values.items())}

        return {
            "since": self.since.isoformat(),
            "ok": self.ok,
            "customers": self.customers,
            "charges": self.charges,
            "succeeded": self.succeeded,
            "matched": self.matched,
            "charged": amounts(self.charged),
            "credited": amounts(self.credited),
            "refunded": amounts(self.refunded),
            "disputed": amounts(self.disputed),
            "reversed": amounts(self.reversed),
            "problems": [p.as_json() for p in self.problems],
        }


def _units(amount_minor: int, currency: str) -> Units | None:
    try:
        return from_minor_units(amount_minor, currency) if currency in MINOR_EXPONENT else None
    except ValueError:
        return None


def _money(units: Units, currency: str | None) -> str:
    """An amount of the ledger as the currency writes it ('84.00 USD', '1.234 KWD'); 5 decimals when the currency
    is not known."""
    if currency is None or currency not in MINOR_EXPONENT:
        return format_ledger(units)
    return format_amount(units, currency)


def _minor(amount_minor: int, currency: str) -> str:
    """The processor's integer amount as the currency writes it: 10080 USD -> '100.80 USD'."""
    units = _units(amount_minor, currency)
    return f"{amount_minor} {currency} minor units" if units is None else format_amount(units, currency)


def _add(totals: dict[str, Units], currency: str, units: Units) -> None:
    totals[currency] = totals.get(currency, 0) + units


def match(
    charges: Sequence[PaymentRecord],
    credits: Sequence[Credit],
    recharges: Mapping[str, RechargeFacts],
    currencies: Mapping[str, str],
    since: datetime,
    customers: int,
    *,
    named: Mapping[int, RechargeFacts] | None = None,
    refunds: Iterable[RefundRecord] = (),
    disputes: Iterable[DisputeRecord] = (),
    reversals: Sequence[Reversal] = (),
    customer_problems: Sequence[Problem] = (),
    unlisted: Iterable[str] = (),
) -> ReconcileReport:
    """Match the processor's charges with the ledger's credits and our recharges, and the refunds and disputes
    with the ledger's reversals (pure). `recharges` are by PaymentIntent, `named` by id (those a payment's
    metadata names); `currencies` maps the credited accounts to their currency; charges created before `since`
    only serve to match credits. `customer_problems`: customers whose payments could not be listed or that the
    processor deleted, found while listing; the credits of payments of the `unlisted` customers are not
    reported one by one (their customer's problem says they could not be checked)."""
    report = ReconcileReport(since, customers)
    report.problems += customer_problems
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
                _add(report.charged, charge.currency, units)
        if succeeded and recent and found and found[0].account_id in currencies:  # the credits of `charged`
            _add(report.credited, currencies[found[0].account_id], found[0].amount)
        recharge = recharges.get(charge.id) or _named_recharge(charge, named or {})
        problems = _problems(charge, found, recharge, currencies, recent)
        report.matched += succeeded and bool(found) and not problems
        report.problems += problems

    unchecked = set(unlisted)
    for pi, left in sorted(by_intent.items()):
        paid = recharges.get(pi)
        if paid is not None and paid.customer in unchecked:
            continue
        for credit in left:
            if credit.occurred_at >= since:
                report.problems.append(
                    Problem(
                        "credit_without_charge",
                        pi,
                        credit.account_id,
                        f"{credit.entry_type} credit of {_money(credit.amount, currencies.get(credit.account_id))} "
                        f"on {credit.occurred_at:%Y-%m-%d %H:%M} UTC, but our customers have no such payment",
                    )
                )
    report.problems += _reversal_problems(report, refunds, disputes, reversals, recharges, currencies)
    return report


def _named_recharge(charge: PaymentRecord, named: Mapping[int, RechargeFacts]) -> RechargeFacts | None:
    """The recharge a payment's metadata names, when the recharge has not recorded a payment (yet): after a crash,
    or in a database restored from before the payment."""
    hint = charge.metadata.get("recharged_recharge", "")
    found = named.get(int(hint)) if hint.isascii() and hint.isdigit() and len(hint) <= 18 else None
    return found if found is not None and found.payment_intent in (None, charge.id) else None


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

    def credited(c: Credit) -> str:  # in the credited account's currency
        return _money(c.amount, currencies.get(c.account_id, charge.currency))

    if charge.status != "succeeded":
        for credit in found:
            problem(
                "credit_without_charge",
                f"{credit.entry_type} credit of {credited(credit)} on "
                f"{credit.occurred_at:%Y-%m-%d %H:%M} UTC, but the PaymentIntent is {charge.status}",
                credit.account_id,
            )
        return problems
    named = charge.metadata.get("recharged_account")
    recoverable = recharge is not None and Phase(recharge.phase).is_open
    charged = f"{_minor(charge.amount, charge.currency)} charged on {charge.created:%Y-%m-%d %H:%M} UTC"
    if not found:
        if not recent:
            return problems
        if recharge is not None and recoverable:
            problem(
                "recoverable",
                f"{charged}; recharge {recharge.id} is still {recharge.phase}: `recharged recover` will credit it "
                "(do not credit it by hand)",
                recharge.account_id,
            )
            return problems
        if recharge is not None:
            why = f"recharge {recharge.id} is {recharge.phase}"
        elif "recharged_recharge" in charge.metadata:
            why = f"its metadata names recharge {charge.metadata['recharged_recharge']}, which it did not pay"
        else:
            why = "no recharge of ours made it"
        problem("charge_without_credit", f"{charged} and never credited: {why}", named or None)
        return problems

    credit = found[0]
    if len(found) > 1:
        twice = ", ".join(f"{credited(c)} to {c.account_id} ({c.entry_type})" for c in found)
        problem("credited_twice", f"credited {twice}", credit.account_id)
    by_hand = [c for c in found if c.entry_type == EntryType.ADJUSTMENT]
    if by_hand and recharge is not None and recoverable:
        problem(
            "recoverable_and_adjusted",
            f"credited by hand ({credited(by_hand[0])}), but recharge {recharge.id} is still "
            f"{recharge.phase}: `recharged recover` would credit it again; debit the adjustment first",
            credit.account_id,
        )
    if recharge is None:
        if not by_hand:
            problem(
                "no_recharge",
                f"credited {credited(credit)}, but no recharge records this charge",
                credit.account_id,
            )
    else:
        try:
            expected: int | None = to_minor_units(recharge.total, recharge.currency)
        except (KeyError, ValueError):
            expected = None
        if charge.amount != expected:
            problem(
                "amount_mismatch",
                f"charged {_minor(charge.amount, charge.currency)}, but recharge {recharge.id}'s total is "
                f"{_money(recharge.total, recharge.currency)}",
                credit.account_id,
            )
        if credit.amount != recharge.amount:
            problem(
                "amount_mismatch",
                f"credited {credited(credit)}, but recharge {recharge.id} credits "
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


def _reversal_problems(
    report: ReconcileReport,
    refunds: Iterable[RefundRecord],
    disputes: Iterable[DisputeRecord],
    reversals: Sequence[Reversal],
    recharges: Mapping[str, RechargeFacts],
    currencies: Mapping[str, str],
) -> list[Problem]:
    """Each refund and dispute of a payment of ours against its ledger reversals, and every reversal against the
    refund or dispute it names (`currencies`: the reversed accounts'). Adds the amounts given back and reversed to
    the report."""
    entries: dict[tuple[str, str], list[Reversal]] = {}
    for entry in reversals:
        entries.setdefault((entry.entry_type, entry.object_id), []).append(entry)
    problems: list[Problem] = []

    def check(
        kind: str, entry_type: str, obj: RefundRecord | DisputeRecord, expected: Units, what: str, recharge: Any
    ) -> None:
        mine = entries.pop((entry_type, obj.id), [])
        actual = sum(e.amount for e in mine)
        currency = recharge.currency if recharge else obj.currency
        if mine:
            _add(report.reversed, currency, -actual)
        if actual == expected:
            return
        account = mine[0].account_id if mine else (recharge.account_id if recharge else None)
        if not mine:
            detail = f"{what}, but the ledger has no {entry_type} entry for it (`recharged events list --failing`)"
            problems.append(Problem(f"{kind}_without_reversal", obj.payment_intent, account, detail))
        elif expected == 0:
            detail = f"the ledger reverses {_money(actual, currency)} for {obj.id}, but {what}"
            problems.append(Problem(f"reversal_without_{kind}", obj.payment_intent, account, detail))
        else:
            detail = f"{what}: {_money(expected, currency)} to reverse, but the ledger has {_money(actual, currency)}"
            problems.append(Problem("reversal_mismatch", obj.payment_intent, account, detail))

    def share(recharge: RechargeFacts | None, amount_minor: int, currency: str) -> Units | None:
        units = _units(amount_minor, currency)
        if recharge is None or units is None or recharge.currency != currency or recharge.total <= 0:
            return None
        return credit_reversed(units, recharge.total, recharge.amount)

    for refund in {r.id: r for r in refunds}.values():
        recharge = recharges.get(refund.payment_intent or "")
        part = share(recharge, refund.amount, refund.currency)
        if part is None and (EntryType.REFUND, refund.id) not in entries:
            continue  # not a payment of ours, and nothing in the ledger says otherwise
        given_back = refund.status == "succeeded"
        if given_back:
            _add(report.refunded, refund.currency, _units(refund.amount, refund.currency) or 0)
        what = f"refund {refund.id} of {_minor(refund.amount, refund.currency)} is {refund.status}"
        check("refund", EntryType.REFUND, refund, -(part or 0) if given_back else 0, what, recharge)

    for dispute in {d.id: d for d in disputes}.values():
        recharge = recharges.get(dispute.payment_intent or "")
        part = share(recharge, dispute.amount, dispute.currency)
        known = any((t, dispute.id) in entries for t in (EntryType.DISPUTE, EntryType.REINSTATED))
        if part is None and not known:
            continue
        amount = _units(dispute.amount, dispute.currency) or 0
        held = dispute.funds_withdrawn and not dispute.funds_reinstated
        if held:
            _add(report.disputed, dispute.currency, amount)
        state = f"dispute {dispute.id} of {_minor(dispute.amount, dispute.currency)} ({dispute.status})"
        withdrawn = f"{state} {'withdrew' if dispute.funds_withdrawn else 'has not withdrawn'} its funds"
        check(
            "dispute", EntryType.DISPUTE, dispute, -(part or 0) if dispute.funds_withdrawn else 0, withdrawn, recharge
        )
        reinstated = f"{state} {'had' if dispute.funds_reinstated else 'has not had'} its funds reinstated"
        check(
            "dispute",
            EntryType.REINSTATED,
            dispute,
            (part or 0) if dispute.funds_reinstated else 0,
            reinstated,
            recharge,
        )

    for (entry_type, object_id), left in sorted(entries.items()):
        kind = "refund" if entry_type == EntryType.REFUND else "dispute"
        total = sum(e.amount for e in left)
        problems.append(
            Problem(
                f"reversal_without_{kind}",
                left[0].payment_intent,
                left[0].account_id,
                f"the ledger reverses {_money(total, currencies.get(left[0].account_id))} for {entry_type} "
                f"{object_id}, but the processor has no "
                f"such {kind}",
            )
        )
    return problems


def reconcile(db: Database, gateway: PaymentGateway, since: datetime) -> ReconcileReport:
    """List our customers' payments at the processor since `since`, and the refunds and disputes since, and
    match them with the ledger."""
    with db.reading() as session:
        customers = processor_customers(session)
        in_use = customers_in_use(session, since - SLACK)
    charges: dict[str, PaymentRecord] = {}
    customer_problems: list[Problem] = []
    unlisted: set[str] = set()
    window = f"{since - SLACK:%Y-%m-%d}"
    for customer in customers:
        why = None
        try:
            charges.update((c.id, c) for c in gateway.list_payments(customer, since - SLACK))
        except (PaymentError, TransientPaymentError) as exc:  # not "no payments": the admin must know
            unlisted.add(customer)
            why = f"its payments cannot be listed ({exc}), so they are not checked"
        if customer not in in_use:
            continue  # no usable card of it, and not charged since: nothing of it to check
        try:
            found = gateway.customer(customer)
        except (PaymentError, TransientPaymentError):
            found = CustomerRecord(customer, deleted=False)  # cannot tell now; a listing failure is still reported
        if found is None or found.deleted:
            gone = "was deleted at the processor" if found else "is unknown to the processor"
            detail = f"customer {customer} {gone}, but we hold a usable card of it or charged it since {window}"
            customer_problems.append(
                Problem("customer_deleted", None, None, f"{detail}; {why or 'its cards cannot be charged'}")
            )
        elif why is not None:
            customer_problems.append(Problem("customer_unlistable", None, None, f"customer {customer}: {why}"))

    refunds: dict[str, RefundRecord] = {}
    disputes: dict[str, DisputeRecord] = {}
    for charge in charges.values():
        if charge.latest_charge is not None:
            refunds.update((r.id, r) for r in charge.latest_charge.refunds)
            disputes.update((d.id, d) for d in charge.latest_charge.disputes)
    recent_refunds, recent_disputes = gateway.recent_reversals(since - SLACK)
    refunds.update((r.id, r) for r in recent_refunds)
    disputes.update((d.id, d) for d in recent_disputes)

    with db.reading() as session:
        credited = [
            Credit(e.entry_type, e.account_id, e.reference or e.external_id, e.amount, e.occurred_at)
            for e in [
                *credits_for(session, since, list(charges)),
                *adjustments_referencing(session, since, list(charges)),
            ]
        ]
        entries = [
            Reversal(e.entry_type, e.external_id, e.account_id, e.payment_intent, e.amount, e.occurred_at)
            for e in reversals_for(session, since, [*refunds, *disputes])
        ]
    # Reversals whose refund or dispute was not listed (of an older payment): asked for one by one.
    for entry in entries:
        if entry.object_id in refunds or entry.object_id in disputes:
            continue
        if entry.entry_type == EntryType.REFUND:
            refund = gateway.refund(entry.object_id)
            if refund is not None:
                refunds[refund.id] = refund
        elif entry.entry_type in REVERSAL_TYPES:
            dispute = gateway.dispute(entry.object_id)
            if dispute is not None:
                disputes[dispute.id] = dispute

    with db.reading() as session:
        intents = [*charges, *(c.payment_intent for c in credited)]
        intents += [r.payment_intent for r in refunds.values() if r.payment_intent]
        intents += [d.payment_intent for d in disputes.values() if d.payment_intent]
        paid = recharges_paid_by(session, intents)
        customer_of = source_customers(session, [r.source_id for r in paid.values() if r.source_id is not None])
        recharges = {pi: _facts(r, customer_of) for pi, r in paid.items()}
        hints = [c.metadata.get("recharged_recharge", "") for c in charges.values()]
        ids = [int(h) for h in hints if h.isascii() and h.isdigit() and len(h) <= 18]
        named = {i: _facts(r, {}) for i, r in recharges_by_id(session, ids).items()}
        reversed_or_credited = {c.account_id for c in credited} | {e.account_id for e in entries}
        currencies = account_currencies(session, sorted(reversed_or_credited))
    return match(
        list(charges.values()),
        credited,
        recharges,
        currencies,
        since,
        len(customers),
        named=named,
        refunds=refunds.values(),
        disputes=disputes.values(),
        reversals=entries,
        customer_problems=customer_problems,
        unlisted=unlisted,
    )


def _facts(r: Any, customer_of: Mapping[int, str]) -> RechargeFacts:
    customer = customer_of.get(r.source_id) if r.source_id is not None else None
    return RechargeFacts(r.id, r.account_id, r.phase, r.currency, r.amount, r.total, r.payment_intent, customer)
