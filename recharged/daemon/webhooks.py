"""Stripe webhooks: verify the signature on the raw body and check that it is an event recharged can keep.

What happens next is `recharged.events`: the verified event is stored in the inbox in one transaction and the
webhook is answered at once; the event is handled later, off the request path, once by its id, after re-reading
from the processor whatever it is about (its contents are never trusted: events arrive late, twice or out of
order).
"""

from __future__ import annotations

import json
import re
from typing import Any

import stripe

from recharged.errors import InputError, SignatureError
from recharged.events import HANDLED_EVENTS, PAYMENT_INTENT_EVENTS

__all__ = ["HANDLED_EVENTS", "MAX_EVENT_ID", "PAYMENT_INTENT_EVENTS", "verified_event"]

MAX_EVENT_ID = 255  # processor_events.id
# What Stripe's ids and event types look like; anything else (a NUL byte, say) could not even be looked up.
_STRIPE_ID = re.compile(r"[\x21-\x7e]+")
_STRIPE_TYPE = re.compile(r"[\x21-\x7e]{1,80}")


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
        event = json.loads(text, parse_constant=_not_json)  # NaN and Infinity are not JSON: PostgreSQL refuses them
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


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not a JSON number")
