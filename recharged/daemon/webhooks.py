"""Stripe webhooks: verify the signature on the raw body, handle each event id once, and finish the recharge
the event is about through the same path as the completer.

The event's contents are never trusted for the outcome: events arrive late, twice or out of order. The
PaymentIntent is fetched again from the processor, and `RechargeService.process` (which re-reads the processor
under the recharge's lock and lease) decides what happens to the recharge.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import stripe
import structlog

from recharged.clock import Clock
from recharged.errors import InputError
from recharged.recharge import RechargeService
from recharged.store.charging import recharge_of_payment
from recharged.store.engine import Database
from recharged.store.runs import record_webhook_event, webhook_event_seen

log = structlog.get_logger("recharged.webhooks")
MAX_EVENT_ID = 255  # webhook_events.id
MAX_INTENT_ID = 64  # webhook_events.payment_intent; Stripe's ids are far shorter
# What Stripe's ids and event types look like; anything else (a NUL byte, say) could not even be looked up.
_STRIPE_ID = re.compile(r"[\x21-\x7e]+")
_STRIPE_TYPE = re.compile(r"[\x21-\x7e]{1,80}")
PAYMENT_INTENT_EVENTS = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.processing",
        "payment_intent.requires_action",
        "payment_intent.canceled",
    }
)


class SignatureError(InputError):
    """The body is not signed with our endpoint secret, or was signed too long ago."""


def verified_event(payload: bytes, header: str | None, secret: str, tolerance_seconds: int) -> dict[str, Any]:
    """The event in a webhook body, after checking its `Stripe-Signature` header with Stripe's own code
    (HMAC-SHA256 of "timestamp.body", constant-time comparison, timestamp within the tolerance)."""
    if not header:
        raise SignatureError("the Stripe-Signature header is missing")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("the body is not UTF-8") from None
    try:
        stripe.WebhookSignature.verify_header(text, header, secret, tolerance_seconds)
    except stripe.SignatureVerificationError as exc:
        raise SignatureError(f"signature check failed: {exc.user_message or exc}") from None
    try:
        event = json.loads(text)
        json.dumps(event, ensure_ascii=False).encode()  # a lone surrogate escape could be neither stored nor echoed
    except (ValueError, RecursionError) as exc:  # also past the integer digit and nesting limits
        raise InputError(f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        raise InputError("the body is not a Stripe event (it needs an id and a type)")
    if not _STRIPE_ID.fullmatch(event["id"]) or len(event["id"]) > MAX_EVENT_ID:
        raise InputError(f"the event id must be 1 to {MAX_EVENT_ID} printable ASCII characters")
    if not _STRIPE_TYPE.fullmatch(event["type"]):
        raise InputError("the event type must be 1 to 80 printable ASCII characters")
    return event


@dataclass(frozen=True, slots=True)
class Handled:
    event_id: str
    outcome: str  # duplicate | ignored | not_ours | the recharge's phase after processing
    recharge_id: int | None = None


class WebhookHandler:
    def __init__(self, db: Database, recharges: RechargeService, clock: Clock) -> None:
        self._db, self._recharges, self._clock = db, recharges, clock

    def handle(self, event: dict[str, Any]) -> Handled:
        """Act on one verified event. Recorded as handled only after it was acted on, so a delivery that fails
        half-way is acted on again when Stripe redelivers it."""
        event_id, event_type = event["id"], event["type"]
        with self._db.transaction() as session:
            if webhook_event_seen(session, event_id):
                return Handled(event_id, "duplicate")
        data = event.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        obj = obj if isinstance(obj, dict) else {}
        intent_id = obj.get("id")
        if (
            event_type not in PAYMENT_INTENT_EVENTS
            or not isinstance(intent_id, str)
            or not _STRIPE_ID.fullmatch(intent_id)
            or len(intent_id) > MAX_INTENT_ID
        ):
            self._remember(event_id, event_type, None, "ignored")
            return Handled(event_id, "ignored")
        metadata = obj.get("metadata")
        hint = metadata.get("recharged_recharge") if isinstance(metadata, dict) else None
        if not (isinstance(hint, str) and hint.isascii() and hint.isdigit() and len(hint) <= 18):
            hint = None  # our recharge ids are plain numbers that fit a BIGINT; "²" or 30 nines are not
        with self._db.transaction() as session:
            recharge_id = recharge_of_payment(session, intent_id, hint)
        if recharge_id is None:  # someone else's payment: no need to ask the processor about it
            self._remember(event_id, event_type, intent_id, "not_ours")
            return Handled(event_id, "not_ours")
        # Fetch it again: the processor's current state, not what the event said at the time it was sent.
        current = self._recharges.gateway.retrieve(intent_id)
        report = self._recharges.process(recharge_id)
        outcome = f"recharge {recharge_id} {report.phase} (payment {current.outcome})"
        log.info("webhook.handled", event_id=event_id, type=event_type, payment_intent=intent_id, outcome=outcome)
        self._remember(event_id, event_type, intent_id, outcome)
        return Handled(event_id, report.phase, recharge_id)

    def _remember(self, event_id: str, event_type: str, intent_id: str | None, outcome: str) -> None:
        with self._db.transaction() as session:
            record_webhook_event(
                session,
                {
                    "id": event_id,
                    "type": event_type[:80],
                    "payment_intent": intent_id,
                    "received_at": self._clock.now(),
                    "outcome": outcome[:200],
                },
            )
