"""Customer notices: each one is put in the outbox in the same transaction as the event it reports, under a key
that makes it unique (one notice per declined attempt, per failed recharge, per episode, and per first audited
change of a group of admin changes).

- payment declined, saying what happens next (the next card is tried now, or the next try's time, or nothing
  for a one-time purchase); the bank's reason is shown only when it is safe and useful to show (insufficient
  funds, expired card, ...): lost, stolen, fraudulent and every other decline read as a generic decline;
- action required: the card needs the customer to authenticate it or be replaced;
- automatic recharge suspended after the retry schedule ran out;
- balance low or run out while automatic recharge is off, and spend cap reached: conditions seen in the recharge
  plan, one notice per episode (`notify_from_plans`, which the recharge cycle calls with its plans). A balance
  notice is for a crossing: an account that has been at or below the line since it was created is not told;
- an admin changed the customer's automatic recharge settings or cards: what changed, when, by whom, in one notice
  per account per `[outbox] admin_notice_delay_minutes` (`_admin_notice`); or the card processor removed a card
  (detached at the processor, or its customer deleted there), told at once;
- money given back after a payment: a refund to the card (and a refund the bank returned), a disputed payment
  whose funds the bank took back (automatic recharge paused), and disputed funds reinstated: one notice per
  refund or dispute movement, in the transaction that posts its ledger entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from recharged.balance import AccountPlan
from recharged.config import PaymentsSettings
from recharged.mail import webhooks
from recharged.mail.outbox import enqueue, gathering
from recharged.money import Units, format_customer, parse_amount
from recharged.states import EntryType, RechargeState
from recharged.store.charging import candidate_sources
from recharged.store.engine import Database, insert_once
from recharged.store.models import (
    Account,
    AuditRecord,
    ChargeAttempt,
    Entry,
    FundingSource,
    NoticeEpisode,
    Receipt,
    Recharge,
)

GENERIC_DECLINE = "your bank declined the payment; please contact your bank or use another card"
# Decline reasons a customer may be told, and can act on. Anything else (lost, stolen, fraudulent, pick-up,
# do-not-honor, generic, ...) is shown as GENERIC_DECLINE.
CUSTOMER_REASONS = {
    "insufficient_funds": "the card has insufficient funds",
    "expired_card": "the card has expired",
    "incorrect_cvc": "the card's security code was not accepted",
    "invalid_cvc": "the card's security code was not accepted",
    "incorrect_number": "the card number was not accepted",
    "invalid_number": "the card number was not accepted",
    "invalid_expiry_month": "the card's expiry date was not accepted",
    "invalid_expiry_year": "the card's expiry date was not accepted",
    "card_velocity_exceeded": "the card has reached its spending limit",
    "withdrawal_count_limit_exceeded": "the card has reached its spending limit",
    "processing_error": "the bank had a processing error; trying again may work",
    "card_not_supported": "the card does not support this kind of payment",
    "currency_not_supported": "the card does not support payments in this currency",
}


def customer_reason(decline_code: str | None, code: str | None) -> str:
    """Why a card was declined, as the customer may read it."""
    for candidate in (decline_code, code):
        if candidate in CUSTOMER_REASONS:
            return CUSTOMER_REASONS[candidate]
    return GENERIC_DECLINE


def _card(source: FundingSource) -> dict[str, str]:
    return {"brand": source.brand, "last4": source.last4}


def _account(session: Session, account_id: str) -> tuple[Account, dict[str, Any]]:
    account = session.get(Account, account_id)
    assert account is not None
    balance = session.execute(select(Account.balance).where(Account.id == account_id)).scalar_one()
    return account, {"account": {"id": account.id, "email": account.email}, "balance": balance}


def _notice(session: Session, key: str, kind: str, account: Account, context: dict[str, Any], at: datetime) -> bool:
    return enqueue(
        session,
        key=key,
        kind=kind,
        to=account.email,
        context={**context, "currency": account.currency, "at": at.isoformat()},
        at=at,
        account_id=account.id,
    )


# --- from the charge flow -------------------------------------------------------------------------------------


def declined_attempt(
    session: Session,
    recharge: Recharge,
    attempt_id: int,
    source: FundingSource,
    at: datetime,
    payments: PaymentsSettings,
) -> None:
    """A card was declined and another card will be tried now: say so. When no card is left, the recharge
    fails and `recharge_failed` sends the one notice that says what happens next."""
    following = candidate_sources(
        session,
        recharge.account_id,
        recharge.id,
        at,
        timedelta(hours=payments.card_retry_after_decline_hours),
        payments.max_declines_per_card_30_days,
    )
    if not following:
        return
    attempt = session.get(ChargeAttempt, attempt_id)
    assert attempt is not None
    account, context = _account(session, recharge.account_id)
    context |= {
        "kind": recharge.kind,
        "total": recharge.total,
        "card": _card(source),
        "reason": customer_reason(attempt.decline_code, attempt.code),
        "next": {"action": "next_card", "card": _card(following[0]), "at": None},
    }
    _notice(session, f"declined:attempt:{attempt_id}", "payment_declined", account, context, at)


def action_required(session: Session, recharge: Recharge, attempt_id: int, source: FundingSource, at: datetime) -> None:
    """The card needs the customer: authenticate it with the bank, or give another card."""
    account, context = _account(session, recharge.account_id)
    context |= {"kind": recharge.kind, "total": recharge.total, "card": _card(source)}
    _notice(session, f"action_required:attempt:{attempt_id}", "action_required", account, context, at)


def recharge_failed(session: Session, recharge: Recharge, at: datetime) -> None:
    """Every card was declined (call after the account's retry state is updated): the decline and the next try's
    time, or that automatic recharge is suspended, or for a purchase that nothing was charged."""
    last = session.scalars(
        select(ChargeAttempt)
        .where(ChargeAttempt.recharge_id == recharge.id, ChargeAttempt.status == "declined")
        .order_by(ChargeAttempt.id.desc())
        .limit(1)
    ).one_or_none()
    if last is None:
        return  # no card was declined in this recharge (none could be tried): nothing new to tell
    source = session.get(FundingSource, last.source_id)
    assert source is not None
    account, context = _account(session, recharge.account_id)
    reason = customer_reason(last.decline_code, last.code)
    if recharge.kind == "auto" and account.recharge_state == "suspended":
        context |= {"failed_cycles": account.failed_cycles, "card": _card(source), "reason": reason}
        _notice(session, f"suspended:recharge:{recharge.id}", "auto_recharge_suspended", account, context, at)
        return
    retry_at = account.retry_at if recharge.kind == "auto" and account.recharge_state == "backing_off" else None
    context |= {
        "kind": recharge.kind,
        "total": recharge.total,
        "card": _card(source),
        "reason": reason,
        "next": {"action": "retry", "card": None, "at": retry_at.isoformat()}
        if retry_at
        else {"action": "none", "card": None, "at": None},
    }
    _notice(session, f"declined:recharge:{recharge.id}", "payment_declined", account, context, at)


# --- from the plan --------------------------------------------------------------------------------------------

CAP_PERIODS = {
    "max_charged_per_day": ("per 24 hours", "24-hour"),
    "max_charged_per_30_days": ("per 30 days", "30-day"),
    "max_recharge": ("per charge", "charge"),
}


def conditions(plan: AccountPlan) -> list[str]:
    """The notice-worthy conditions an account's plan shows, most severe first."""
    d = plan.decision
    if d.reason == "cap_reached":
        return ["spend_cap_reached"]
    if d.reason == "auto_recharge_off" and not plan.auto_recharge:
        if d.balance <= 0:
            return ["balance_exhausted", "balance_low"]
        if d.balance < d.threshold:
            return ["balance_low"]
    return []


def notify_from_plans(db: Database, at: datetime, plans: Iterable[AccountPlan]) -> int:
    """Notices for conditions the recharge plans show (balance low or run out with automatic recharge off,
    spend cap reached): one per episode, not one per cycle. An episode starts when a plan first shows the
    condition and ends when a plan of the same account no longer does; a balance episode of an account that has
    been at or below the line since it was created is kept untold. Returns the notices queued.

    Safe to call from several workers at once: an episode is a row with a primary key, and only the worker
    that inserts it queues the notice."""
    wanted = {p.account_id: (p, conditions(p)) for p in plans}
    if not wanted:
        return 0
    queued = 0
    with db.transaction() as session:
        open_episodes: dict[str, set[str]] = {}
        for account_id, kind in session.execute(
            select(NoticeEpisode.account_id, NoticeEpisode.kind).where(NoticeEpisode.kind.in_(NOTICE_EPISODES))
        ):
            if account_id in wanted:
                open_episodes.setdefault(account_id, set()).add(kind)
        for account_id, (plan, active) in wanted.items():
            known = open_episodes.get(account_id, set())
            ended = known - set(active)
            if ended:
                session.execute(
                    delete(NoticeEpisode).where(NoticeEpisode.account_id == account_id, NoticeEpisode.kind.in_(ended))
                )
            started = [
                kind
                for kind in active
                if kind not in known
                and insert_once(
                    session,
                    NoticeEpisode,
                    {"account_id": account_id, "kind": kind, "since": at},
                    ["account_id", "kind"],
                )
            ]
            # The most severe new condition is told, and a lesser one starting with it goes unsaid; a balance
            # that never was above its line did not cross it: its episode is kept, untold.
            if started and (started[0] not in BALANCE_LINES or _can_have_crossed(session, plan, started[0])):
                queued += _episode_notice(session, plan, started[0], at)
        webhooks.from_plans(session, [plan for plan, _ in wanted.values()], at)  # the CRM's events, by its own rules
    return queued


BALANCE_LINES = ("balance_exhausted", "balance_low")
NOTICE_EPISODES = ("spend_cap_reached", *BALANCE_LINES)  # the webhooks' episodes share the table (`webhooks.py`)
_CREDITS = tuple(kind for kind in EntryType if kind != EntryType.USAGE)


def _can_have_crossed(session: Session, plan: AccountPlan, kind: str) -> bool:
    """Whether the balance can have been above the line of `kind` (0 for balance_exhausted, the threshold for
    balance_low) since the account was created: only if everything ever credited to it (its opening balance
    included) reaches past the line. An account created at or below the line, and never credited past it since,
    has not crossed it: the customer caused nothing to tell. Read only when an episode starts."""
    credited = int(
        session.scalar(
            select(func.coalesce(func.sum(Entry.amount), 0)).where(
                Entry.entry_type.in_(_CREDITS), Entry.account_id == plan.account_id, Entry.amount > 0
            )
        )
        or 0
    )
    if kind == "balance_exhausted":  # run out at 0 or below
        return credited > 0
    return credited > 0 and credited >= plan.decision.threshold  # low below the threshold


def _episode_notice(session: Session, plan: AccountPlan, kind: str, at: datetime) -> int:
    account = session.get(Account, plan.account_id)
    if account is None:
        return 0
    d = plan.decision
    context: dict[str, Any] = {
        "account": {"id": account.id, "email": account.email},
        "balance": d.balance,
        "threshold": d.threshold,
        "average_daily": d.average_daily,
        "runway_days": None if d.runway_days is None else str(d.runway_days),
    }
    if kind == "spend_cap_reached":
        cap_name = d.limited_by if d.limited_by in CAP_PERIODS else "max_charged_per_30_days"
        cap = getattr(plan.policy, cap_name)
        context |= {"cap": cap, "period": CAP_PERIODS[cap_name][0], "period_short": CAP_PERIODS[cap_name][1]}
    key = f"{kind}:{account.id}:{at:%Y%m%dT%H%M%S}"
    return int(_notice(session, key, kind, account, context, at))


# --- admin changes --------------------------------------------------------------------------------------------

SETTING_WORDS = {
    "auto_recharge": "Automatic recharge",
    "recharge_state": "Automatic recharge status",
    "window_days": "Days of usage averaged",
    "threshold_days": "Minimum reserve, in days of usage",
    "recharge_days": "Recharge amount, in days of usage",
    "min_threshold": "Smallest minimum reserve",
    "min_recharge": "Smallest recharge",
    "max_recharge": "Largest single recharge",
    "max_charged_per_day": "Spending limit per 24 hours",
    "max_charged_per_30_days": "Spending limit per 30 days",
}
STATE_WORDS: dict[str, str] = {
    RechargeState.OK: "active",
    RechargeState.BACKING_OFF: "retrying after a declined payment",
    RechargeState.SUSPENDED: "paused after declined payments",
    RechargeState.ACTION_REQUIRED: "waiting for you to confirm your card",
    RechargeState.DISPUTED: "paused after a disputed payment",
}
AMOUNT_SETTINGS = ("min_threshold", "min_recharge", "max_recharge", "max_charged_per_day", "max_charged_per_30_days")


def _setting_value(name: str, value: Any, currency: str) -> str:
    if value is None:
        return "standard setting"
    if name == "auto_recharge":
        return "on" if value else "off"
    if name == "recharge_state":
        return STATE_WORDS.get(str(value), str(value))
    if name in AMOUNT_SETTINGS:
        return format_customer(parse_amount(str(value)), currency)
    return str(value)


def card_words(source: FundingSource | None) -> str:
    if source is None:
        return "none"
    return f"{source.brand.title()} ending in {source.last4}"


def settings_changed(session: Session, record: AuditRecord, delay: timedelta) -> None:
    """An admin changed automatic recharge settings (audited in `record`): tell the customer what changed, in the
    account's notice of admin changes that gathers for `delay` (see `_admin_notice`)."""
    account = session.get(Account, record.account_id)
    assert account is not None
    before, after = record.before or {}, record.after or {}
    changes = [
        {
            "setting": name,
            "what": SETTING_WORDS[name],
            "before": _setting_value(name, before.get(name), account.currency),
            "after": _setting_value(name, after.get(name), account.currency),
        }
        for name in after
        if name in SETTING_WORDS and before.get(name) != after.get(name)
    ]
    if changes:
        _admin_notice(session, account, record, "automatic recharge settings", changes, delay)


def cards_changed(
    session: Session, record: AuditRecord, what: str, before: str, after: str, *, delay: timedelta | None
) -> None:
    """The customer's cards changed (audited in `record`): by an admin, told in the account's notice of admin
    changes that gathers for `delay`; or by the processor (`delay` None), told at once in a message of its own."""
    account = session.get(Account, record.account_id)
    assert account is not None
    change = {"setting": None, "what": what, "before": before, "after": after}
    _admin_notice(session, account, record, "cards on file", [change], delay)


def _admin_notice(
    session: Session,
    account: Account,
    record: AuditRecord,
    subject_what: str,
    changes: list[dict[str, Any]],
    delay: timedelta | None,
) -> None:
    """Queue the notice of a change, or add the change to the account's notice still gathering: one email per
    account per `delay` instead of one per change (an admin trying settings out). The first change queues it to
    be sent `delay` later; each change until then joins it. A setting is told from its value before the first
    change to its value now, in the order first changed, and not at all once it is back where it was; cards are
    told as events (added, removed, ...). A notice left with nothing to tell is withdrawn: no email says
    "nothing changed" (the audit trail keeps every change)."""
    if account.closed_at is not None:  # a closed account is not told (`accounts close`)
        return
    session.flush()  # the audit record's id makes the notice's key
    at = record.at.isoformat()
    told = [{**c, "about": subject_what, "actors": [record.actor], "at": at, "last_at": at} for c in changes]
    if delay and delay > timedelta(0):
        # One writer per account at a time, so two first changes cannot each queue a notice.
        session.execute(select(Account.id).where(Account.id == account.id).with_for_update())
        pending = gathering(session, kind="settings_changed", account_id=account.id, now=record.at)
        if pending is not None:
            merged = _gathered(_told_in(pending.context), told)
            if merged:
                pending.context = _admin_context(account, merged)
                pending.to_address = account.email
            else:
                session.delete(pending)
            return
    told = _gathered([], told)
    if told:
        enqueue(
            session,
            key=f"settings:audit:{record.id}",
            kind="settings_changed",
            to=account.email,
            context=_admin_context(account, told),
            at=record.at,
            account_id=account.id,
            not_before=record.at + (delay or timedelta(0)),
        )


def _told_in(context: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes a queued notice tells, each with who made it and when (a notice queued before notices gathered
    changes names them once for all)."""
    return [
        {
            "setting": None,
            "about": context.get("subject_what", ""),
            "actors": [context.get("actor", "")],
            "at": context.get("at"),
            "last_at": context.get("at"),
        }
        | change
        for change in context.get("changes", [])
    ]


def _gathered(told: list[dict[str, Any]], changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`changes` added to what a notice tells: a setting told already takes its new value (and who changed it),
    keeping its place and its value before; a setting back at that value drops out."""
    merged = [dict(c) for c in told]
    for change in changes:
        earlier = next((c for c in merged if change["setting"] and c.get("setting") == change["setting"]), None)
        if earlier is None:
            merged.append(dict(change))
            continue
        earlier["after"], earlier["last_at"] = change["after"], change["last_at"]
        earlier["actors"] = [*earlier["actors"], *(a for a in change["actors"] if a not in earlier["actors"])]
    return [c for c in merged if not (c.get("setting") and c["before"] == c["after"])]


def _admin_context(account: Account, told: list[dict[str, Any]]) -> dict[str, Any]:
    """What the settings_changed template renders: who made the changes (in order), what they were about, and from
    the first change to the last."""

    def firsts(values: Iterable[str]) -> list[str]:
        return list(dict.fromkeys(values))

    actors = firsts(actor for c in told for actor in c["actors"])
    times = sorted(datetime.fromisoformat(t) for c in told for t in (c["at"], c["last_at"]) if t)
    return {
        "account": {"id": account.id, "email": account.email},
        "actor": actors[0] if len(actors) == 1 else ", ".join(actors[:-1]) + " and " + actors[-1],
        "subject_what": " and ".join(firsts(c["about"] for c in told)),
        "changes": told,
        "currency": account.currency,
        "at": times[0].isoformat() if times else None,
        "last_at": times[-1].isoformat() if len(times) > 1 and times[-1] != times[0] else None,
    }


# --- after the charge: refunds and disputes -----------------------------------------------------------------

# Why a cardholder disputed a payment, as the customer may read it (Stripe's dispute reasons).
DISPUTE_REASONS = {
    "fraudulent": "the cardholder told the bank they did not make this payment",
    "unrecognized": "the cardholder did not recognise this payment",
    "duplicate": "the cardholder says they were charged twice",
    "product_not_received": "the cardholder says they did not receive what they paid for",
    "product_unacceptable": "the cardholder says what they paid for was not as described",
    "subscription_canceled": "the cardholder says they had cancelled",
    "credit_not_processed": "the cardholder says a refund they were promised did not arrive",
}
GENERIC_DISPUTE = "the cardholder disputed the payment with their bank"


def _payment(session: Session, recharge: Recharge) -> dict[str, Any]:
    """The payment a reversal concerns, as the customer knows it: its reference, receipt, total and date."""
    receipt = session.scalar(select(Receipt.number).where(Receipt.recharge_id == recharge.id))
    source = session.get(FundingSource, recharge.source_id) if recharge.source_id is not None else None
    return {
        "reference": recharge.payment_intent,
        "receipt": receipt,
        "kind": recharge.kind,
        "total": recharge.total,
        "vat": recharge.vat,
        "date": recharge.created_at.isoformat(),
        "card": None if source is None else _card(source),
    }


def refund_posted(
    session: Session,
    recharge: Recharge,
    refund_id: str,
    given_back: Units,
    balance_change: Units,
    at: datetime,
    *,
    failed: bool = False,
) -> bool:
    """A refund of `given_back` (VAT included) went to the card and took `balance_change` (negative) off the
    balance; or, `failed`, the bank returned that refund and `balance_change` (positive) is back on it."""
    account, context = _account(session, recharge.account_id)
    context |= {
        "payment": _payment(session, recharge),
        "refund": {"id": refund_id, "amount": given_back, "balance_change": balance_change, "failed": failed},
    }
    key = f"refund:{refund_id}:failed" if failed else f"refund:{refund_id}"
    return _notice(session, key, "refund", account, context, at)


def dispute_movement(
    session: Session,
    recharge: Recharge,
    dispute_id: str,
    movement: str,
    amount: Units,
    balance_change: Units,
    reason: str | None,
    at: datetime,
) -> bool:
    """A disputed payment's funds moved: `withdrawn` by the bank (the credit is taken back, automatic recharge
    paused) or `reinstated` (the dispute was decided for us: the credit is back)."""
    account, context = _account(session, recharge.account_id)
    context |= {
        "payment": _payment(session, recharge),
        "dispute": {
            "id": dispute_id,
            "movement": movement,
            "amount": amount,
            "balance_change": balance_change,
            "reason": DISPUTE_REASONS.get(reason or "", GENERIC_DISPUTE),
        },
        "auto_recharge_paused": account.recharge_state == RechargeState.DISPUTED,
    }
    return _notice(session, f"dispute:{dispute_id}:{movement}", "dispute", account, context, at)
