"""Monthly statements: on the first day of each month (UTC) every account gets a statement of the previous
calendar month, kept as issued (one per account and month) and emailed through the outbox.

A statement reads the per-day usage totals for its products (one row per usage kind: quantity, unit, amount),
the ledger's other entries for credits and charges (recharges, purchases, adjustments) and for refunds and
disputes (each refund, each dispute's withdrawn or reinstated funds, on its own line with the receipt of the
payment it concerns), and the balance at the start of the month from both; closing = opening - usage + credits
and charges + refunds and disputes, exactly, in Units. Amounts are shown to the minor unit; the ledger keeps 5
decimals, which the statement says.
"""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from recharged.clock import Clock, midnight
from recharged.config import Settings, TimeRateSettings
from recharged.errors import InputError, NotFoundError
from recharged.mail import webhooks
from recharged.mail.outbox import enqueue
from recharged.money import MINOR_EXPONENT, Units, format_ledger, to_display_decimal
from recharged.states import REVERSAL_TYPES, EntryType
from recharged.store.engine import Database, insert_once
from recharged.store.models import Account, DailyUsage, Rate, Receipt, Recharge, Statement
from recharged.store.reads import ledger_sum_before, non_usage_entries

PRODUCT_LABELS = {
    "dialer": "Dialer minutes",
    "outbound": "Outbound call minutes",
    "inbound": "Inbound call minutes",
    "recording": "Call recording minutes",
    "sms_out": "SMS sent",
    "sms_in": "SMS received",
    "mms_out": "MMS sent",
    "lookup": "Number lookups",
    "ai_voice_detection": "AI voice detection",
}
CREDIT_LABELS = {"opening": "Opening balance brought over", "recharge": "Automatic recharge", "topup": "Purchase"}
REVERSAL_LABELS = {
    EntryType.REFUND: "Refund to your card",
    EntryType.DISPUTE: "Disputed payment: funds taken back by your bank",
    EntryType.REINSTATED: "Dispute decided for us: funds returned",
}
REFUND_RETURNED = "Refund returned by your bank"
ROUNDING_NOTE = (
    "Amounts are shown rounded to the {unit}. Your balance is kept to 5 decimal places (usage is priced in "
    "fractions of a {unit}), so a total may differ by a {unit} from the sum of the rounded lines above it."
)


def parse_month(text: str) -> date:
    """'2026-11' -> date(2026, 11, 1)."""
    try:
        year, month = (int(part) for part in text.strip().split("-"))
        return date(year, month, 1)
    except ValueError:
        raise InputError(f"month {text!r} must be YYYY-MM, e.g. 2026-11") from None


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def previous_month(month: date) -> date:
    return date(month.year - (month.month == 1), (month.month - 2) % 12 + 1, 1)


def _minor_decimal(units: Units, currency: str) -> Decimal:
    return to_display_decimal(units, currency)


def build_statement(
    session: Session, settings: Settings, account: Account, month: date, at: datetime
) -> dict[str, Any]:
    """The statement of `account` for the calendar month starting `month`, as of `at`: JSON values, amounts
    in Units (the templates and the CLI round them)."""
    start, end = month, next_month(month)
    currency = account.currency
    opening = ledger_sum_before(session, account.id, start)

    products: list[dict[str, Any]] = []
    usage_rows = session.execute(
        select(DailyUsage.kind, func.sum(DailyUsage.events), func.sum(DailyUsage.quantity), func.sum(DailyUsage.amount))
        .where(DailyUsage.account_id == account.id, DailyUsage.day >= start, DailyUsage.day < end)
        .group_by(DailyUsage.kind)
        .order_by(DailyUsage.kind)
    ).all()
    for kind, events, quantity, amount in usage_rows:
        shown, unit = _quantity(session, settings, account.plan, kind, int(quantity))
        products.append(
            {
                "kind": kind,
                "label": PRODUCT_LABELS.get(kind, kind.replace("_", " ").capitalize()),
                "events": int(events),
                "billable": int(quantity),
                "quantity": shown,
                "unit": unit,
                "amount": int(amount),
            }
        )
    usage_total = sum(p["amount"] for p in products)

    entries = non_usage_entries(session, account.id, midnight(start), midnight(end))
    # The receipt of the payment each credit is, or each refund or dispute reverses.
    paid_by = {e.payment_intent if e.entry_type in REVERSAL_TYPES else e.external_id for e in entries}
    receipts = dict(
        session.execute(
            select(Recharge.payment_intent, Receipt.number)
            .join(Receipt, Receipt.recharge_id == Recharge.id)
            .where(Recharge.payment_intent.in_(sorted(p for p in paid_by if p)))
        ).all()
    )
    credits: list[dict[str, Any]] = []
    reversals: list[dict[str, Any]] = []
    for entry in entries:
        reversal = entry.entry_type in REVERSAL_TYPES
        if entry.entry_type == EntryType.ADJUSTMENT:
            description = "Credit adjustment" if entry.amount >= 0 else "Debit adjustment"
        elif entry.entry_type == EntryType.REFUND and entry.external_id.endswith(":failed"):
            description = REFUND_RETURNED
        elif reversal:
            description = REVERSAL_LABELS[EntryType(entry.entry_type)]
        else:
            description = CREDIT_LABELS.get(entry.entry_type, entry.entry_type.capitalize())
        number = receipts.get(entry.payment_intent if reversal else entry.external_id)
        line = {
            "date": entry.occurred_at.isoformat(),
            "type": entry.entry_type,
            "description": f"{description}, receipt {number}" if number else description,
            "receipt": number,
            "amount": int(entry.amount),
        }
        (reversals if reversal else credits).append(line | ({"reference": entry.external_id} if reversal else {}))
    credits_total = sum(c["amount"] for c in credits)
    reversals_total = sum(r["amount"] for r in reversals)
    minor_name = "cent" if MINOR_EXPONENT[currency] == 2 else f"smallest unit of {currency}"
    if MINOR_EXPONENT[currency] == 0:
        minor_name = f"whole {currency}"
    return {
        "account": {"id": account.id, "email": account.email},
        "currency": currency,
        "month": f"{start:%Y-%m}",
        "period_label": f"{start:%B %Y}",
        "start": start.isoformat(),
        "last_day": date.fromordinal(end.toordinal() - 1).isoformat(),
        "issued_at": at.isoformat(),
        "partial": at < midnight(end),
        "opening": opening,
        "products": products,
        "usage_total": usage_total,
        "credits": credits,
        "credits_total": credits_total,
        "reversals": reversals,
        "reversals_total": reversals_total,
        "closing": opening - usage_total + credits_total + reversals_total,
        "rounding_note": ROUNDING_NOTE.format(unit=minor_name),
    }


def _quantity(session: Session, settings: Settings, plan: str, kind: str, billable: int) -> tuple[str, str]:
    """How a product's billable quantity reads: minutes for time-based kinds, units for count-based ones."""
    plan_settings = settings.plans.get(plan)
    rate = plan_settings.rates.get(kind) if plan_settings is not None else None
    if rate is not None:
        measure, unit = ("time", "min") if isinstance(rate, TimeRateSettings) else ("count", rate.unit)
    else:  # a kind the plan no longer has: the rate snapshot that priced it says what it measured
        known = session.execute(select(Rate.measure, Rate.unit).where(Rate.plan == plan, Rate.kind == kind)).first()
        measure, unit = (known.measure, known.unit) if known else ("count", "unit")
    if measure == "time":
        minutes = Decimal(billable) / 60
        return (f"{billable // 60:,}" if billable % 60 == 0 else f"{minutes:,.2f}"), "min"
    return f"{billable:,}", unit if billable == 1 or unit.endswith("s") else f"{unit}s"


def statement_key(account_id: str, month: date) -> str:
    return f"statement:{account_id}:{month:%Y-%m}"


def issue_monthly_statements(db: Database, settings: Settings, clock: Clock, at: datetime | None = None) -> int:
    """Issue the statement of the month before `at` (default: now) to every account that existed during it and
    was not closed before it, and queue its email. Idempotent: an account that has its statement for that month
    is skipped, so the job can run again (after a crash, or on several instances). Returns how many were issued."""
    at = at or clock.now()
    month = previous_month(at.date().replace(day=1))
    month_end = midnight(next_month(month))
    with db.transaction() as session:
        done = select(Statement.account_id).where(Statement.month == month)
        pending = list(
            session.scalars(
                select(Account.id)
                .where(
                    Account.created_at < month_end,
                    Account.id.not_in(done),
                    # a closed account's last statement is of the month it was closed in
                    Account.closed_at.is_(None) | (Account.closed_at >= midnight(month)),
                )
                .order_by(Account.id)
            )
        )
    issued = 0
    for account_id in pending:
        with db.transaction() as session:
            account = session.get(Account, account_id)
            assert account is not None
            content = build_statement(session, settings, account, month, at)
            inserted = insert_once(
                session,
                Statement,
                {
                    "account_id": account_id,
                    "month": month,
                    "issued_at": at,
                    "currency": account.currency,
                    "opening_balance": content["opening"],
                    "closing_balance": content["closing"],
                    "content": content,
                },
                ["account_id", "month"],
            )
            if inserted:
                enqueue(
                    session,
                    key=statement_key(account_id, month),
                    kind="statement",
                    to=account.email,
                    context=content,
                    at=at,
                    account_id=account_id,
                )
                webhooks.statement_issued(session, account, month, content, at)
                issued += 1
    return issued


def statement_for(db: Database, settings: Settings, account_id: str, month: date, at: datetime) -> dict[str, Any]:
    """The statement as issued, or, for a month not issued yet, as it stands at `at`."""
    with db.transaction() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFoundError(f"no account {account_id!r}")
        stored = session.get(Statement, (account_id, month))
        if stored is not None:
            return stored.content
        if midnight(month) > at:
            raise InputError(f"{month:%Y-%m} has not started yet")
        return build_statement(session, settings, account, month, at)


# --- output formats -------------------------------------------------------------------------------------------


def as_json(content: dict[str, Any]) -> dict[str, Any]:
    """Amounts as decimal strings: `amount` rounded to the minor unit as shown, `amount_exact` to 5 decimals."""
    currency = content["currency"]

    def money(units: Units) -> dict[str, str]:
        return {"amount": str(_minor_decimal(units, currency)), "amount_exact": format_ledger(units)}

    return {
        "account": content["account"]["id"],
        "email": content["account"]["email"],
        "currency": currency,
        "month": content["month"],
        "start": content["start"],
        "last_day": content["last_day"],
        "issued_at": content["issued_at"],
        "partial": content["partial"],
        "opening_balance": money(content["opening"]),
        "products": [
            {k: p[k] for k in ("kind", "label", "events", "quantity", "unit")} | money(p["amount"])
            for p in content["products"]
        ],
        "usage_total": money(content["usage_total"]),
        "credits": [
            {k: c[k] for k in ("date", "type", "description", "receipt")} | money(c["amount"])
            for c in content["credits"]
        ],
        "credits_total": money(content["credits_total"]),
        "reversals": [
            {k: r[k] for k in ("date", "type", "description", "receipt", "reference")} | money(r["amount"])
            for r in content.get("reversals", [])
        ],
        "reversals_total": money(content.get("reversals_total", 0)),
        "closing_balance": money(content["closing"]),
        "note": content["rounding_note"],
    }


CSV_COLUMNS = ("section", "date", "description", "quantity", "unit", "amount", "amount_exact")


def as_csv(content: dict[str, Any]) -> str:
    """One row per line of the statement, with the opening and closing balance and the totals."""
    currency = content["currency"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def row(section: str, day: str, description: str, quantity: str, unit: str, units: Units) -> None:
        writer.writerow(
            [section, day, description, quantity, unit, _minor_decimal(units, currency), format_ledger(units)]
        )

    row("opening_balance", content["start"], "Opening balance", "", "", content["opening"])
    for p in content["products"]:
        row("usage", "", p["label"], p["quantity"], p["unit"], -p["amount"])
    row("usage_total", "", "Total usage", "", "", -content["usage_total"])
    for c in content["credits"]:
        row("credit", c["date"][:10], c["description"], "", "", c["amount"])
    row("credits_total", "", "Total credits and charges", "", "", content["credits_total"])
    for r in content.get("reversals", []):
        row("reversal", r["date"][:10], r["description"], "", "", r["amount"])
    if content.get("reversals"):
        row("reversals_total", "", "Total refunds and disputes", "", "", content["reversals_total"])
    row("closing_balance", content["last_day"], "Closing balance", "", "", content["closing"])
    return buffer.getvalue()
