"""Processor events (Stripe webhooks), kept durably and handled once, off the request path.

The inbox. `EventService.store` writes a verified event to `processor_events` (its id unique, its type, the
object as the event carried it, when it came, status pending) in one transaction, and the webhook answers 2xx
right after: a crash after the answer loses nothing. An event of a type recharged does not act on is stored as
`ignored` at once (so a redelivery is still recognised). `process_pending` handles the pending events one at a
time, oldest first, each in its own error boundary: a worker claims the event (a lease, one attempt more),
handles it, and records the outcome (`handled`); when handling fails, the error and the next try's time are
recorded on the row and the event stays pending (30 s, doubling up to 6 h), so one bad event never blocks the
others. `recharged status` and /healthz show events that keep failing. The daemon runs this as a job and right
after storing an event; `recharged events process` does it without the daemon. `recharged events fetch` stores
the processor's events of a period that the inbox lacks (after a restore from a backup).

Never trusting the event. What an event says about amounts or states is never used: the object it names is read
again from the processor, and the database is brought to what the processor says now. So events that arrive
twice, late or out of order converge to the same result, and every effect is idempotent by itself (ledger
entries unique per processor object, notices unique per key, card changes applied only when they change
something), which also makes an event handled again after a crash between its effect and its record harmless.

What each event does:
- `payment_intent.*`: the recharge it paid is finished by `RechargeService.process`, as the completer does.
- refunds (`charge.refunded`, `charge.refund.updated`, `refund.*`) and disputes (`charge.dispute.*`): the charge
  is read again with all its refunds and disputes, and the ledger follows it, against the account the original
  recharge credited, each entry in one transaction with its customer notice:
  - a refund posts a `refund` entry (`re_...`) once it has succeeded (a pending refund posts nothing yet); a
    refund that fails or is canceled after it was posted gets the opposite entry (`re_...:failed`);
  - a dispute whose funds were withdrawn posts a `dispute` entry (`du_...`) and pauses automatic recharge
    (`disputed`, until an admin enables it again); reinstated funds (a won dispute) post a `reinstated` entry;
  - each amount is the processor's, in the recharge's currency, turned into the share of the credit it
    reverses by `money.credit_reversed` (VAT given back in proportion).
- `payment_method.detached`, `.updated`, `.automatically_updated`: the card is read again; a card no longer
  attached to its customer becomes unusable ("removed at the processor"); an attached one takes the brand, last4
  and expiry the processor has, and a card that was unusable because it was expired or outdated is usable
  again. `customer.deleted`: every card of a customer deleted at the processor becomes unusable. Each change is
  an audit record (`recharged audit`), and a card that stops being usable is also a notice to the customer.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from recharged.accounts import audit_change
from recharged.clock import Clock
from recharged.errors import ConflictError, RetryLater
from recharged.funding import describe
from recharged.mail import notices, webhooks
from recharged.money import credit_reversed, format_amount, format_ledger, from_minor_units
from recharged.payments import ChargeRecord, DisputeRecord, MethodRecord, PaymentGateway, RefundRecord
from recharged.recharge import RechargeService
from recharged.states import AttemptStatus, EntryType, EventStatus, Phase, RechargeState
from recharged.store.charging import lock_recharge, recharge_of_payment
from recharged.store.engine import Database
from recharged.store.ledger import existing_entries, lock_account, post_entry
from recharged.store.models import Account, FundingSource, ProcessorEvent, Recharge
from recharged.store.reads import accounts_in_state
from recharged.store.runs import (
    claim_event,
    due_event_ids,
    fail_event,
    failing_events,
    finish_event,
    insert_event,
    list_events,
    pending_events_received_before,
)

log = structlog.get_logger("recharged.events")

PAYMENT_INTENT_EVENTS = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.processing",
        "payment_intent.requires_action",
        "payment_intent.canceled",
    }
)
REFUND_EVENTS = frozenset(
    {"charge.refunded", "charge.refund.updated", "refund.created", "refund.updated", "refund.failed"}
)
DISPUTE_EVENTS = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
        "charge.dispute.closed",
    }
)
CLOSED_DISPUTES = frozenset({"won", "lost"})  # a dispute decided, one way or the other
CARD_EVENTS = frozenset({"payment_method.detached", "payment_method.updated", "payment_method.automatically_updated"})
CUSTOMER_EVENTS = frozenset({"customer.deleted"})
HANDLED_EVENTS = PAYMENT_INTENT_EVENTS | REFUND_EVENTS | DISPUTE_EVENTS | CARD_EVENTS | CUSTOMER_EVENTS

MAX_OBJECT_ID = 255  # processor_events.object_id
MAX_INTENT_ID = 64  # recharges.payment_intent; Stripe's ids are far shorter
# What Stripe's ids look like; anything else (a NUL byte, say) could not even be looked up.
_STRIPE_ID = re.compile(r"[\x21-\x7e]+")

LEASE = timedelta(minutes=5)  # how long a worker holds an event while it is handled
RETRY_FIRST = timedelta(seconds=30)  # after a failed attempt, doubling each time
RETRY_MAX = timedelta(hours=6)
ALERT_AFTER = 8  # failures in a row (about two hours of them) from which an event fails /healthz, logged as error
WAITING_TOO_LONG = timedelta(minutes=10)  # pending and never tried for this long: nobody drains the inbox
BATCH = 100

PROCESSOR = "Stripe (card processor)"  # who the audit log says changed a card the processor changed
REMOVED = "removed at the processor"
# Why a hard decline made a card unusable that newer details from the processor (the card updater, a new expiry
# or number) put right: the decline code opens the stored reason ("expired_card on 2026-11-20"). An expiry
# problem is put right by a new expiry or number, a number problem only by a new number.
OUTDATED_EXPIRY = frozenset({"expired_card", "invalid_expiry_month", "invalid_expiry_year"})
OUTDATED_NUMBER = frozenset(
    {"incorrect_number", "invalid_number", "account_closed", "new_account_information_available"}
)
REFUND_GIVEN_BACK = "succeeded"
REFUND_UNDONE = frozenset({"failed", "canceled"})


@dataclass(frozen=True, slots=True)
class Stored:
    """What the inbox did with a delivery: `stored` (pending, to be handled), `duplicate` (this id is there
    already), or `ignored` (a type or object recharged does not act on; recorded so redeliveries are known)."""

    event_id: str
    outcome: Literal["stored", "duplicate", "ignored"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What handling an event did: `handled` (acted on, `text` says how) or `not_ours` (about no payment or
    card of ours)."""

    kind: Literal["handled", "not_ours"]
    text: str
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class Processed:
    event_id: str
    outcome: Literal["handled", "not_ours", "failed", "busy"]  # busy: another worker holds it, or it is done
    text: str


@dataclass
class DrainReport:
    processed: list[Processed] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for p in self.processed if p.outcome == outcome)

    def summary(self) -> dict[str, object]:
        return {outcome: self.count(outcome) for outcome in ("handled", "not_ours", "failed")}


class EventObserver(Protocol):
    """Hears how each event ended (the daemon's metrics)."""

    def event_processed(self, outcome: str) -> None: ...


class _Unobserved:
    def event_processed(self, outcome: str) -> None:
        pass


def _stripe_id(value: Any, limit: int = MAX_OBJECT_ID) -> str | None:
    return value if isinstance(value, str) and len(value) <= limit and _STRIPE_ID.fullmatch(value) else None


def _retry_wait(attempts: int) -> timedelta:
    wait: timedelta = min(RETRY_FIRST * 2 ** max(0, attempts - 1), RETRY_MAX)
    return wait


class EventService:
    """The inbox of processor events for one database, processor and clock. Payment events are finished through
    `recharges` (whose gateway re-reads every object)."""

    def __init__(
        self, db: Database, recharges: RechargeService, clock: Clock, observer: EventObserver | None = None
    ) -> None:
        self._db, self._recharges, self._clock = db, recharges, clock
        self._observer: EventObserver = observer or _Unobserved()

    @property
    def gateway(self) -> PaymentGateway:
        return self._recharges.gateway

    # --- the inbox --------------------------------------------------------------------------------------------

    def store(self, event: Mapping[str, Any]) -> Stored:
        """Keep a verified event (a dict with a string id and type) in the inbox, once. Nothing else happens
        here: the caller answers the processor at once."""
        event_id, event_type = str(event["id"]), str(event["type"])
        data = event.get("data")
        payload = data.get("object") if isinstance(data, dict) else data
        object_id = _stripe_id(payload.get("id")) if isinstance(payload, dict) else None
        acted_on = event_type in HANDLED_EVENTS and object_id is not None
        now = self._clock.now()
        with self._db.transaction() as session:
            inserted = insert_event(
                session,
                {
                    "id": event_id,
                    "type": event_type[:80],
                    "object_id": object_id,
                    "payload": payload,
                    "received_at": now,
                    "status": EventStatus.PENDING if acted_on else EventStatus.IGNORED,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "handled_at": None if acted_on else now,
                    "outcome": None
                    if acted_on
                    else ("ignored: no object id" if event_type in HANDLED_EVENTS else "ignored: not acted on"),
                },
            )
        if not inserted:
            return Stored(event_id, "duplicate")
        log.info("event.stored", event_id=event_id, type=event_type, object=object_id, pending=acted_on)
        return Stored(event_id, "stored" if acted_on else "ignored")

    def fetch(self, since: datetime) -> list[Stored]:
        """Ask the processor for its events since `since` and store those the inbox does not have (after a restore
        from a backup, the events answered after it are not in the inbox, and the processor never sends them
        again). They are then handled like any other."""
        stored = []
        for event in self.gateway.events_since(since):
            if _stripe_id(event.get("id"), MAX_OBJECT_ID) is None or not isinstance(event.get("type"), str):
                continue
            stored.append(self.store(event))
        return stored

    def process_pending(self, *, limit: int = 10_000, stop: threading.Event | None = None) -> DrainReport:
        """Handle the pending events that are due, oldest first, one at a time, until none is left (or `limit`
        were tried, or `stop` is set). Events that fail wait for their retry time and are not tried again here."""
        report = DrainReport()
        tried: set[str] = set()
        while len(tried) < limit and not (stop is not None and stop.is_set()):
            with self._db.reading() as session:
                due = [i for i in due_event_ids(session, self._clock.now(), BATCH + len(tried)) if i not in tried]
            if not due:
                break
            for event_id in due[: limit - len(tried)]:
                if stop is not None and stop.is_set():
                    break
                tried.add(event_id)
                report.processed.append(self.process(event_id))
        return report

    def process(self, event_id: str) -> Processed:
        """Handle one pending event now (whether or not its retry time has come), in its own error boundary."""
        now = self._clock.now()
        with self._db.transaction() as session:
            event = claim_event(session, event_id, now, now + LEASE)
            if event is None:
                return Processed(event_id, "busy", "handled already, or another worker holds it")
            event_type, object_id, payload, attempts = event.type, event.object_id, event.payload, event.attempts
        try:
            outcome = self._handle(event_id, event_type, object_id or "", payload)
        except Exception as exc:  # one event's trouble never stops the others
            return self._failed(event_id, event_type, attempts, exc)
        with self._db.transaction() as session:
            finish_event(session, event_id, EventStatus.HANDLED, outcome.text, self._clock.now(), outcome.account_id)
        log.info("event.handled", event_id=event_id, type=event_type, object=object_id, outcome=outcome.text)
        self._observer.event_processed(outcome.kind)
        return Processed(event_id, outcome.kind, outcome.text)

    def _failed(self, event_id: str, event_type: str, attempts: int, exc: Exception) -> Processed:
        now = self._clock.now()
        wait = _retry_wait(attempts)
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RetryLater) else f"not yet: {exc}"
        with self._db.transaction() as session:
            fail_event(session, event_id, error, now + wait)
        level = log.error if attempts >= ALERT_AFTER else log.warning
        level("event.failed", event_id=event_id, type=event_type, attempts=attempts, retry_in=str(wait), error=error)
        self._observer.event_processed("failed")
        return Processed(event_id, "failed", error)

    def _handle(self, event_id: str, event_type: str, object_id: str, payload: Any) -> Outcome:
        if event_type in PAYMENT_INTENT_EVENTS:
            return self._payment_intent(object_id, payload)
        if event_type == "charge.refunded":
            return self._charge(object_id)
        if event_type in REFUND_EVENTS:
            refund = self.gateway.refund(object_id)
            if refund is None or refund.charge is None:
                return Outcome("not_ours", f"the processor has no refund {object_id} of a charge")
            return self._charge(refund.charge)
        if event_type in DISPUTE_EVENTS:
            dispute = self.gateway.dispute(object_id)
            if dispute is None or dispute.charge is None:
                return Outcome("not_ours", f"the processor has no dispute {object_id} of a charge")
            return self._charge(dispute.charge)
        if event_type in CARD_EVENTS:
            return self._card(event_id, object_id)
        if event_type in CUSTOMER_EVENTS:
            return self._customer(event_id, object_id)
        raise ConflictError(f"no handler for {event_type}")  # stored as ignored: never reached

    # --- payments ------------------------------------------------------------------------------------------------

    def _payment_intent(self, intent_id: str, payload: Any) -> Outcome:
        """Finish the recharge a PaymentIntent belongs to, through the same path as the completer."""
        if _stripe_id(intent_id, MAX_INTENT_ID) is None:
            return Outcome("not_ours", f"{intent_id[:80]} is no PaymentIntent id of ours")
        metadata = payload.get("metadata") if isinstance(payload, dict) else None
        hint = metadata.get("recharged_recharge") if isinstance(metadata, dict) else None
        with self._db.reading() as session:
            recharge_id = recharge_of_payment(session, intent_id, _recharge_hint(hint))
        if recharge_id is None:  # someone else's payment: no need to ask the processor about it
            return Outcome("not_ours", f"payment {intent_id} is not one of our recharges")
        current = self.gateway.retrieve(intent_id)  # the processor's state now, not the event's
        # a payment the customer authenticated after its recharge failed waiting for them is credited now
        report = (
            self._recharges.authenticated(recharge_id, intent_id)
            if current.outcome == AttemptStatus.SUCCEEDED
            else None
        )
        report = report or self._recharges.process(recharge_id)
        return Outcome(
            "handled", f"recharge {recharge_id} {report.phase} (payment {current.outcome})", report.account_id
        )

    def _charge(self, charge_id: str) -> Outcome:
        """Bring the ledger to the charge's refunds and disputes as the processor has them now."""
        charge = self.gateway.charge_details(charge_id)
        if charge is None or charge.payment_intent is None:
            return Outcome("not_ours", f"the processor has no charge {charge_id[:80]} of a PaymentIntent")
        with self._db.reading() as session:
            recharge_id = recharge_of_payment(
                session, charge.payment_intent, _recharge_hint(charge.metadata.get("recharged_recharge"))
            )
        if recharge_id is None:
            return Outcome("not_ours", f"payment {charge.payment_intent} is not one of our recharges")
        return self._follow(recharge_id, charge)

    def _follow(self, recharge_id: int, charge: ChargeRecord) -> Outcome:
        now = self._clock.now()
        with self._db.transaction() as session:
            recharge = lock_recharge(session, recharge_id)
            pi = charge.payment_intent
            if recharge.payment_intent not in (None, pi):
                return Outcome("not_ours", f"recharge {recharge.id} was paid by {recharge.payment_intent}, not {pi}")
            if recharge.phase == Phase.FAILED:
                return Outcome(
                    "handled", f"recharge {recharge.id} failed: nothing was credited for {pi}", recharge.account_id
                )
            if recharge.phase not in (Phase.CREDITED, Phase.FINISHED):
                raise RetryLater(f"recharge {recharge.id} is {recharge.phase}: its credit for {pi} is not posted yet")
            if charge.currency != recharge.currency:
                raise ConflictError(
                    f"charge {charge.id} is in {charge.currency}, recharge {recharge.id} in {recharge.currency}"
                )
            account = session.get(Account, recharge.account_id)
            assert account is not None
            done: list[str] = []
            for refund in charge.refunds:
                done += self._refund(session, recharge, refund, now)
            for dispute in charge.disputes:
                done += self._dispute(session, recharge, account, dispute, now)
            text = f"recharge {recharge.id}, {pi}: " + ("; ".join(done) if done else "ledger already up to date")
            return Outcome("handled", text, recharge.account_id)

    def _share(self, recharge: Recharge, amount_minor: int) -> int:
        """The part of the recharge's credit that `amount_minor` given back (of its charge) reverses."""
        return credit_reversed(from_minor_units(amount_minor, recharge.currency), recharge.total, recharge.amount)

    def _refund(self, session: Session, recharge: Recharge, refund: RefundRecord, now: datetime) -> list[str]:
        """A succeeded refund is posted once; one that failed or was canceled after it was posted is undone once.
        A pending refund waits: money has not gone back yet."""
        pi, currency = recharge.payment_intent, recharge.currency
        given_back = from_minor_units(refund.amount, currency)
        shown = format_amount(given_back, currency)
        if refund.status == REFUND_GIVEN_BACK:
            share = self._share(recharge, refund.amount)
            note = f"refund {refund.id} of {shown} of {pi} (charged {format_amount(recharge.total, currency)})"
            if post_entry(
                session, recharge.account_id, EntryType.REFUND, refund.id, -share, now, note, payment_intent=pi
            ):
                notices.refund_posted(session, recharge, refund.id, given_back, -share, now)
                webhooks.refund_created(session, recharge, refund.id, given_back, -share, now)
                return [f"refund {refund.id} {format_ledger(-share)}"]
        elif refund.status in REFUND_UNDONE:
            posted = existing_entries(session, EntryType.REFUND, [refund.id]).get(refund.id)
            if posted is not None:
                undo = f"{refund.id}:failed"
                note = f"refund {refund.id} of {shown} of {pi} {refund.status}: the money came back"
                if post_entry(
                    session, recharge.account_id, EntryType.REFUND, undo, -posted.amount, now, note, payment_intent=pi
                ):
                    notices.refund_posted(session, recharge, refund.id, given_back, -posted.amount, now, failed=True)
                    return [f"refund {refund.id} {refund.status}: {format_ledger(-posted.amount)} back"]
        return []

    def _dispute(
        self, session: Session, recharge: Recharge, account: Account, dispute: DisputeRecord, now: datetime
    ) -> list[str]:
        """Funds withdrawn post a `dispute` entry and pause automatic recharge; funds reinstated post a
        `reinstated` entry. Each once per dispute."""
        pi, currency = recharge.payment_intent, recharge.currency
        amount = from_minor_units(dispute.amount, currency)
        share = self._share(recharge, dispute.amount)
        done = []
        if dispute.funds_withdrawn:
            note = f"dispute {dispute.id} ({dispute.reason}) of {pi}: {format_amount(amount, currency)} withdrawn"
            if post_entry(session, account.id, EntryType.DISPUTE, dispute.id, -share, now, note, payment_intent=pi):
                if not dispute.funds_reinstated:  # seen only once already won: nothing to pause for
                    self._pause(session, account, recharge, dispute, now)
                notices.dispute_movement(
                    session, recharge, dispute.id, "withdrawn", amount, -share, dispute.reason, now
                )
                webhooks.dispute_created(session, recharge, dispute.id, amount, -share, dispute.reason, now)
                done.append(f"dispute {dispute.id} withdrawn {format_ledger(-share)}")
        if dispute.funds_reinstated:
            note = f"dispute {dispute.id} of {pi} won: {format_amount(amount, currency)} reinstated"
            if post_entry(session, account.id, EntryType.REINSTATED, dispute.id, share, now, note, payment_intent=pi):
                notices.dispute_movement(
                    session, recharge, dispute.id, "reinstated", amount, share, dispute.reason, now
                )
                done.append(f"dispute {dispute.id} reinstated {format_ledger(share)}")
        if dispute.status in CLOSED_DISPUTES:  # told once, however often its events come
            reinstated = share if dispute.funds_reinstated else 0
            webhooks.dispute_closed(session, recharge, dispute.id, dispute.status, amount, reinstated, now)
        return done

    def _pause(
        self, session: Session, account: Account, recharge: Recharge, dispute: DisputeRecord, now: datetime
    ) -> None:
        """Automatic recharge stops for the account until an admin enables it again (`auto-recharge --enable`)."""
        before = account.recharge_state
        account.recharge_state, account.retry_at = RechargeState.DISPUTED, None
        account.state_reason = (
            f"payment {recharge.payment_intent} disputed ({dispute.reason or 'no reason given'}, {dispute.id}); "
            "automatic recharge paused until an admin enables it"
        )[:200]
        account.updated_at = now
        audit_change(
            session,
            account.id,
            PROCESSOR,
            now,
            "auto_recharge.disputed",
            {"recharge_state": before},
            {
                "recharge_state": RechargeState.DISPUTED,
                "dispute": dispute.id,
                "payment_intent": recharge.payment_intent,
            },
        )
        log.warning("account.disputed", account=account.id, dispute=dispute.id, payment_intent=recharge.payment_intent)

    # --- cards and customers -------------------------------------------------------------------------------

    def _card(self, event_id: str, payment_method: str) -> Outcome:
        """Make every card of ours with this payment method what the processor says it is now."""
        method = self.gateway.payment_method(payment_method)
        now = self._clock.now()
        changed: list[str] = []
        with self._db.transaction() as session:
            sources = _sources(session, FundingSource.payment_method == payment_method)
            if not sources:
                return Outcome("not_ours", f"no card of ours is {payment_method}")
            for source in sources:
                changed += _follow_card(session, source, method, event_id, now)
            account_id = sources[0].account_id
        text = "; ".join(changed) if changed else f"{payment_method}: our cards already match the processor"
        return Outcome("handled", text, account_id)

    def _customer(self, event_id: str, customer_id: str) -> Outcome:
        """A customer deleted at the processor: none of its cards can be charged any more."""
        customer = self.gateway.customer(customer_id)
        if customer is not None and not customer.deleted:
            return Outcome("handled", f"customer {customer_id} exists at the processor: nothing to do")
        now = self._clock.now()
        changed: list[str] = []
        with self._db.transaction() as session:
            sources = _sources(session, FundingSource.customer == customer_id)
            if not sources:
                return Outcome("not_ours", f"no card of ours belongs to customer {customer_id}")
            for source in sources:
                if _make_unusable(session, source, f"{REMOVED} (customer deleted)", event_id, now):
                    changed.append(f"source {source.id} unusable")
            account_id = sources[0].account_id
        what = ", ".join(changed) or "its cards were unusable already"
        return Outcome("handled", f"customer {customer_id} deleted: {what}", account_id)


def _recharge_hint(value: Any) -> str | None:
    """Our recharge id from a payment's metadata: a plain number that fits a BIGINT ("²" or 30 nines are not)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return value
    return None


def _sources(session: Session, condition: Any) -> list[FundingSource]:
    """Cards on file (not removed by an admin) matching `condition`, their accounts locked in id order first."""
    query = select(FundingSource.account_id).where(condition, FundingSource.removed_at.is_(None)).distinct()
    for account_id in sorted(session.scalars(query)):
        lock_account(session, account_id)
    found = select(FundingSource).where(condition, FundingSource.removed_at.is_(None))
    return list(session.scalars(found.order_by(FundingSource.account_id, FundingSource.id)))


def _follow_card(
    session: Session, source: FundingSource, method: MethodRecord | None, event_id: str, now: datetime
) -> list[str]:
    if method is None:
        why = f"{REMOVED} (payment method deleted)"
    elif method.customer is None:
        why = f"{REMOVED} (detached)"
    elif method.customer != source.customer:
        why = f"{REMOVED} (attached to another customer)"
    else:
        why = ""
    if why:
        return [f"source {source.id} unusable"] if _make_unusable(session, source, why, event_id, now) else []
    assert method is not None
    before = describe(source)
    old_number, old_expiry = source.last4, (source.exp_year, source.exp_month)
    if method.brand and method.last4 and method.exp_month and method.exp_year:
        source.brand, source.last4 = method.brand, method.last4
        source.exp_month, source.exp_year = int(method.exp_month), int(method.exp_year)
    code = (source.unusable_reason or "").split(" ", 1)[0]
    new_number = source.last4 != old_number
    new_expiry = (source.exp_year, source.exp_month) != old_expiry
    current = (source.exp_year, source.exp_month) >= (now.year, now.month)
    if current and (
        (code in OUTDATED_EXPIRY and (new_expiry or new_number)) or (code in OUTDATED_NUMBER and new_number)
    ):
        source.unusable_reason = None  # the processor has newer details than the card that was declined
    after = describe(source)
    if after == before:
        return []
    audit_change(
        session, source.account_id, PROCESSOR, now, "source.updated_at_processor", before, {**after, "event": event_id}
    )
    usable = " and usable again" if before["unusable"] and not after["unusable"] else ""
    return [f"source {source.id} now {after['card']}{usable}"]


def _make_unusable(session: Session, source: FundingSource, why: str, event_id: str, now: datetime) -> bool:
    """Mark a card the processor no longer lets us charge; audited, and the customer is told. False when it was
    marked so already."""
    if (source.unusable_reason or "").startswith(REMOVED):
        return False
    before = describe(source)
    source.unusable_reason = f"{why} on {now:%Y-%m-%d}"[:200]
    record = audit_change(
        session,
        source.account_id,
        PROCESSOR,
        now,
        "source.removed_at_processor",
        before,
        {**describe(source), "event": event_id},
    )
    webhooks.funding_source_unusable(session, source, now)
    notices.cards_changed(  # told at once, on its own: the customer must add a card
        session,
        record,
        "Card removed",
        notices.card_words(source),
        "can no longer be charged: please add a card",
        delay=None,
    )
    log.warning("source.removed_at_processor", account=source.account_id, source=source.id, why=why)
    return True


# --- what admins see --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventView:
    id: str
    type: str
    object_id: str | None
    status: str
    received_at: datetime
    attempts: int
    next_attempt_at: datetime | None
    handled_at: datetime | None
    account_id: str | None
    outcome: str | None
    last_error: str | None

    @classmethod
    def of(cls, row: ProcessorEvent) -> EventView:
        waiting = row.next_attempt_at if row.status == EventStatus.PENDING else None
        return cls(
            row.id,
            row.type,
            row.object_id,
            row.status,
            row.received_at,
            row.attempts,
            waiting,
            row.handled_at,
            row.account_id,
            row.outcome,
            row.last_error,
        )

    def as_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": self.id,
            "type": self.type,
            "object": self.object_id,
            "status": self.status,
            "received_at": iso(self.received_at),
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at),
            "handled_at": iso(self.handled_at),
            "account": self.account_id,
            "outcome": self.outcome,
            "last_error": self.last_error,
        }


def events(
    db: Database, status: EventStatus | None = None, account_id: str | None = None, limit: int = 100
) -> list[EventView]:
    """The inbox, newest first."""
    with db.reading() as session:
        return [EventView.of(row) for row in list_events(session, status, account_id, limit)]


def failing(db: Database) -> list[EventView]:
    """Pending events whose last attempt failed (they are tried again at their `next_attempt_at`)."""
    with db.reading() as session:
        return [EventView.of(row) for row in failing_events(session)]


def waiting(db: Database, now: datetime) -> tuple[int, datetime | None]:
    """Events pending for longer than WAITING_TOO_LONG without being tried: (how many, the oldest's time)."""
    with db.reading() as session:
        return pending_events_received_before(session, now - WAITING_TOO_LONG)


def inbox_check(db: Database, now: datetime) -> dict[str, Any]:
    """The /healthz check of the inbox: warn while an event fails or waits unhandled, fail when one has failed
    ALERT_AFTER times in a row."""
    failures = failing(db)
    late, oldest = waiting(db, now)
    status = "pass"
    if failures or late:
        status = "warn"
    if any(e.attempts >= ALERT_AFTER for e in failures):
        status = "fail"
    if failures:
        worst = max(failures, key=lambda e: e.attempts)
        output = f"{len(failures)} event(s) failing, e.g. {worst.type} {worst.id} after {worst.attempts} attempt(s)"
    elif late:
        output = f"{late} event(s) waiting since {oldest:%Y-%m-%d %H:%M} UTC" if oldest else f"{late} waiting"
    else:
        output = "no event failing or waiting"
    return {"componentType": "component", "observedValue": len(failures) + late, "status": status, "output": output}


def disputes_check(db: Database) -> dict[str, Any]:
    """The /healthz check of disputes: warn while an account's automatic recharge is paused by a dispute (an admin
    must look at it and enable it again)."""
    with db.reading() as session:
        disputed = accounts_in_state(session, RechargeState.DISPUTED)
    shown = ", ".join(disputed[:5]) + (f" and {len(disputed) - 5} more" if len(disputed) > 5 else "")
    return {
        "componentType": "component",
        "observedValue": len(disputed),
        "status": "warn" if disputed else "pass",
        "output": f"automatic recharge paused by a dispute: {shown}" if disputed else "no account paused by a dispute",
    }
