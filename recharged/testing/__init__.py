"""Test doubles that ship with recharged because `recharged demo` needs them: a local Stripe-compatible server
(the real `stripe` SDK talks to it over HTTP; it keeps Stripe's idempotency, errors, refunds, disputes and
signed events) and nothing else. Crash points are not here: the charge flow and the outbox call them, so they
live beside the core in `recharged/faults.py`.

Only the entry points (cli/, daemon/, demo/) and the tests import this package.
"""

from __future__ import annotations

from recharged.testing.stripe_server import (
    API_VERSION,
    FAULTS,
    SANDBOX_RATE_LIMIT,
    TEST_PAYMENT_METHODS,
    Fault,
    RecordedRequest,
    StripeTestServer,
    TestCard,
    WebhookDelivery,
    WebhookEndpoint,
    decode_form,
)

__all__ = [
    "API_VERSION",
    "FAULTS",
    "SANDBOX_RATE_LIMIT",
    "TEST_PAYMENT_METHODS",
    "Fault",
    "RecordedRequest",
    "StripeTestServer",
    "TestCard",
    "WebhookDelivery",
    "WebhookEndpoint",
    "decode_form",
]
