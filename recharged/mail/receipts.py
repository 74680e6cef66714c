"""Credit receipts: one per credited recharge, numbered per issuer with no gaps, written with the credit.

`issue_receipt` runs inside the transaction that posts the ledger credit: it takes the next number from the
issuer's counter row (locked until that transaction ends, so a rollback gives the number back), records what
the receipt shows as it is at that moment (business details, card, new balance, the reason in plain words),
and puts the email in the outbox. The receipt is unique per recharge, its number unique per issuer. Every
receipt of an issuer waits for its counter row, so the number is taken last: the transaction's other writes
and the receipt's content come first, and only the rows that carry the number follow it before the commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import String, func, literal, select
from sqlalchemy.orm import Session

from recharged.balance import DecisionInputs, stored_mismatches
from recharged.clock import Clock
from recharged.config import Settings, TimeRateSettings
from recharged.errors import ConflictError, NotFoundError
from recharged.mail import webhooks
from recharged.mail.outbox import enqueue
from recharged.mail.templating import common_context, render
from recharged.money import CURRENCIES, Units, format_customer, parse_amount
from recharged.store.engine import Database
from recharged.store.ledger import next_receipt_number
from recharged.store.models import Account, FundingSource, OutboxMessage, Receipt, ReceiptCounter, Recharge


def receipt_number(issuer: str, seq: int) -> str:
    return f"{issuer}-{seq:06d}"


def receipt_key(number: str) -> str:
    """The outbox key of a receipt's email (its Message-ID derives from it)."""
    return f"receipt:{number}"


def issue_receipt(
    session: Session, settings: Settings, recharge: Recharge, at: datetime, *, balance_after: Units
) -> Receipt:
    """Number and record the receipt of a recharge credited in this transaction, and queue its email.
    `balance_after`: the balance the credit left (the caller posted it). The account and the card are read
    through the session (`lock_recharge_with` has loaded them: no statement)."""
    account = session.get(Account, recharge.account_id)
    source = session.get(FundingSource, recharge.source_id) if recharge.source_id is not None else None
    assert account is not None
    assert source is not None
    assert recharge.payment_intent is not None
    issuer = settings.receipts.issuer
    content: dict[str, Any] = {
        "number": None,  # below, once taken
        "issued_at": at.isoformat(),
        "kind": recharge.kind,
        "copy": False,
        **common_context(settings),
        "account": {"id": account.id, "email": account.email},
        "currency": recharge.currency,
        "amount": recharge.amount,
        "vat": recharge.vat,
        "vat_percent": str(recharge.vat_percent),
        "total": recharge.total,
        "card": {"brand": source.brand, "last4": source.last4},
        "payment_reference": recharge.payment_intent,
        "balance_after": balance_after,
        **_minutes(settings, account.plan, balance_after),
        "reason": _reason(recharge) if recharge.kind == "auto" else None,
        "processor_minimum": _processor_minimum(recharge),
    }
    session.flush()  # the transaction's other writes, before the counter row is locked
    seq = next_receipt_number(session, issuer)
    number = content["number"] = receipt_number(issuer, seq)
    receipt = Receipt(
        number=number,
        issuer=issuer,
        seq=seq,
        recharge_id=recharge.id,
        account_id=account.id,
        kind=recharge.kind,
        issued_at=at,
        currency=recharge.currency,
        amount=recharge.amount,
        vat=recharge.vat,
        total=recharge.total,
        balance_after=balance_after,
        payment_reference=recharge.payment_intent,
        content=content,
    )
    session.add(receipt)
    session.flush()
    enqueue(
        session,
        key=receipt_key(number),
        kind="receipt",
        to=account.email,
        context=content,
        at=at,
        account_id=account.id,
    )
    webhooks.recharge_succeeded(session, recharge, receipt, at)
    return receipt


def _minutes(settings: Settings, plan: str, balance: Units) -> dict[str, Any]:
    """About how many minutes of the configured kind the balance buys at the plan's price per minute."""
    kind = settings.receipts.minutes_kind
    plan_settings = settings.plans.get(plan)
    rate = plan_settings.rates.get(kind) if plan_settings is not None else None
    if not isinstance(rate, TimeRateSettings) or rate.price_per_minute <= 0 or balance <= 0:
        return {"minutes": None, "minutes_label": None, "price_per_minute": None}
    price = parse_amount(rate.price_per_minute)
    return {
        "minutes": balance // price,
        "minutes_label": f"{kind.replace('_', ' ')} minutes",
        "price_per_minute": price,
    }


def _reason(recharge: Recharge) -> dict[str, Any] | None:
    """The figures behind an automatic recharge, as its decision kept them, and in plain words each floor or cap
    that changed the amount: nothing here is derived again from today's settings or data."""
    stored = recharge.decision
    if stored is None:
        return None
    inputs = DecisionInputs.from_json(stored["inputs"])
    currency, policy = recharge.currency, inputs.policy

    def money(units: Units) -> str:
        return format_customer(units, currency)

    notes = []
    if stored["threshold"] > stored["nominal_threshold"]:
        notes.append(f"Your balance is always kept at or above {money(stored['threshold'])}, the least we keep.")
    if stored["recharge_amount"] > stored["nominal_recharge"]:
        notes.append(f"The smallest automatic recharge is {money(stored['recharge_amount'])}.")
    added = f"This time we added {money(recharge.amount)}"
    limited_by = stored.get("limited_by")
    if limited_by == "shortfall":
        notes.append(f"{added}, to bring your balance of {money(inputs.balance)} back above the least we keep.")
    elif limited_by == "max_recharge" and policy.max_recharge is not None:
        notes.append(f"{added}: one automatic recharge charges your card at most {money(policy.max_recharge)}.")
    elif limited_by in ("max_charged_per_day", "max_charged_per_30_days"):
        cap, spent, span = (
            (policy.max_charged_per_day, inputs.charged_last_day, "24 hours")
            if limited_by == "max_charged_per_day"
            else (policy.max_charged_per_30_days, inputs.charged_last_30_days, "30 days")
        )
        notes.append(
            f"{added}: your card is charged at most {money(cap or 0)} in any {span}, and {money(spent)} "
            "had been charged already."
        )
    elif limited_by == "processor_maximum":
        notes.append(f"{added}, the most our card processor accepts in one payment.")
    return {
        "window_days": stored["history_days"],
        "average_daily": stored["average_daily"],
        "threshold_days": policy.threshold_days,
        "threshold": stored["nominal_threshold"],
        "recharge_days": policy.recharge_days,
        "recharge_amount": stored["nominal_recharge"],
        "notes": notes,
    }


def _processor_minimum(recharge: Recharge) -> Units | None:
    """The processor's minimum charge when this automatic recharge was raised to it (its decision says so)."""
    if recharge.decision is None or recharge.decision.get("limited_by") != "processor_minimum":
        return None
    return CURRENCIES[recharge.currency].minimum_units


# --- reading and re-sending -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    number: str
    issued_at: datetime
    kind: str
    currency: str
    amount: Units
    vat: Units
    vat_percent: Decimal
    total: Units
    card: str
    payment_reference: str
    email_status: str | None  # the outbox status of the receipt's email


def list_receipts(db: Database, account_id: str) -> list[ReceiptRow]:
    """An account's receipts, oldest first, with the delivery status of each email."""
    with db.transaction() as session:
        if session.get(Account, account_id) is None:
            raise NotFoundError(f"no account {account_id!r}")
        rows = session.execute(
            select(Receipt, OutboxMessage.status)
            .outerjoin(OutboxMessage, OutboxMessage.key == literal("receipt:", String) + Receipt.number)
            .where(Receipt.account_id == account_id)
            .order_by(Receipt.issuer, Receipt.seq)
        ).all()
        return [
            ReceiptRow(
                r.number,
                r.issued_at,
                r.kind,
                r.currency,
                r.amount,
                r.vat,
                Decimal(r.content["vat_percent"]),
                r.total,
                f"{r.content['card']['brand']} ...{r.content['card']['last4']}",
                r.payment_reference,
                status,
            )
            for r, status in rows
        ]


def get_receipt(db: Database, number: str) -> Receipt:
    with db.transaction() as session:
        receipt = session.scalars(select(Receipt).where(Receipt.number == number.strip())).one_or_none()
        if receipt is None:
            raise NotFoundError(f"no receipt {number!r}")
        return receipt


def receipt_text(settings: Settings, receipt: Receipt) -> str:
    """The receipt as its email's text part shows it."""
    return render(settings, "receipt", receipt.content).text


def resend_copy(db: Database, clock: Clock, number: str) -> int:
    """Queue a copy of a receipt, marked as a copy, to the account's current email; returns its outbox id."""
    now = clock.now()
    with db.transaction() as session:
        receipt = session.scalars(select(Receipt).where(Receipt.number == number.strip())).one_or_none()
        if receipt is None:
            raise NotFoundError(f"no receipt {number!r}")
        account = session.get(Account, receipt.account_id, with_for_update=True)
        assert account is not None
        prefix = f"{receipt_key(receipt.number)}:copy:"
        copies = session.scalar(select(func.count()).where(OutboxMessage.key.startswith(prefix, autoescape=True)))
        key = f"{prefix}{int(copies or 0) + 1}"
        context = {**receipt.content, "copy": True, "account": {"id": account.id, "email": account.email}}
        if not enqueue(
            session, key=key, kind="receipt", to=account.email, context=context, at=now, account_id=account.id
        ):
            raise ConflictError(f"another copy of receipt {number} is being queued; try again")
        message_id = session.scalars(select(OutboxMessage.id).where(OutboxMessage.key == key)).one()
        return int(message_id)


# --- invariants (`recharged verify`) --------------------------------------------------------------------------


def receipt_problems(session: Session) -> list[str]:
    """Receipt numbers run 1..N per issuer with no gap and N is the issuer's counter; every credited recharge
    has exactly one receipt, with its amounts; every receipt has its email in the outbox."""
    problems = []
    counters = dict(session.execute(select(ReceiptCounter.issuer, ReceiptCounter.last_number)).all())
    ranges = session.execute(
        select(Receipt.issuer, func.count(), func.min(Receipt.seq), func.max(Receipt.seq)).group_by(Receipt.issuer)
    ).all()
    for issuer, count, low, high in ranges:
        if (low, high) != (1, count):
            problems.append(f"receipts of issuer {issuer}: {count} numbers from {low} to {high}, not 1 to {count}")
        if counters.pop(issuer, None) != high:
            problems.append(f"receipts of issuer {issuer}: counter is not at the last number {high}")
    problems += [f"receipts of issuer {i}: counter at {n} but no receipts" for i, n in counters.items() if n]
    credited = ("credited", "finished")
    missing = session.scalars(
        select(Recharge.id)
        .outerjoin(Receipt, Receipt.recharge_id == Recharge.id)
        .where(Recharge.phase.in_(credited), Receipt.id.is_(None))
        .order_by(Recharge.id)
    )
    problems += [f"recharge {recharge_id}: credited without a receipt" for recharge_id in missing]
    mismatched = session.execute(
        select(Receipt.number, Recharge.id, Recharge.phase)
        .join(Recharge, Recharge.id == Receipt.recharge_id)
        .where(
            (Recharge.phase.not_in(credited))
            | (Recharge.amount != Receipt.amount)
            | (Recharge.vat != Receipt.vat)
            | (Recharge.total != Receipt.total)
            | (Recharge.account_id != Receipt.account_id)
            | (Recharge.payment_intent != Receipt.payment_reference)
        )
    )
    problems += [f"receipt {n}: does not match recharge {r} ({phase})" for n, r, phase in mismatched]
    decided = session.execute(
        select(Recharge.id, Recharge.amount, Recharge.limited_by, Recharge.decision).where(
            Recharge.decision.is_not(None)
        )
    )
    for recharge_id, amount, limited_by, stored in decided:
        wrong = stored_mismatches(stored)
        if stored.get("charge_amount") != amount or stored.get("limited_by") != limited_by:
            wrong.append(f"charged {amount} as {limited_by}, decided {stored.get('charge_amount')}")
        if wrong:
            problems.append(f"recharge {recharge_id}: its decision does not recompute: {'; '.join(wrong)}")
    unsent = session.scalars(
        select(Receipt.number)
        .outerjoin(OutboxMessage, OutboxMessage.key == literal("receipt:", String) + Receipt.number)
        .where(OutboxMessage.id.is_(None))
    )
    problems += [f"receipt {number}: no email in the outbox" for number in unsent]
    return problems
