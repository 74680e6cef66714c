"""A local, Stripe-compatible HTTP server for tests and in-process demos.

The real ``stripe`` SDK talks to it unchanged::

    with StripeTestServer() as server:
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url})
        client.v1.payment_intents.create(params={...})

It implements the slice of the v1 API that recharged uses with Stripe's response shapes and error bodies:
customers (create, update, delete), card payment methods (attach, detach, update), PaymentIntents (create,
confirm, cancel, list, search), charges, refunds, disputes, balance transactions and events. Stripe's documented
test payment methods behave as on Stripe (``pm_card_visa``, ``pm_card_chargeDeclinedInsufficientFunds``,
``pm_card_createDispute``, ``pm_card_refundFail``, ...). Every state change records an Event, which can be
delivered, signed as Stripe signs, to webhook endpoints. Idempotency keys follow Stripe's rules; faults can be
injected (``http_500``, ``http_500_stored``, ``http_500_after_commit``, ``http_429``, ``slow``,
``slow_after_commit``, ``drop_after_commit``) and latency and rate limits added. Test hooks stand in for what Stripe
does on its own (``close_dispute``, ``fail_refund``, ``settle_refund``, ``settle_processing``, ``update_card``).
Standard library only; binds to 127.0.0.1 unless given another ``host`` (``recharged testserver --host``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import email.utils
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import re
import secrets
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast, get_args
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "API_VERSION",
    "DEFAULT_IDEMPOTENCY_TTL",
    "FAULTS",
    "SANDBOX_RATE_LIMIT",
    "TEST_PAYMENT_METHODS",
    "Clock",
    "Fault",
    "RecordedRequest",
    "StripeTestServer",
    "TestCard",
    "WebhookDelivery",
    "WebhookEndpoint",
    "decode_form",
    "sign_payload",
]

_log = logging.getLogger(__name__)

JSON = dict[str, Any]
Clock = Callable[[], float]
"""A callable returning the current POSIX time (``time.time`` by default)."""

Fault = Literal[
    "http_500", "http_500_stored", "http_500_after_commit", "http_429", "slow", "slow_after_commit", "drop_after_commit"
]
FAULTS: frozenset[str] = frozenset(get_args(Fault))

DEFAULT_IDEMPOTENCY_TTL = 24 * 60 * 60.0
SANDBOX_RATE_LIMIT = 25
"""Stripe's basic rate limit in test mode: 25 reads and 25 writes per second (docs.stripe.com/rate-limits).
``StripeTestServer(rate_limit=SANDBOX_RATE_LIMIT)`` answers 429 beyond it, counting reads and writes apart."""

API_VERSION = "2026-10-28.endive"
_ALNUM = string.ascii_letters + string.digits
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_DESCRIPTION_LENGTH = 1000


# --------------------------------------------------------------------------- test cards


@dataclass(frozen=True)
class TestCard:
    """Behaviour and card details of one of Stripe's documented test payment methods."""

    __test__ = False  # not a pytest test class

    brand: str
    last4: str
    fingerprint: str
    outcome: Literal["succeeded", "declined", "authentication_required", "processing"] = "succeeded"
    code: str | None = None
    decline_code: str | None = None
    advice_code: str | None = None
    message: str | None = None
    param: str | None = None
    funding: str = "credit"
    country: str = "US"
    number: str | None = None
    """The card number Stripe documents for this behaviour (for reference: the server takes no raw numbers)."""
    dispute_reason: str | None = None
    """After a successful charge the cardholder disputes it with this reason (``fraudulent``, ...)."""
    refunds: Literal["succeeded", "pending", "fail_later"] = "succeeded"
    """How refunds of its charges behave: succeed at once, start ``pending``, or succeed and fail later."""


_DECLINED = "Your card was declined."
_AUTH_REQUIRED = "Your card was declined. This transaction requires authentication."

TEST_PAYMENT_METHODS: dict[str, TestCard] = {
    "pm_card_visa": TestCard("visa", "4242", "Xt5EWLLDS7FJjR1c", number="4242424242424242"),
    "pm_card_mastercard": TestCard("mastercard", "4444", "q0QtTgzLbCkTGVaB", number="5555555555554444"),
    "pm_card_chargeDeclined": TestCard(
        "visa",
        "0002",
        "nbWCzDTtvsMKeRI8",
        "declined",
        "card_declined",
        "generic_decline",
        None,
        _DECLINED,
        number="4000000000000002",
    ),
    "pm_card_chargeDeclinedInsufficientFunds": TestCard(
        "visa",
        "9995",
        "JXBsUvmFbsLtGrVk",
        "declined",
        "card_declined",
        "insufficient_funds",
        "try_again_later",
        "Your card has insufficient funds.",
        number="4000000000009995",
    ),
    "pm_card_chargeDeclinedLostCard": TestCard(
        "visa",
        "9987",
        "p4FHkWC0wRaeqhSj",
        "declined",
        "card_declined",
        "lost_card",
        "do_not_try_again",
        _DECLINED,
        number="4000000000009987",
    ),
    "pm_card_chargeDeclinedStolenCard": TestCard(
        "visa",
        "9979",
        "Zq3bqJd9SwVqJX0M",
        "declined",
        "card_declined",
        "stolen_card",
        "do_not_try_again",
        _DECLINED,
        number="4000000000009979",
    ),
    "pm_card_chargeDeclinedExpiredCard": TestCard(
        "visa",
        "0069",
        "a1N2ZaOIYzpkQDvm",
        "declined",
        "expired_card",
        "expired_card",
        "confirm_card_data",
        "Your card has expired.",
        "exp_month",
        number="4000000000000069",
    ),
    "pm_card_chargeDeclinedProcessingError": TestCard(
        "visa",
        "0119",
        "R9cd8zKEQGUmJdAq",
        "declined",
        "processing_error",
        "processing_error",
        "try_again_later",
        "An error occurred while processing your card. Try again in a little bit.",
        number="4000000000000119",
    ),
    "pm_card_authenticationRequired": TestCard(
        "visa",
        "3184",
        "hRq1AqtTWr9mZ7fJ",
        "authentication_required",
        "authentication_required",
        "authentication_required",
        None,
        _AUTH_REQUIRED,
        number="4000002760003184",
    ),
    # docs.stripe.com/testing#disputes: "With default account settings, charge succeeds, only to be disputed as
    # fraudulent" (4000000000000259) / "as product not received" (4000000000002685).
    "pm_card_createDispute": TestCard(
        "visa", "0259", "Dq0Vb3vfFmZr7Z2k", number="4000000000000259", dispute_reason="fraudulent"
    ),
    "pm_card_createDisputeProductNotReceived": TestCard(
        "visa", "2685", "Nk4Ue1wzsXgR9hLa", number="4000000000002685", dispute_reason="product_not_received"
    ),
    # docs.stripe.com/testing#refunds: 4000000000007726 "If you initiate a refund, its status begins as pending";
    # 4000000000005126 "its status begins as succeeded. Some time later, its status transitions to failed".
    "pm_card_pendingRefund": TestCard("visa", "7726", "Pr8sKq2LmYtW5eNd", number="4000000000007726", refunds="pending"),
    "pm_card_refundFail": TestCard("visa", "5126", "Fe6cJw3HnQzB1uTo", number="4000000000005126", refunds="fail_later"),
    # Not a Stripe name: cards never enter `processing` on Stripe (only asynchronous methods such as bank debits
    # do). This local card lets tests drive the asynchronous path; `StripeTestServer.settle_processing` ends it.
    "pm_card_asyncProcessing": TestCard("visa", "1117", "As9yPz4RoVcX2mGi", "processing"),
}

_CURRENCIES = frozenset(
    "usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd bwp byn bzd "
    "cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp gel gip gmd gnf gtq gyd "
    "hkd hnl htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf krw kwd kyd kzt lak lbp lkr lrd lsl mad "
    "mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr pln "
    "pyg qar ron rsd rub rwf sar sbd scr sek sgd shp sle sos srd std szl thb tjs tnd top try ttd twd tzs "
    "uah ugx uyu uzs vnd vuv wst xaf xcd xof xpf yer zar zmw".split()
)
_ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf vnd vuv xaf xof xpf".split())
# docs.stripe.com/currencies: ISK and UGX "transitioned to zero-decimal currencies, but backward compatibility requires
# you to represent [them] as a two-decimal value, where the decimal amount is always 00"; the three-decimal BHD, JOD,
# KWD, OMR and TND "require the least-significant (last) digit to be 0". The amount must be a multiple of these.
_AMOUNT_STEP = {"isk": 100, "ugx": 100, **dict.fromkeys("bhd jod kwd omr tnd".split(), 10)}
# Stripe's minimum charge amounts, in minor units (https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts).
_MINIMUM_AMOUNT = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50, "czk": 1500,
    "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50, "jpy": 50, "mxn": 1000,
    "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200, "sek": 300, "sgd": 50, "thb": 1000,
}  # fmt: skip
_MAXIMUM_AMOUNT = 99_999_999

# Writable params per endpoint, from the TypedDicts of stripe-python 16.1.0 (API version 2026-10-28.endive).
_PI_CONFIRM_PARAMS = frozenset(
    {
        "allowed_payment_method_types", "amount_details", "amount_to_confirm", "capture_method",
        "confirmation_token", "error_on_requires_action", "excluded_payment_method_types", "hooks", "mandate",
        "mandate_data", "off_session", "payment_details", "payment_method", "payment_method_data",
        "payment_method_options", "radar_options", "receipt_email", "return_url", "setup_future_usage",
        "shipping", "use_stripe_sdk",
    }
)  # fmt: skip
_PI_CREATE_PARAMS = (_PI_CONFIRM_PARAMS - {"amount_to_confirm"}) | {
    "amount", "application_fee_amount", "automatic_payment_methods", "confirm", "confirmation_method",
    "currency", "customer", "customer_account", "description", "metadata", "on_behalf_of",
    "payment_method_configuration", "statement_descriptor", "statement_descriptor_suffix",
    "transfer_data", "transfer_group",
}  # fmt: skip
_CUSTOMER_UPDATE_PARAMS = frozenset(
    {
        "address", "balance", "business_name", "cash_balance", "default_source", "description", "email",
        "individual_name", "invoice_prefix", "invoice_settings", "metadata", "name", "next_invoice_sequence",
        "phone", "preferred_locales", "shipping", "source", "tax", "tax_exempt", "validate",
    }
)  # fmt: skip
_CUSTOMER_CREATE_PARAMS = (_CUSTOMER_UPDATE_PARAMS - {"default_source"}) | {
    "payment_method", "tax_id_data", "test_clock",
}  # fmt: skip
_PAYMENT_METHOD_TYPES_REMOVED = "2026-09-30"  # endive: `payment_method_types` is no longer writable
_SUPPORTED_PAYMENT_METHOD_TYPES = frozenset({"card"})
_CONFIRMABLE = ("requires_payment_method", "requires_confirmation", "requires_action")
_CANCELABLE = ("requires_payment_method", "requires_capture", "requires_confirmation", "requires_action", "processing")

_REFUND_CREATE_PARAMS = frozenset(
    {
        "amount", "charge", "currency", "customer", "instructions_email", "metadata", "origin", "payment_intent",
        "reason", "refund_application_fee", "reverse_transfer",
    }
)  # fmt: skip
_REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
_PM_UPDATE_PARAMS = frozenset({"allow_redisplay", "billing_details", "card", "metadata", "us_bank_account"})
_DISPUTE_UPDATE_PARAMS = frozenset({"evidence", "intended_submission_method", "metadata", "submit"})
_DISPUTE_EVIDENCE_FIELDS = (
    "access_activity_log", "billing_address", "cancellation_policy", "cancellation_policy_disclosure",
    "cancellation_rebuttal", "customer_communication", "customer_email_address", "customer_name",
    "customer_purchase_ip", "customer_signature", "duplicate_charge_documentation", "duplicate_charge_explanation",
    "duplicate_charge_id", "product_description", "receipt", "refund_policy", "refund_policy_disclosure",
    "refund_refusal_explanation", "service_date", "service_documentation", "shipping_address", "shipping_carrier",
    "shipping_date", "shipping_documentation", "shipping_tracking_number", "uncategorized_file",
    "uncategorized_text",
)  # fmt: skip

# --------------------------------------------------------------------------- helpers


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def _new_id(prefix: str, n: int = 24) -> str:
    return f"{prefix}_{_rand(n)}"


_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def decode_form(pairs: Iterable[tuple[str, str]]) -> JSON:
    """Decode Stripe-style form pairs (``metadata[a]=1``, ``expand[0]=x``) into nested dicts and lists."""
    root: JSON = {}
    for raw_key, value in pairs:
        m = _KEY_RE.match(raw_key)
        parts = [m.group(1), *re.findall(r"\[([^\[\]]*)\]", m.group(2))] if m else [raw_key]
        node = root
        for part in parts[:-1]:
            key = part if part != "" else str(len(node))
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        last = parts[-1]
        node[last if last != "" else str(len(node))] = value
    return cast(JSON, _listify(root, None))


def _listify(value: Any, parent_key: str | None) -> Any:
    if not isinstance(value, dict):
        return value
    items = {k: _listify(v, k) for k, v in value.items()}
    if parent_key != "metadata" and items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


class _ApiError(Exception):
    """An error answered with Stripe's error body; raised before an endpoint commits any work."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        extra: JSON | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.extra = extra or {}
        self.should_retry = should_retry
        """Value of the ``Stripe-Should-Retry`` header (``None``: not sent, the client decides)."""

    def error_object(self) -> JSON:
        """The ``error`` member, leaving out null fields as Stripe does."""
        err: JSON = {"message": self.message, "type": self.type}
        if self.code:
            err["code"] = self.code
            err["doc_url"] = _doc_url(self.code)
        if self.param:
            err["param"] = self.param
        err.update(self.extra)
        return err


def _doc_url(code: str) -> str:
    return "https://docs.stripe.com/error-codes/" + code.replace("_", "-")


def _missing(param: str) -> _ApiError:
    return _ApiError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def _no_such(kind: str, ident: str, param: str, status: int = 400) -> _ApiError:
    return _ApiError(status, f"No such {kind}: '{ident}'", code="resource_missing", param=param)


def _check_unknown(params: JSON, allowed: Iterable[str]) -> None:
    allowed_set = set(allowed) | {"expand"}
    for key in params:
        if key not in allowed_set:
            raise _ApiError(400, f"Received unknown parameter: {key}", code="parameter_unknown", param=key)


def _opt_str(params: JSON, name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _ApiError(400, f"Invalid string: {value!r}", code="parameter_invalid_string", param=name)
    return value


def _parse_int(value: Any, param: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise _ApiError(400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=param)


def _parse_bool(params: JSON, name: str, default: bool = False) -> bool:
    value = params.get(name)
    if value is None or value == "":
        return default
    if value in ("true", "false"):
        return bool(value == "true")
    raise _ApiError(400, f"Invalid boolean: {value}", param=name)


def _metadata(value: Any, base: JSON | None = None) -> JSON:
    result: JSON = dict(base or {})
    if value is None:
        return result
    if value == "":
        return {}
    if not isinstance(value, dict):
        raise _ApiError(400, "Invalid object", param="metadata")
    for key, val in value.items():
        if len(key) > 40:
            raise _ApiError(400, "Metadata keys can have a maximum length of 40 characters.", param=f"metadata[{key}]")
        if val == "":
            result.pop(key, None)
            continue
        if not isinstance(val, str) or len(val) > 500:
            raise _ApiError(
                400, "Metadata values can have a maximum length of 500 characters.", param=f"metadata[{key}]"
            )
        result[key] = val
    if len(result) > 50:
        raise _ApiError(400, "You can have at most 50 metadata keys.", param="metadata")
    return result


def _format_amount(amount: int, currency: str) -> str:
    if currency in _ZERO_DECIMAL:
        return f"{amount} {currency}"
    symbol = "$" if currency == "usd" else ""
    return f"{symbol}{amount / 100:,.2f} {currency}"


_SYMBOLS = {"usd": "$", "cad": "$", "aud": "$", "nzd": "$", "sgd": "$", "hkd": "$", "gbp": "£", "eur": "€"}


def _format_money(amount: int, currency: str) -> str:
    """Money as Stripe's refund errors print it: ``$20.00``, ``£93.90``, ``€7.00`` (else ``1000 JPY``)."""
    if currency in _ZERO_DECIMAL:
        return f"{amount} {currency.upper()}"
    symbol = _SYMBOLS.get(currency)
    return f"{symbol}{amount / 100:,.2f}" if symbol else f"{amount / 100:,.2f} {currency.upper()}"


def _too_long(value: str, param: str, limit: int) -> _ApiError:
    """Stripe's error for an over-long string, which quotes its first and last four characters
    (seen in the wild: "Invalid string: P1_e...Gvxg; must be at most 5000 characters")."""
    return _ApiError(
        400, f"Invalid string: {value[:4]}...{value[-4:]}; must be at most {limit} characters", param=param
    )


def _event_type_matches(pattern: str, event_type: str) -> bool:
    """Stripe's event type filters: an exact type, ``*``, or a group such as ``charge.dispute.*``."""
    if pattern in ("*", event_type):
        return True
    return pattern.endswith(".*") and event_type.startswith(pattern[:-1])


def _expand_list(params: JSON) -> list[str]:
    value = params.get("expand")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _ApiError(400, "Invalid array", param="expand")


def _search_predicate(fld: str, mkey: str | None, value: str) -> Callable[[JSON], bool]:
    def predicate(pi: JSON) -> bool:
        if fld == "metadata":
            return bool(pi["metadata"].get(mkey) == value)
        return str(pi[fld]) == value

    return predicate


# --------------------------------------------------------------------------- public records


@dataclass
class RecordedRequest:
    """One request received by the server (a snapshot; later changes are not reflected)."""

    method: str
    path: str
    params: JSON
    """Decoded form body for POST, decoded query string otherwise."""
    idempotency_key: str | None
    stripe_version: str | None
    request_id: str
    received_at: float
    """Time from the server clock."""
    arrived: float = 0.0
    """``time.monotonic()`` when the request arrived, whatever the server clock says: for measuring pacing."""
    status: int | None = None
    """Status code the server produced (``None`` while in flight or when the server stopped first)."""
    replayed: bool = False
    """The response was an idempotent replay of an earlier one."""
    dropped: bool = False
    """The connection was closed without an answer (``drop_after_commit``)."""
    fault: str | None = None
    """The injected fault applied to this request, if any."""


@dataclass
class _FaultRule:
    fault: Fault
    path_prefix: str | None
    method: str | None
    remaining: int | None
    seconds: float

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_prefix is None or path.startswith(self.path_prefix)
        )


@dataclass
class _IdemRecord:
    method: str
    path: str
    params: JSON
    created_at: float
    request_id: str
    status: int | None = None  # None while the first request is in progress
    body: JSON | None = None


@dataclass
class _Response:
    status: int
    body: JSON
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Ctx:
    method: str
    path: str
    params: JSON
    request_id: str
    now: int
    api_version: str
    idempotency_key: str | None = None


@dataclass
class _PaymentMethod:
    obj: JSON
    card: TestCard
    detached: bool = False
    """Detached from its customer (or the customer was deleted): Stripe refuses to use it again."""


# --------------------------------------------------------------------------- webhooks

# Stripe signs each delivery with `Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256>`, the HMAC keyed with the
# endpoint's signing secret over "<t>.<raw body>" (docs.stripe.com/webhooks, "Verify signatures manually"), so
# `stripe.Webhook.construct_event` accepts what is sent here. "In test mode, Stripe retries three times over a few
# hours"; here the retries are as many, but seconds apart.

DEFAULT_WEBHOOK_ATTEMPTS = 4
"""One delivery and three retries, as Stripe does in test mode."""


def sign_payload(body: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header Stripe would send for ``body`` signed at ``timestamp``."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True)
class WebhookEndpoint:
    """Where the server POSTs events (see :meth:`StripeTestServer.webhook_endpoint`)."""

    id: str
    url: str
    secret: str
    enabled_events: tuple[str, ...] = ("*",)
    max_attempts: int = DEFAULT_WEBHOOK_ATTEMPTS
    retry_delay: float = 0.5
    """Seconds before the first retry; doubled for each later one."""
    timeout: float = 5.0

    def wants(self, event_type: str) -> bool:
        return any(_event_type_matches(pattern, event_type) for pattern in self.enabled_events)


@dataclass(frozen=True)
class WebhookDelivery:
    """One attempt to deliver an event to an endpoint."""

    event_id: str
    event_type: str
    endpoint_id: str
    url: str
    attempt: int
    """1 for the first delivery, 2 for the first retry, ..."""
    status: int | None
    """HTTP status the endpoint answered (``None``: no answer, see ``error``)."""
    error: str | None
    signature: str
    """The ``Stripe-Signature`` header sent."""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    endpoint: WebhookEndpoint = field(compare=False)
    event_id: str = field(compare=False)
    event_type: str = field(compare=False)
    body: bytes = field(compare=False)
    attempt: int = field(compare=False, default=1)


class WebhookDispatcher:
    """A background thread that POSTs queued events, retrying non-2xx answers with exponential back-off."""

    def __init__(self, signing_clock: Callable[[], Clock], on_result: Callable[[WebhookDelivery], None]) -> None:
        self._signing_clock = signing_clock
        self._on_result = on_result
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._stopping = False
        self._generation = 0  # a thread left over from before stop() exits instead of running beside a new one
        self._thread: threading.Thread | None = None
        # Never route deliveries through an HTTP(S)_PROXY from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def enqueue(self, endpoint: WebhookEndpoint, event_id: str, event_type: str, body: bytes) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._run, args=(self._generation,), name="stripe-testserver-webhooks", daemon=True
                )
                self._thread.start()
            heapq.heappush(
                self._queue, _Pending(time.monotonic(), next(self._seq), endpoint, event_id, event_type, body)
            )
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or in flight (retries included); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._in_flight == 0, timeout)

    def stop(self) -> None:
        """Stop the thread, dropping queued deliveries."""
        with self._cond:
            self._stopping = True
            self._generation += 1
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
        with self._cond:
            self._thread = None

    def _run(self, generation: int) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._queue[0].due > time.monotonic()):
                    wait = self._queue[0].due - time.monotonic() if self._queue else None
                    self._cond.wait(wait)
                if self._stopping or generation != self._generation:
                    return
                item = heapq.heappop(self._queue)
                self._in_flight += 1
            try:
                delivery = self._post(item)
            except Exception as exc:  # a malformed URL, ...: a failed attempt like any other
                delivery = WebhookDelivery(
                    item.event_id,
                    item.event_type,
                    item.endpoint.id,
                    item.endpoint.url,
                    item.attempt,
                    None,
                    repr(exc),
                    "",
                )
            with contextlib.suppress(Exception):
                self._on_result(delivery)
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()
                if generation != self._generation:
                    return
                if not delivery.ok and item.attempt < item.endpoint.max_attempts and not self._stopping:
                    delay = item.endpoint.retry_delay * 2 ** (item.attempt - 1)
                    item.due, item.seq, item.attempt = time.monotonic() + delay, next(self._seq), item.attempt + 1
                    heapq.heappush(self._queue, item)

    def _post(self, item: _Pending) -> WebhookDelivery:
        endpoint = item.endpoint
        signature = sign_payload(item.body, endpoint.secret, int(self._signing_clock()()))
        request = urllib.request.Request(  # noqa: S310 - the URL is checked to be http(s) at registration
            endpoint.url,
            data=item.body,
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                "Stripe-Signature": signature,
            },
        )
        status: int | None = None
        error: str | None = None
        try:
            with self._opener.open(request, timeout=endpoint.timeout) as response:
                status = int(response.status)
                response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (urllib.error.URLError, OSError) as exc:
            error = str(exc)
        _log.debug("stripe-testserver: webhook %s to %s: %s", item.event_id, endpoint.url, status or error)
        return WebhookDelivery(
            item.event_id, item.event_type, endpoint.id, endpoint.url, item.attempt, status, error, signature
        )


_STRIPE_500 = (
    "Sorry, something went wrong. We've already been notified of the problem, but if you need any help, you can "
    "reach us at https://support.stripe.com/contact."
)
_PM_REUSED = (
    "The provided PaymentMethod was previously used with a PaymentIntent without Customer attachment, shared with a "
    "connected account without Customer attachment, or was detached from a Customer. It may not be used again. To "
    "use a PaymentMethod multiple times, you must attach it to a Customer first."
)
_PM_REATTACHED = (
    "This PaymentMethod was previously used without being attached to a Customer or was detached from a Customer, "
    "and may not be used again."
)
_DISPUTE_FEE = 1500  # Stripe's dispute fee in the US, taken with the withdrawal and returned when the dispute is won
_NETWORK_REASON_CODES = {"fraudulent": "10.4", "product_not_received": "13.1"}  # Visa's codes for these reasons
_OPEN_DISPUTE = ("needs_response", "under_review", "warning_needs_response", "warning_under_review")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: StripeTestServer, host: str, port: int) -> None:
        self.owner = owner
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stripe-testserver"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cast(_HTTPServer, self.server).owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            cast(_HTTPServer, self.server).owner._track(self.connection, False)

    def _dispatch(self) -> None:
        try:
            cast(_HTTPServer, self.server).owner._serve(self)
        except OSError:  # client went away, or the server is stopping
            self.close_connection = True

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _dispatch

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header (RFC 7231 IMF-fixdate, as Stripe sends it), from the server's clock."""
        if timestamp is None:
            timestamp = cast(_HTTPServer, self.server).owner.clock()
        return email.utils.formatdate(timestamp, usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("stripe-testserver: " + format, *args)


# --------------------------------------------------------------------------- the server


class StripeTestServer:
    """A local Stripe-compatible API server (v1 subset) with fault injection and inspection hooks.

    Thread-safe; use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        clock: Clock | None = None,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        latency: float = 0.0,
        rate_limit: float | None = None,
        strict_return_url: bool = True,
        signing_clock: Clock | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """Create a stopped server.

        ``port`` 0 lets the OS pick a free port on ``host`` (127.0.0.1 unless told otherwise). ``clock`` drives
        ``created`` timestamps, the ``Date`` header and idempotency-key expiry; ``idempotency_ttl`` is how long
        keys are held (seconds); ``latency`` is added to every request; ``rate_limit`` is a maximum number of
        reads, and of writes, per second (429 beyond it, as Stripe's limiter; ``None`` disables;
        :data:`SANDBOX_RATE_LIMIT` is Stripe's test-mode limit). With ``strict_return_url``, confirming a
        PaymentIntent whose automatic payment methods allow redirects without a ``return_url`` fails as on real
        Stripe; pass ``allowed_payment_method_types=["card"]`` or ``automatic_payment_methods[allow_redirects]=never``.
        ``signing_clock`` gives the timestamps of webhook signatures; it defaults to the real ``time.time``
        because receivers (``stripe.Webhook.construct_event``) compare them with the system clock.
        """
        self.clock: Clock = clock or time.time
        self.signing_clock: Clock = signing_clock or time.time
        self._requested_port = port
        self._host = host
        self.idempotency_ttl = idempotency_ttl
        self.latency = latency
        self.strict_return_url = strict_return_url
        self._rate_limit = rate_limit
        # Top-level POST parameters answered with 400 parameter_unknown before anything runs (validation: nothing
        # is stored against the key), like an emulator or an older API version that does not know them.
        self.unsupported_parameters: set[str] = set()
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._faults: list[_FaultRule] = []
        self._rate_windows: dict[str, deque[float]] = {"read": deque(), "write": deque()}
        self._requests: list[RecordedRequest] = []
        self._idempotency: OrderedDict[str, _IdemRecord] = OrderedDict()
        self._customers: dict[str, JSON] = {}
        self._payment_methods: dict[str, _PaymentMethod] = {}
        self._payment_intents: dict[str, JSON] = {}
        self._charges: dict[str, JSON] = {}
        self._deleted_customers: dict[str, JSON] = {}
        self._refunds: dict[str, JSON] = {}
        self._disputes: dict[str, JSON] = {}
        self._balance_transactions: dict[str, JSON] = {}
        self._events: dict[str, JSON] = {}
        self._endpoints: dict[str, WebhookEndpoint] = {}
        self._deliveries: list[WebhookDelivery] = []
        self._webhooks = WebhookDispatcher(lambda: self.signing_clock, self._delivered)
        self._seq: dict[str, int] = {}
        self._pmc_id = _new_id("pmc")
        self._routes: list[tuple[str, re.Pattern[str], Callable[[_Ctx, tuple[str, ...]], _Response]]] = [
            ("POST", re.compile(r"/v1/customers"), self._customer_create),
            ("GET", re.compile(r"/v1/customers/([^/]+)"), self._customer_retrieve),
            ("POST", re.compile(r"/v1/customers/([^/]+)"), self._customer_update),
            ("DELETE", re.compile(r"/v1/customers/([^/]+)"), self._customer_delete),
            ("GET", re.compile(r"/v1/customers/([^/]+)/payment_methods"), self._customer_pm_list),
            ("GET", re.compile(r"/v1/customers/([^/]+)/payment_methods/([^/]+)"), self._customer_pm_retrieve),
            ("GET", re.compile(r"/v1/payment_methods/([^/]+)"), self._pm_retrieve),
            ("POST", re.compile(r"/v1/payment_methods/([^/]+)"), self._pm_update),
            ("POST", re.compile(r"/v1/payment_methods/([^/]+)/attach"), self._pm_attach),
            ("POST", re.compile(r"/v1/payment_methods/([^/]+)/detach"), self._pm_detach),
            ("POST", re.compile(r"/v1/payment_intents"), self._pi_create),
            ("GET", re.compile(r"/v1/payment_intents"), self._pi_list),
            ("GET", re.compile(r"/v1/payment_intents/search"), self._pi_search),
            ("GET", re.compile(r"/v1/payment_intents/([^/]+)"), self._pi_retrieve),
            ("POST", re.compile(r"/v1/payment_intents/([^/]+)/confirm"), self._pi_confirm),
            ("POST", re.compile(r"/v1/payment_intents/([^/]+)/cancel"), self._pi_cancel),
            ("GET", re.compile(r"/v1/charges/([^/]+)"), self._charge_retrieve),
            ("POST", re.compile(r"/v1/refunds"), self._refund_create),
            ("GET", re.compile(r"/v1/refunds"), self._refund_list),
            ("GET", re.compile(r"/v1/refunds/([^/]+)"), self._refund_retrieve),
            ("POST", re.compile(r"/v1/refunds/([^/]+)"), self._refund_update),
            ("GET", re.compile(r"/v1/disputes"), self._dispute_list),
            ("GET", re.compile(r"/v1/disputes/([^/]+)"), self._dispute_retrieve),
            ("POST", re.compile(r"/v1/disputes/([^/]+)"), self._dispute_update),
            ("POST", re.compile(r"/v1/disputes/([^/]+)/close"), self._dispute_close),
            ("GET", re.compile(r"/v1/balance_transactions/([^/]+)"), self._balance_transaction_retrieve),
            ("GET", re.compile(r"/v1/events"), self._event_list),
            ("GET", re.compile(r"/v1/events/([^/]+)"), self._event_retrieve),
        ]

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> StripeTestServer:
        """Start serving on its host (OS-assigned port unless one was given); returns ``self``. OSError when the
        address cannot be listened on (in use, not this machine's)."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(self, self._host, self._requested_port)
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, name="stripe-testserver", daemon=True
        )
        self._httpd, self._thread = httpd, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close open connections. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = self._thread = None
        self._webhooks.stop()

    def __enter__(self) -> StripeTestServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("StripeTestServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base address for ``StripeClient(base_addresses={"api": url})``."""
        return f"http://{self._host}:{self.port}"

    # ----------------------------------------------------------------- configuration

    @property
    def rate_limit(self) -> float | None:
        """Maximum requests per second before answering 429 (``None``: unlimited)."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: float | None) -> None:
        with self._lock:
            self._rate_limit = value
            for window in self._rate_windows.values():
                window.clear()

    def inject(
        self,
        fault: Fault,
        *,
        path_prefix: str | None = "/v1/payment_intents",
        method: str | None = "POST",
        times: int | None = 1,
        seconds: float = 1.0,
    ) -> None:
        """Make the next ``times`` matching requests (``None``: all of them) fail with ``fault``.

        ``http_500`` / ``http_429`` answer an error before the endpoint starts (nothing is done or stored under
        the idempotency key, so a retry does the work; the 500 says ``Stripe-Should-Retry: true``).
        ``http_500_stored`` fails once the endpoint has started, before it changes anything: the 500 is saved
        under the idempotency key and replayed to every retry with that key until it expires, as Stripe does
        (``Stripe-Should-Retry: false``). ``http_500_after_commit`` is the same but after the work was done (its
        events are emitted): the indeterminate 500 Stripe warns about. ``slow`` sleeps ``seconds`` after taking
        the idempotency key and before doing the work; ``slow_after_commit`` answers ``seconds`` late, after the
        work was done and its result stored under the key (a client that gave up sooner has timed out after the
        charge; a retry with the key gets the stored answer, late again while the fault lasts).
        ``drop_after_commit`` does the work, stores the result and idempotency record, then closes the connection
        without answering. ``path_prefix`` / ``method`` of
        ``None`` match anything.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._lock:
            self._faults.append(
                _FaultRule(fault, path_prefix, method.upper() if method else None, times, float(seconds))
            )

    def clear_faults(self) -> None:
        """Remove every pending injected fault."""
        with self._lock:
            self._faults.clear()

    # ----------------------------------------------------------------- inspection

    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (copies)."""
        with self._lock:
            return [replace(r, params=copy.deepcopy(r.params)) for r in self._requests]

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def payment_intents(self, *, customer: str | None = None, status: str | None = None) -> list[JSON]:
        """Stored PaymentIntents (declined ones included), oldest first, as API JSON copies."""
        with self._lock:
            return [
                copy.deepcopy(pi)
                for pi in self._payment_intents.values()
                if (customer is None or pi["customer"] == customer) and (status is None or pi["status"] == status)
            ]

    def charges(self) -> list[JSON]:
        """Stored charges (failed ones included), oldest first."""
        with self._lock:
            return copy.deepcopy(list(self._charges.values()))

    def customers(self) -> list[JSON]:
        """Stored customers, oldest first."""
        with self._lock:
            return copy.deepcopy(list(self._customers.values()))

    def payment_methods(self) -> list[JSON]:
        """Stored payment methods (attached or not), oldest first."""
        with self._lock:
            return [copy.deepcopy(pm.obj) for pm in self._payment_methods.values()]

    def idempotency_status(self, key: str) -> Literal["in_progress", "completed"] | None:
        """Whether the server currently holds ``key`` (``None`` if unknown or expired)."""
        with self._lock:
            record = self._live_idempotency_record(key)
            if record is None:
                return None
            return "in_progress" if record.status is None else "completed"

    # ----------------------------------------------------------------- request pipeline

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; returns False if it is."""
        if seconds > 0:
            self._stopping.wait(seconds)
        return not self._stopping.is_set()

    def _serve(self, h: _Handler) -> None:
        arrived = time.monotonic()
        split = urlsplit(h.path)
        path = unquote(split.path).rstrip("/") or "/"
        method = h.command.upper()
        try:
            length = int(h.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = h.rfile.read(length) if length > 0 else b""
        query = decode_form(parse_qsl(split.query, keep_blank_values=True))
        body = decode_form(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)) if raw else {}
        params = body if method == "POST" else query
        key = h.headers.get("Idempotency-Key") if method == "POST" else None
        request_id = _new_id("req", 14)
        record = RecordedRequest(
            method=method,
            path=path,
            params=copy.deepcopy(params),
            idempotency_key=key,
            stripe_version=h.headers.get("Stripe-Version"),
            request_id=request_id,
            received_at=self.clock(),
            arrived=arrived,
        )
        with self._lock:
            self._requests.append(record)
        api_version = h.headers.get("Stripe-Version") or API_VERSION
        headers = {"Request-Id": request_id, "Stripe-Version": api_version}
        if key is not None:
            headers["Idempotency-Key"] = key

        if not self._sleep(self.latency):
            h.close_connection = True
            return
        rule = self._take_fault(method, path)
        if rule is not None:
            with self._lock:
                record.fault = rule.fault
        response, replayed, dropped = self._process(h, method, path, params, key, request_id, api_version, rule)
        if rule is not None and rule.fault == "slow_after_commit" and not self._sleep(rule.seconds):
            response = None
        if response is None or self._stopping.is_set():
            h.close_connection = True
            return
        response.headers.update(headers)
        with self._lock:
            record.status, record.replayed, record.dropped = response.status, replayed, dropped
        if dropped:
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, response)

    def _process(
        self,
        h: _Handler,
        method: str,
        path: str,
        params: JSON,
        key: str | None,
        request_id: str,
        api_version: str,
        rule: _FaultRule | None,
    ) -> tuple[_Response | None, bool, bool]:
        """Run one request; returns (response or None if the server stopped, replayed, dropped)."""
        fault = rule.fault if rule is not None else None
        drop = fault == "drop_after_commit"
        try:
            self._authenticate(h.headers.get("Authorization"))
            self._check_rate_limit(method)
            if fault == "http_500":  # before the endpoint runs: nothing saved, a retry does the work
                raise _ApiError(500, _STRIPE_500, type_="api_error", should_retry=True)
            if fault == "http_429":
                raise self._rate_limit_error()
            route = self._route(method, path)
            unsupported = sorted(self.unsupported_parameters & params.keys()) if method == "POST" else []
            if unsupported:  # an emulator (or an API version) that does not know a parameter we send
                name = unsupported[0]
                raise _ApiError(400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name)
        except _ApiError as err:
            return self._error_response(err, request_id), False, False

        if key is not None:
            try:
                replay = self._idempotency_begin(key, method, path, params, request_id)
            except _ApiError as err:
                return self._error_response(err, request_id), False, False
            if replay is not None:
                return replay, True, drop

        if rule is not None and rule.fault == "slow" and not self._sleep(rule.seconds):
            self._idempotency_abort(key)
            return None, False, False

        # "For API v1, Stripe saves the status code and body of the first request made with a given idempotency
        # key after endpoint execution begins. Retries with the same key return the saved response, including
        # 500 errors." Validation failures happen before execution and are not saved (docs.stripe.com/api/
        # idempotent_requests); a stored 500 says Stripe-Should-Retry: false since a retry only replays it.
        stored_500 = _ApiError(500, _STRIPE_500, type_="api_error", should_retry=False if key else None)
        if fault == "http_500_stored":
            response = self._error_response(stored_500, request_id)
            if key is not None:
                self._idempotency_commit(key, response)
            return response, False, False

        handler, groups = route
        committed = True
        try:
            with self._lock:
                ctx = _Ctx(method, path, params, request_id, int(self.clock()), api_version, key)
                response = handler(ctx, groups)
            if fault == "http_500_after_commit":
                response = self._error_response(stored_500, request_id)
        except _ApiError as err:
            committed = False
            response = self._error_response(err, request_id)
        except Exception:
            _log.exception("stripe-testserver: unhandled error for %s %s", method, path)
            committed = False
            response = self._error_response(
                _ApiError(500, "stripe-testserver internal error", type_="api_error"), request_id
            )
        if key is not None:
            if committed:
                self._idempotency_commit(key, response)
            else:
                self._idempotency_abort(key)
        return response, False, drop

    def _send(self, h: _Handler, response: _Response) -> None:
        data = (json.dumps(response.body, indent=2) + "\n").encode()
        h.send_response(response.status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Cache-Control", "no-cache, no-store")
        for name, value in response.headers.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    def _error_response(self, err: _ApiError, request_id: str) -> _Response:
        body = err.error_object()
        body["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}?t={int(self.clock())}"
        headers = {} if err.should_retry is None else {"Stripe-Should-Retry": str(err.should_retry).lower()}
        return _Response(err.status, {"error": body}, headers)

    def _take_fault(self, method: str, path: str) -> _FaultRule | None:
        with self._lock:
            for rule in self._faults:
                if rule.matches(method, path):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._faults.remove(rule)
                    return rule
        return None

    def _authenticate(self, header: str | None) -> None:
        if not header:
            raise _ApiError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization header, "
                "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
                "https://stripe.com/docs/api#authentication for details, or we can help at "
                "https://support.stripe.com/.",
            )
        scheme, _, api_key = header.partition(" ")
        api_key = api_key.strip()
        if scheme.lower() == "basic":  # curl -u sk_test_...:
            try:
                api_key = base64.b64decode(api_key).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                api_key = ""
        elif scheme.lower() != "bearer":
            api_key = ""
        if not api_key.startswith(("sk_test_", "rk_test_")) or len(api_key) <= len("sk_test_"):
            shown = api_key[:8] + "*" * max(0, len(api_key) - 12) + api_key[-4:] if len(api_key) > 12 else api_key
            raise _ApiError(401, f"Invalid API Key provided: {shown}", code="api_key_invalid" if api_key else None)

    def _rate_limit_error(self) -> _ApiError:
        return _ApiError(
            429,
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
            code="rate_limit",
        )

    def _check_rate_limit(self, method: str) -> None:
        """Stripe's rate limiter counts reads and writes apart ("Test mode: 25 read operations and 25 write
        operations" per second, docs.stripe.com/rate-limits)."""
        with self._lock:
            limit = self._rate_limit
            if limit is None:
                return
            now = time.monotonic()
            window = self._rate_windows["read" if method == "GET" else "write"]
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= limit:
                raise self._rate_limit_error()
            window.append(now)

    def _route(self, method: str, path: str) -> tuple[Callable[[_Ctx, tuple[str, ...]], _Response], tuple[str, ...]]:
        for route_method, pattern, handler in self._routes:
            m = pattern.fullmatch(path)
            if m and route_method == method:
                return handler, m.groups()
        raise _ApiError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at "
            "https://support.stripe.com/.",
        )

    # ----------------------------------------------------------------- idempotency

    def _live_idempotency_record(self, key: str) -> _IdemRecord | None:
        now = self.clock()
        while self._idempotency:  # prune expired keys, oldest first
            oldest = next(iter(self._idempotency.values()))
            if oldest.status is None or oldest.created_at + self.idempotency_ttl > now:
                break
            self._idempotency.popitem(last=False)
        record = self._idempotency.get(key)
        if record is not None and record.status is not None and record.created_at + self.idempotency_ttl <= now:
            del self._idempotency[key]
            return None
        return record

    def _idempotency_begin(self, key: str, method: str, path: str, params: JSON, request_id: str) -> _Response | None:
        if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise _ApiError(
                400,
                f"Invalid idempotency key: keys must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters long.",
                param="Idempotency-Key",
            )
        with self._lock:
            record = self._live_idempotency_record(key)
            if record is None:
                self._idempotency[key] = _IdemRecord(method, path, copy.deepcopy(params), self.clock(), request_id)
                return None
            if (record.method, record.path, record.params) != (method, path, params):
                raise _ApiError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters they were first used "
                    f"with. Try using a key other than '{key}' if you meant to execute a different request.",
                    type_="idempotency_error",
                )
            if record.status is None or record.body is None:
                raise _ApiError(
                    409,
                    "There is currently another in-progress request using this Idempotent Key (that probably "
                    f"means you submitted twice, and the other request is still going through): {key}. Please "
                    "try again later.",
                    type_="idempotency_error",
                    code="idempotency_key_in_use",
                    should_retry=True,
                )
            headers = {"Idempotent-Replayed": "true", "Original-Request": record.request_id}
            if record.status >= 400:  # replaying a saved error again would change nothing
                headers["Stripe-Should-Retry"] = "false"
            return _Response(record.status, copy.deepcopy(record.body), headers)

    def _idempotency_commit(self, key: str, response: _Response) -> None:
        with self._lock:
            record = self._idempotency.get(key)
            if record is not None and record.status is None:
                record.status, record.body = response.status, copy.deepcopy(response.body)
                response.headers["Original-Request"] = record.request_id

    def _idempotency_abort(self, key: str | None) -> None:
        if key is None:
            return
        with self._lock:
            record = self._idempotency.get(key)
            if record is not None and record.status is None:
                del self._idempotency[key]

    # ----------------------------------------------------------------- object helpers

    def _remember_order(self, ident: str) -> None:
        """Record creation order, to sort objects created within the same second."""
        self._seq[ident] = len(self._seq)

    def _render(self, obj: JSON, expand: list[str]) -> JSON:
        out = copy.deepcopy(obj)
        for path in expand:
            self._expand(out, path.split("."), path)
        return out

    def _expand(self, obj: JSON, parts: list[str], full: str) -> None:
        head, rest = parts[0], parts[1:]
        if obj.get("object") in ("list", "search_result") and head == "data" and rest:
            for item in obj["data"]:
                self._expand(item, rest, full)
            return
        if head not in obj:
            raise _ApiError(400, f"This property cannot be expanded ({full}).", param="expand")
        value = obj[head]
        if isinstance(value, str):
            value = copy.deepcopy(self._lookup(value, full))
            obj[head] = value
        if rest and isinstance(value, dict):
            self._expand(value, rest, full)

    def _lookup(self, ident: str, full: str) -> JSON:
        if ident in self._customers:
            return self._customers[ident]
        if ident in self._payment_methods:
            return self._payment_methods[ident].obj
        if ident in self._payment_intents:
            return self._payment_intents[ident]
        for table in (self._charges, self._refunds, self._disputes, self._balance_transactions):
            if ident in table:
                return table[ident]
        raise _ApiError(400, f"This property cannot be expanded ({full}).", param="expand")

    def _list(self, items: list[JSON], params: JSON, url: str, kind: str) -> JSON:
        """Stripe list semantics: newest first, ``limit``, ``starting_after`` / ``ending_before`` cursors."""
        limit = _parse_int(params["limit"], "limit") if params.get("limit") not in (None, "") else 10
        if not 1 <= limit <= 100:
            raise _ApiError(
                400, "This value must be greater than or equal to 1 and less than or equal to 100.", param="limit"
            )
        ordered = sorted(items, key=lambda o: (o["created"], self._seq.get(o["id"], 0)), reverse=True)
        ids = [o["id"] for o in ordered]
        starting_after, ending_before = _opt_str(params, "starting_after"), _opt_str(params, "ending_before")
        if starting_after is not None:
            if starting_after not in ids:
                raise _no_such(kind, starting_after, "starting_after")
            rest = ordered[ids.index(starting_after) + 1 :]
            page, has_more = rest[:limit], len(rest) > limit
        elif ending_before is not None:
            if ending_before not in ids:
                raise _no_such(kind, ending_before, "ending_before")
            before = ordered[: ids.index(ending_before)]
            page, has_more = before[-limit:], len(before) > limit
        else:
            page, has_more = ordered[:limit], len(ordered) > limit
        result: JSON = {"object": "list", "data": copy.deepcopy(page), "has_more": has_more, "url": url}
        return self._render(result, _expand_list(params))

    @staticmethod
    def _created_filter(params: JSON) -> Callable[[JSON], bool]:
        created = params.get("created")
        if created is None or created == "":
            return lambda _o: True
        if isinstance(created, str):
            exact = _parse_int(created, "created")
            return lambda o: bool(o["created"] == exact)
        if not isinstance(created, dict):
            raise _ApiError(400, "Invalid created", param="created")
        ops: dict[str, Callable[[int, int], bool]] = {
            "gt": lambda a, b: a > b,
            "gte": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "lte": lambda a, b: a <= b,
        }
        bounds = []
        for op, raw in created.items():
            if op not in ops:
                raise _ApiError(400, f"Received unknown parameter: created[{op}]", param=f"created[{op}]")
            bounds.append((ops[op], _parse_int(raw, f"created[{op}]")))
        return lambda o: all(fn(o["created"], bound) for fn, bound in bounds)

    # ----------------------------------------------------------------- customers

    def _get_customer(self, ident: str, param: str = "id", status: int = 404) -> JSON:
        customer = self._customers.get(ident)
        if customer is None:
            raise _no_such("customer", ident, param, status)
        return customer

    def _customer_create(self, ctx: _Ctx, _groups: tuple[str, ...], cus_id: str | None = None) -> _Response:
        p = ctx.params
        _check_unknown(p, _CUSTOMER_CREATE_PARAMS)
        metadata = _metadata(p.get("metadata"))
        pm_param = _opt_str(p, "payment_method")
        if pm_param is not None:
            self._resolve_pm_for_use(pm_param, "payment_method")
        invoice_settings = p.get("invoice_settings")
        default_pm = invoice_settings.get("default_payment_method") if isinstance(invoice_settings, dict) else None
        default_pm = default_pm or None
        if default_pm is not None and default_pm != pm_param:
            raise _ApiError(
                400,
                f"No such PaymentMethod: '{default_pm}'",
                code="resource_missing",
                param="invoice_settings[default_payment_method]",
            )
        cus_id = cus_id or _new_id("cus", 14)
        customer: JSON = {
            "address": None,
            "balance": 0,
            "created": ctx.now,
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": _opt_str(p, "description"),
            "discount": None,
            "email": _opt_str(p, "email"),
            "id": cus_id,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": metadata,
            "name": _opt_str(p, "name"),
            "next_invoice_sequence": 1,
            "object": "customer",
            "phone": _opt_str(p, "phone"),
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self._customers[cus_id] = customer
        self._remember_order(cus_id)
        attached: _PaymentMethod | None = None
        if pm_param is not None:
            attached = self._materialize_pm(pm_param, ctx.now)
            attached.obj["customer"] = cus_id
            if default_pm is not None:
                customer["invoice_settings"]["default_payment_method"] = attached.obj["id"]
        self._emit("customer.created", customer, ctx)
        if attached is not None:
            self._emit("payment_method.attached", attached.obj, ctx)
        return _Response(200, self._render(customer, _expand_list(p)))

    def _customer_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        deleted = self._deleted_customers.get(groups[0])
        if deleted is not None:  # "If it's for a deleted Customer, a subset of the customer's information is
            return _Response(200, copy.deepcopy(deleted))  # returned, including a deleted property set to true"
        return _Response(200, self._render(self._get_customer(groups[0]), _expand_list(ctx.params)))

    def _customer_delete(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        customer = self._get_customer(groups[0])
        del self._customers[customer["id"]]
        stub: JSON = {"deleted": True, "id": customer["id"], "object": "customer"}
        self._deleted_customers[customer["id"]] = stub
        for pm in self._payment_methods.values():  # its payment methods cannot be used any more
            if pm.obj["customer"] == customer["id"]:
                pm.obj["customer"] = None
                pm.detached = True
        self._emit("customer.deleted", customer, ctx)
        return _Response(200, copy.deepcopy(stub))

    def _customer_update(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        customer = self._get_customer(groups[0])
        p = ctx.params
        _check_unknown(p, _CUSTOMER_UPDATE_PARAMS)
        metadata = _metadata(p.get("metadata"), customer["metadata"])
        invoice_settings = p.get("invoice_settings")
        default_pm: str | None = None
        if isinstance(invoice_settings, dict) and "default_payment_method" in invoice_settings:
            default_pm = invoice_settings["default_payment_method"] or ""
            if default_pm:
                pm = self._payment_methods.get(default_pm)
                if pm is None or pm.obj["customer"] != customer["id"]:
                    raise _ApiError(
                        400,
                        f"No such PaymentMethod: '{default_pm}'",
                        code="resource_missing",
                        param="invoice_settings[default_payment_method]",
                    )
        before = copy.deepcopy(customer)
        for name in ("description", "email", "name", "phone"):
            if name in p:
                customer[name] = _opt_str(p, name)
        customer["metadata"] = metadata
        if default_pm is not None:
            customer["invoice_settings"]["default_payment_method"] = default_pm or None
        self._emit_updated("customer.updated", before, customer, ctx)
        return _Response(200, self._render(customer, _expand_list(p)))

    # ----------------------------------------------------------------- payment methods

    def _pm_object(self, pm_id: str, card: TestCard, now: int) -> JSON:
        exp_year = time.gmtime(now).tm_year + 3
        return {
            "allow_redisplay": "unspecified",
            "billing_details": {
                "address": {
                    "city": None,
                    "country": None,
                    "line1": None,
                    "line2": None,
                    "postal_code": None,
                    "state": None,
                },
                "email": None,
                "name": None,
                "phone": None,
                "tax_id": None,
            },
            "card": {
                "brand": card.brand,
                "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": None},
                "country": card.country,
                "display_brand": card.brand,
                "exp_month": 12,
                "exp_year": exp_year,
                "fingerprint": card.fingerprint,
                "funding": card.funding,
                "generated_from": None,
                "last4": card.last4,
                "networks": {"available": [card.brand], "preferred": None},
                "regulated_status": "unregulated",
                "three_d_secure_usage": {"supported": True},
                "wallet": None,
            },
            "created": now,
            "customer": None,
            "customer_account": None,
            "id": pm_id,
            "livemode": False,
            "metadata": {},
            "object": "payment_method",
            "type": "card",
        }

    def _resolve_pm_for_use(self, ident: str, param: str) -> TestCard:
        """Validate a payment method reference without creating anything."""
        if ident in TEST_PAYMENT_METHODS:
            return TEST_PAYMENT_METHODS[ident]
        pm = self._payment_methods.get(ident)
        if pm is None:
            raise _ApiError(400, f"No such PaymentMethod: '{ident}'", code="resource_missing", param=param)
        if pm.detached:
            raise _ApiError(400, _PM_REUSED)
        return pm.card

    def _materialize_pm(self, ident: str, now: int, pm_id: str | None = None) -> _PaymentMethod:
        """Turn a test payment method name into a fresh stored ``pm_...`` (as Stripe does); else look it up."""
        if ident in TEST_PAYMENT_METHODS:
            pm_id = pm_id or _new_id("pm")
            card = TEST_PAYMENT_METHODS[ident]
            pm = _PaymentMethod(self._pm_object(pm_id, card, now), card)
            self._payment_methods[pm_id] = pm
            self._remember_order(pm_id)
            return pm
        return self._payment_methods[ident]

    def _get_pm(self, ident: str, param: str = "payment_method", status: int = 404) -> _PaymentMethod:
        if ident in TEST_PAYMENT_METHODS:  # retrieving a test name shows a fresh, unattached copy
            card = TEST_PAYMENT_METHODS[ident]
            return _PaymentMethod(self._pm_object(ident, card, int(self.clock())), card)
        pm = self._payment_methods.get(ident)
        if pm is None:
            raise _ApiError(status, f"No such PaymentMethod: '{ident}'", code="resource_missing", param=param)
        return pm

    def _pm_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        return _Response(200, self._render(self._get_pm(groups[0]).obj, _expand_list(ctx.params)))

    def _pm_attach(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        _check_unknown(p, {"customer", "customer_account"})
        self._get_pm(groups[0])
        existing = self._payment_methods.get(groups[0])
        if existing is not None and existing.detached:
            raise _ApiError(400, _PM_REATTACHED)
        cus_id = _opt_str(p, "customer")
        if cus_id is None:
            raise _missing("customer")
        self._get_customer(cus_id, "customer", 400)
        if existing is not None and existing.obj["customer"] not in (None, cus_id):
            raise _ApiError(
                400,
                "The payment method you provided has already been attached to a customer.",
                param="payment_method",
            )
        pm = self._materialize_pm(groups[0], ctx.now)
        if pm.obj["customer"] != cus_id:
            pm.obj["customer"] = cus_id
            self._emit("payment_method.attached", pm.obj, ctx)
        return _Response(200, self._render(pm.obj, _expand_list(p)))

    def _pm_update(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        _check_unknown(p, _PM_UPDATE_PARAMS)
        pm = self._payment_methods.get(groups[0])
        if pm is None:
            raise _ApiError(404, f"No such PaymentMethod: '{groups[0]}'", code="resource_missing", param="id")
        if pm.obj["customer"] is None:
            raise _ApiError(400, "You must save this PaymentMethod to a customer before you can update it.")
        updated = copy.deepcopy(pm.obj)
        card_params = p.get("card")
        if card_params not in (None, ""):
            if not isinstance(card_params, dict):
                raise _ApiError(400, "Invalid object", param="card")
            _check_unknown(
                {f"card[{k}]": v for k, v in card_params.items()},
                {"card[exp_month]", "card[exp_year]", "card[networks]"},
            )
            if card_params.get("exp_month") not in (None, ""):
                month = _parse_int(card_params["exp_month"], "card[exp_month]")
                if not 1 <= month <= 12:
                    raise _ApiError(
                        402,
                        "Your card's expiration month is invalid.",
                        type_="card_error",
                        code="invalid_expiry_month",
                        param="card[exp_month]",
                    )
                updated["card"]["exp_month"] = month
            if card_params.get("exp_year") not in (None, ""):
                year = _parse_int(card_params["exp_year"], "card[exp_year]")
                if year < time.gmtime(ctx.now).tm_year:
                    raise _ApiError(
                        402,
                        "Your card's expiration year is invalid.",
                        type_="card_error",
                        code="invalid_expiry_year",
                        param="card[exp_year]",
                    )
                updated["card"]["exp_year"] = year
        billing = p.get("billing_details")
        if billing not in (None, ""):
            if not isinstance(billing, dict):
                raise _ApiError(400, "Invalid object", param="billing_details")
            for name, value in billing.items():
                if name == "address" and isinstance(value, dict):
                    updated["billing_details"]["address"].update({k: v or None for k, v in value.items()})
                elif name in ("email", "name", "phone", "tax_id"):
                    updated["billing_details"][name] = value or None
                else:
                    raise _ApiError(
                        400,
                        f"Received unknown parameter: billing_details[{name}]",
                        code="parameter_unknown",
                        param=f"billing_details[{name}]",
                    )
        updated["metadata"] = _metadata(p.get("metadata"), pm.obj["metadata"])
        if p.get("allow_redisplay") not in (None, ""):
            if p["allow_redisplay"] not in ("always", "limited", "unspecified"):
                raise _ApiError(
                    400,
                    "Invalid allow_redisplay: must be one of always, limited, or unspecified",
                    param="allow_redisplay",
                )
            updated["allow_redisplay"] = p["allow_redisplay"]
        before, pm.obj = pm.obj, updated
        self._emit_updated("payment_method.updated", before, pm.obj, ctx)
        return _Response(200, self._render(pm.obj, _expand_list(p)))

    def _pm_detach(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        _check_unknown(ctx.params, ())
        pm = self._payment_methods.get(groups[0])
        if pm is None or pm.obj["customer"] is None:
            raise _ApiError(
                400,
                "The payment method you provided is not attached to a customer so detachment is impossible.",
                param="payment_method",
            )
        cus = self._customers.get(pm.obj["customer"])
        if cus is not None and cus["invoice_settings"]["default_payment_method"] == pm.obj["id"]:
            cus["invoice_settings"]["default_payment_method"] = None
        pm.obj["customer"] = None
        pm.detached = True  # "was detached from a Customer. It may not be used again."
        self._emit("payment_method.detached", pm.obj, ctx)
        return _Response(200, self._render(pm.obj, _expand_list(ctx.params)))

    def _customer_pm_list(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        self._get_customer(groups[0])
        pm_type = _opt_str(ctx.params, "type")
        items = [
            pm.obj
            for pm in self._payment_methods.values()
            if pm.obj["customer"] == groups[0] and pm_type in (None, pm.obj["type"])
        ]
        url = f"/v1/customers/{groups[0]}/payment_methods"
        return _Response(200, self._list(items, ctx.params, url, "PaymentMethod"))

    def _customer_pm_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        self._get_customer(groups[0])
        pm = self._payment_methods.get(groups[1])
        if pm is None or pm.obj["customer"] != groups[0]:
            raise _ApiError(
                404, f"No such PaymentMethod: '{groups[1]}'", code="resource_missing", param="payment_method"
            )
        return _Response(200, self._render(pm.obj, _expand_list(ctx.params)))

    # ----------------------------------------------------------------- payment intents

    def _get_pi(self, ident: str) -> JSON:
        pi = self._payment_intents.get(ident)
        if pi is None:
            raise _ApiError(404, f"No such payment_intent: '{ident}'", code="resource_missing", param="intent")
        return pi

    def _confirm_checks(self, pi: JSON, p: JSON, pm_ref: str | None) -> tuple[bool, bool]:
        """Validate confirmation params; returns (off_session, error_on_requires_action)."""
        off_session = p.get("off_session") in ("one_off", "recurring") or _parse_bool(p, "off_session")
        error_on_requires_action = _parse_bool(p, "error_on_requires_action")
        if pm_ref is None:
            raise _ApiError(
                400,
                "You cannot confirm this PaymentIntent because it's missing a payment method. You can either "
                "update the PaymentIntent with a payment method and then confirm it again, or confirm it again "
                "directly with a payment method.",
                code="payment_intent_unexpected_state",
                extra={"payment_intent": copy.deepcopy(pi)},
            )
        apm = pi["automatic_payment_methods"]
        if (
            self.strict_return_url
            and apm is not None
            and apm.get("allow_redirects") != "never"
            and _opt_str(p, "return_url") is None
        ):
            raise _ApiError(
                400,
                "A `return_url` must be specified because this Payment Intent is configured to automatically "
                "accept the payment methods enabled in the Dashboard, some of which may require a full page "
                "redirect to succeed. If you do not want to accept redirect-based payment methods, set "
                "`automatic_payment_methods[enabled]` to `true` and `automatic_payment_methods[allow_redirects]` "
                "to `never` when creating Setup Intents and Payment Intents.",
                param="return_url",
            )
        return off_session, error_on_requires_action

    def _check_pm_customer(self, pm_ref: str, customer: str | None) -> None:
        pm = self._payment_methods.get(pm_ref)
        if pm is None or pm.obj["customer"] is None:
            return
        if customer is None:
            raise _ApiError(
                400,
                "The provided PaymentMethod was previously attached to a Customer. To use a PaymentMethod that "
                "has been attached to a Customer, you must provide the Customer ID in the `customer` parameter.",
                param="payment_method",
            )
        if pm.obj["customer"] != customer:
            raise _ApiError(
                400,
                f"The provided PaymentMethod belongs to a different Customer than '{customer}'. Use a "
                "PaymentMethod attached to this Customer or create the PaymentIntent for the PaymentMethod's "
                "Customer.",
                param="payment_method",
            )

    @staticmethod
    def _reject_payment_method_types(p: JSON, api_version: str) -> None:
        """From API version 2026-09-30 (endive) ``payment_method_types`` is no longer writable."""
        if "payment_method_types" in p and api_version[:10] >= _PAYMENT_METHOD_TYPES_REMOVED:
            raise _ApiError(
                400,
                f"The `payment_method_types` parameter is no longer supported on API version {api_version}. Use "
                "dynamic payment methods, `excluded_payment_method_types` or `allowed_payment_method_types` "
                "instead.",
                code="payment_method_types_no_longer_supported",
                param="payment_method_types",
            )

    @staticmethod
    def _payment_method_config(p: JSON) -> tuple[JSON | None, list[str] | None, list[str]]:
        """Returns (automatic_payment_methods, allowed_payment_method_types, payment_method_types)."""

        def str_list(name: str) -> list[str] | None:
            raw = p.get(name)
            if raw in (None, ""):
                return None
            if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
                raise _ApiError(400, "Invalid array", param=name)
            return list(raw)

        allowed = str_list("allowed_payment_method_types")
        legacy_types = str_list("payment_method_types")  # only accepted on API versions before endive
        given = [
            name
            for name in (
                "allowed_payment_method_types",
                "payment_method_types",
                "excluded_payment_method_types",
                "automatic_payment_methods",
                "payment_method_configuration",
            )
            if p.get(name) not in (None, "")
        ]
        if (allowed is not None or legacy_types is not None) and len(given) > 1:
            raise _ApiError(
                400, "You may only specify one of these parameters: " + ", ".join(given) + ".", param=given[1]
            )
        if allowed is not None:  # incompatible types are silently filtered out; only cards exist here
            return None, allowed, [t for t in allowed if t in _SUPPORTED_PAYMENT_METHOD_TYPES]
        if legacy_types is not None:
            return None, None, legacy_types
        apm_raw = p.get("automatic_payment_methods")
        apm_params: JSON = apm_raw if isinstance(apm_raw, dict) else {}
        if not _parse_bool(apm_params, "enabled", True):
            return None, None, ["card"]
        allow = apm_params.get("allow_redirects") or "always"
        if allow not in ("always", "never"):
            raise _ApiError(
                400,
                "Invalid automatic_payment_methods[allow_redirects]: must be one of always or never",
                param="automatic_payment_methods[allow_redirects]",
            )
        return {"allow_redirects": allow, "enabled": True}, None, ["card"]

    def _pi_create(self, ctx: _Ctx, _groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        self._reject_payment_method_types(p, ctx.api_version)
        _check_unknown(p, _PI_CREATE_PARAMS | {"payment_method_types"})  # legacy versions only
        if p.get("amount") in (None, ""):
            raise _missing("amount")
        amount = _parse_int(p["amount"], "amount")
        currency = _opt_str(p, "currency")
        if currency is None:
            raise _missing("currency")
        currency = currency.lower()
        if currency not in _CURRENCIES:
            raise _ApiError(
                400,
                f"Invalid currency: {currency}. Stripe currently supports these currencies: "
                + ", ".join(sorted(_CURRENCIES)),
                param="currency",
            )
        step = _AMOUNT_STEP.get(currency, 1)
        if amount % step:
            raise _ApiError(
                400,
                f"Invalid amount: {currency.upper()} amounts must be a multiple of {step} (you sent {amount})",
                param="amount",
            )
        minimum = _MINIMUM_AMOUNT.get(currency, 1)
        if amount < minimum:
            raise _ApiError(
                400,
                f"Amount must be at least {_format_amount(minimum, currency)}",
                code="amount_too_small",
                param="amount",
            )
        if amount > _MAXIMUM_AMOUNT:
            raise _ApiError(
                400,
                f"Amount must be no more than {_format_amount(_MAXIMUM_AMOUNT, currency)}",
                code="amount_too_large",
                param="amount",
            )
        customer = _opt_str(p, "customer")
        if customer is not None:
            self._get_customer(customer, "customer", 400)
        metadata = _metadata(p.get("metadata"))
        description = _opt_str(p, "description")
        if description is not None and len(description) > MAX_DESCRIPTION_LENGTH:
            raise _too_long(description, "description", MAX_DESCRIPTION_LENGTH)
        capture_method = _opt_str(p, "capture_method") or "automatic"
        if capture_method not in ("automatic", "automatic_async"):
            raise _ApiError(
                400, f"stripe-testserver does not support capture_method={capture_method}", param="capture_method"
            )
        confirm = _parse_bool(p, "confirm")
        if p.get("off_session") not in (None, "", "false") and not confirm:
            raise _ApiError(400, "You can only use `off_session` when `confirm` is true.", param="off_session")
        pm_ref = _opt_str(p, "payment_method")
        if pm_ref is not None:
            self._resolve_pm_for_use(pm_ref, "payment_method")
            self._check_pm_customer(pm_ref, customer)
        apm, allowed, payment_method_types = self._payment_method_config(p)
        if pm_ref is not None and "card" not in payment_method_types:
            raise _ApiError(
                400,
                "The PaymentMethod provided (card) is not allowed for this PaymentIntent. Please "
                "attach a PaymentMethod of one of the following types: " + ", ".join(payment_method_types),
                param="payment_method",
            )
        sfu = _opt_str(p, "setup_future_usage")
        if sfu not in (None, "off_session", "on_session"):
            raise _ApiError(400, f"Invalid setup_future_usage: {sfu}", param="setup_future_usage")

        pi_id = _new_id("pi")
        pi: JSON = {
            "allowed_payment_method_types": allowed,
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": apm,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": capture_method,
            "client_secret": f"{pi_id}_secret_{_rand(25)}",
            "confirmation_method": _opt_str(p, "confirmation_method") or "automatic",
            "created": ctx.now,
            "currency": currency,
            "customer": customer,
            "customer_account": None,
            "description": description,
            "excluded_payment_method_types": None,
            "id": pi_id,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "managed_payments": None,
            "metadata": metadata,
            "next_action": None,
            "object": "payment_intent",
            "on_behalf_of": None,
            "payment_method": None,
            "payment_method_configuration_details": {"id": self._pmc_id, "parent": None} if apm else None,
            "payment_method_options": {
                "card": {
                    "installments": None,
                    "mandate_options": None,
                    "network": None,
                    "request_three_d_secure": "automatic",
                }
            },
            "payment_method_types": payment_method_types,
            "processing": None,
            "receipt_email": _opt_str(p, "receipt_email"),
            "review": None,
            "setup_future_usage": sfu,
            "shipping": None,
            "source": None,
            "statement_descriptor": _opt_str(p, "statement_descriptor"),
            "statement_descriptor_suffix": _opt_str(p, "statement_descriptor_suffix"),
            "status": "requires_payment_method",
            "transfer_data": None,
            "transfer_group": _opt_str(p, "transfer_group"),
        }
        off_session = error_on_requires_action = False
        if confirm:
            off_session, error_on_requires_action = self._confirm_checks(pi, p, pm_ref)
        # ---- validation done: the endpoint commits from here on
        if pm_ref is not None:
            pi["payment_method"] = self._materialize_pm(pm_ref, ctx.now).obj["id"]
            pi["status"] = "requires_confirmation"
        self._payment_intents[pi_id] = pi
        self._remember_order(pi_id)
        self._emit("payment_intent.created", pi, ctx)
        if confirm:
            return self._attempt(ctx, pi, off_session, error_on_requires_action)
        return _Response(200, self._render(pi, _expand_list(p)))

    def _pi_confirm(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        pi = self._get_pi(groups[0])
        p = ctx.params
        self._reject_payment_method_types(p, ctx.api_version)
        _check_unknown(p, _PI_CONFIRM_PARAMS | {"payment_method_types"})  # legacy versions only
        if pi["status"] not in _CONFIRMABLE:
            raise _ApiError(
                400,
                f"You cannot confirm this PaymentIntent because it has a status of {pi['status']}. Only a "
                "PaymentIntent with one of the following statuses may be confirmed: " + ", ".join(_CONFIRMABLE) + ".",
                code="payment_intent_unexpected_state",
                extra={"payment_intent": copy.deepcopy(pi)},
            )
        pm_ref = _opt_str(p, "payment_method") or pi["payment_method"]
        if pm_ref is not None:
            self._resolve_pm_for_use(pm_ref, "payment_method")
            self._check_pm_customer(pm_ref, pi["customer"])
        off_session, error_on_requires_action = self._confirm_checks(pi, p, pm_ref)
        assert pm_ref is not None
        if pm_ref != pi["payment_method"]:
            pi["payment_method"] = self._materialize_pm(pm_ref, ctx.now).obj["id"]
        if "setup_future_usage" in p:
            pi["setup_future_usage"] = _opt_str(p, "setup_future_usage")
        if "receipt_email" in p:
            pi["receipt_email"] = _opt_str(p, "receipt_email")
        return self._attempt(ctx, pi, off_session, error_on_requires_action)

    def _pi_cancel(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        pi = self._get_pi(groups[0])
        p = ctx.params
        _check_unknown(p, {"cancellation_reason"})
        if pi["status"] not in _CANCELABLE:
            raise _ApiError(
                400,
                f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}. Only a "
                "PaymentIntent with one of the following statuses may be canceled: " + ", ".join(_CANCELABLE) + ".",
                code="payment_intent_unexpected_state",
                extra={"payment_intent": copy.deepcopy(pi)},
            )
        pi.update(
            status="canceled",
            canceled_at=ctx.now,
            cancellation_reason=_opt_str(p, "cancellation_reason"),
            next_action=None,
            processing=None,
        )
        self._emit("payment_intent.canceled", pi, ctx)
        return _Response(200, self._render(pi, _expand_list(p)))

    def _pi_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        return _Response(200, self._render(self._get_pi(groups[0]), _expand_list(ctx.params)))

    def _pi_list(self, ctx: _Ctx, _groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        customer = _opt_str(p, "customer")
        if customer is not None and customer not in self._customers:  # deleted or never there: "No such customer"
            raise _no_such("customer", customer, "customer")
        created_ok = self._created_filter(p)
        items = [
            pi
            for pi in self._payment_intents.values()
            if (customer is None or pi["customer"] == customer) and created_ok(pi)
        ]
        return _Response(200, self._list(items, p, "/v1/payment_intents", "payment_intent"))

    _SEARCH_CLAUSE = re.compile(
        r"""^\s*(?P<field>[a-z_]+)(?:\[['"](?P<mkey>[^'"]+)['"]\])?\s*:\s*"""
        r"""(?:'(?P<sq>[^']*)'|"(?P<dq>[^"]*)"|(?P<num>-?\d+))\s*$"""
    )

    def _pi_search(self, ctx: _Ctx, _groups: tuple[str, ...]) -> _Response:
        """A small subset of Stripe's search language: ``field:'value'`` clauses joined by ``AND``."""
        p = ctx.params
        query = _opt_str(p, "query")
        if query is None:
            raise _missing("query")
        predicates: list[Callable[[JSON], bool]] = []
        for clause in re.split(r"\s+AND\s+", query.strip()):
            m = self._SEARCH_CLAUSE.match(clause)
            fld = m.group("field") if m else None
            if m is None or fld not in ("customer", "status", "currency", "amount", "metadata"):
                raise _ApiError(400, f"stripe-testserver cannot parse search query clause: {clause!r}", param="query")
            value = next(v for v in (m.group("sq"), m.group("dq"), m.group("num")) if v is not None)
            mkey = m.group("mkey")
            if fld == "metadata" and mkey is None:
                raise _ApiError(400, "metadata search requires a key: metadata['key']:'value'", param="query")
            predicates.append(_search_predicate(fld, mkey, value))
        matches = sorted(
            (pi for pi in self._payment_intents.values() if all(pred(pi) for pred in predicates)),
            key=lambda o: (o["created"], self._seq.get(o["id"], 0)),
            reverse=True,
        )
        limit = _parse_int(p["limit"], "limit") if p.get("limit") not in (None, "") else 10
        page_token = _opt_str(p, "page")
        offset = 0
        if page_token is not None:
            if not page_token.startswith("page_") or not page_token[5:].isdigit():
                raise _ApiError(400, f"Invalid page: {page_token}", param="page")
            offset = int(page_token[5:])
        page = matches[offset : offset + limit]
        has_more = len(matches) > offset + limit
        result: JSON = {
            "object": "search_result",
            "data": copy.deepcopy(page),
            "has_more": has_more,
            "next_page": f"page_{offset + limit}" if has_more else None,
            "url": "/v1/payment_intents/search",
        }
        return _Response(200, self._render(result, _expand_list(p)))

    # ----------------------------------------------------------------- charging

    def _attempt(self, ctx: _Ctx, pi: JSON, off_session: bool, error_on_requires_action: bool) -> _Response:
        """Confirm ``pi`` with its payment method: succeed, decline (402), require authentication or process."""
        pm = self._payment_methods[pi["payment_method"]]
        card = pm.card
        expand = _expand_list(ctx.params)
        if card.outcome == "authentication_required" and not (off_session or error_on_requires_action):
            pi.update(
                status="requires_action",
                next_action={
                    "type": "use_stripe_sdk",
                    "use_stripe_sdk": {
                        "source": _new_id("src"),
                        "stripe_js": f"https://hooks.stripe.com/redirect/authenticate/{_new_id('src')}",
                        "type": "three_d_secure_redirect",
                    },
                },
                last_payment_error=None,
            )
            self._emit("payment_intent.requires_action", pi, ctx)
            return _Response(200, self._render(pi, expand))
        if card.outcome == "processing":
            charge = self._new_charge(ctx.now, pi, pm, None, pending=True)
            pi.update(
                status="processing",
                latest_charge=charge["id"],
                last_payment_error=None,
                next_action=None,
                processing={"card": {"customer_notification": None}, "type": "card"},
            )
            self._attach_for_future_usage(pi, pm, ctx)
            self._emit("charge.pending", charge, ctx)
            self._emit("payment_intent.processing", pi, ctx)
            return _Response(200, self._render(pi, expand))
        if card.outcome == "succeeded":
            charge = self._new_charge(ctx.now, pi, pm, None)
            self._succeed(ctx, pi, pm, charge)
            return _Response(200, self._render(pi, expand))

        charge = self._new_charge(ctx.now, pi, pm, card)
        error = self._decline(ctx, pi, pm, charge, card)
        error["payment_intent"] = copy.deepcopy(pi)
        error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{ctx.request_id}?t={ctx.now}"
        return _Response(402, {"error": dict(sorted(error.items()))})

    def _attach_for_future_usage(self, pi: JSON, pm: _PaymentMethod, ctx: _Ctx | None) -> None:
        if pi["setup_future_usage"] and pi["customer"] and pm.obj["customer"] is None and not pm.detached:
            pm.obj["customer"] = pi["customer"]
            self._emit("payment_method.attached", pm.obj, ctx)

    def _succeed(self, ctx: _Ctx | None, pi: JSON, pm: _PaymentMethod, charge: JSON) -> None:
        """``charge`` went through: the PaymentIntent succeeds, and a dispute test card is then disputed."""
        pi.update(
            status="succeeded",
            amount_received=pi["amount"],
            latest_charge=charge["id"],
            last_payment_error=None,
            next_action=None,
            processing=None,
        )
        self._attach_for_future_usage(pi, pm, ctx)
        self._emit("charge.succeeded", charge, ctx)
        self._emit("payment_intent.succeeded", pi, ctx)
        if pm.card.dispute_reason is not None:
            self._open_dispute(charge, pm.card.dispute_reason, ctx.now if ctx is not None else int(self.clock()))

    def _decline(self, ctx: _Ctx | None, pi: JSON, pm: _PaymentMethod, charge: JSON, card: TestCard) -> JSON:
        """``charge`` was declined: the PaymentIntent goes back to ``requires_payment_method``; returns the
        error object (without ``payment_intent`` / ``request_log_url``)."""
        error: JSON = {
            "charge": charge["id"],
            "code": card.code,
            "decline_code": card.decline_code,
            "doc_url": _doc_url(card.code or "card_declined"),
            "message": card.message,
            "payment_method": copy.deepcopy(pm.obj),
            "type": "card_error",
        }
        if card.advice_code:
            error["advice_code"] = card.advice_code
        if card.param:
            error["param"] = card.param
        pi.update(
            status="requires_payment_method",
            latest_charge=charge["id"],
            last_payment_error=copy.deepcopy(error),
            payment_method=None,
            next_action=None,
            processing=None,
        )
        self._emit("charge.failed", charge, ctx)
        self._emit("payment_intent.payment_failed", pi, ctx)
        return error

    def _new_charge(
        self, now: int, pi: JSON, pm: _PaymentMethod, failure: TestCard | None, *, pending: bool = False
    ) -> JSON:
        ch_id = "ch_" + pi["id"][3:] if pi["latest_charge"] is None else _new_id("ch")
        charge = self._charge_object(ch_id, now, pi, pm, failure)
        self._charges[ch_id] = charge
        self._remember_order(ch_id)
        if pending:  # an asynchronous payment: nothing captured until it settles
            charge.update(status="pending", paid=False, captured=False, amount_captured=0, receipt_url=None)
            charge["outcome"] = None
            charge["payment_method_details"]["card"]["amount_authorized"] = None
        elif failure is None:
            self._charge_balance_transaction(charge, now)
        return charge

    @staticmethod
    def _charge_object(ch_id: str, now: int, pi: JSON, pm: _PaymentMethod, failure: TestCard | None) -> JSON:
        card = pm.obj["card"]
        ok = failure is None
        if ok:
            outcome: JSON = {
                "advice_code": None,
                "network_advice_code": None,
                "network_decline_code": None,
                "network_status": "approved_by_network",
                "reason": None,
                "risk_level": "normal",
                "risk_score": 32,
                "seller_message": "Payment complete.",
                "type": "authorized",
            }
        else:
            assert failure is not None
            outcome = {
                "advice_code": failure.advice_code,
                "network_advice_code": None,
                "network_decline_code": None,
                "network_status": "declined_by_network",
                "reason": failure.decline_code,
                "risk_level": "normal",
                "risk_score": 32,
                "seller_message": (
                    "The bank did not return any further details with this decline."
                    if failure.decline_code == "generic_decline"
                    else f"The bank returned the decline code `{failure.decline_code}`."
                ),
                "type": "issuer_declined",
            }
        charge: JSON = {
            "amount": pi["amount"],
            "amount_captured": pi["amount"] if ok else 0,
            "amount_refunded": 0,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": None,
            "billing_details": copy.deepcopy(pm.obj["billing_details"]),
            "calculated_statement_descriptor": "RECHARGED",
            "captured": ok,
            "created": now,
            "currency": pi["currency"],
            "customer": pi["customer"],
            "description": pi["description"],
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": failure.code if failure else None,
            "failure_message": failure.message if failure else None,
            "fraud_details": {},
            "id": ch_id,
            "livemode": False,
            "metadata": copy.deepcopy(pi["metadata"]),
            "object": "charge",
            "on_behalf_of": None,
            "outcome": outcome,
            "paid": ok,
            "payment_intent": pi["id"],
            "payment_method": pm.obj["id"],
            "payment_method_details": {
                "card": {
                    "amount_authorized": pi["amount"] if ok else None,
                    "authorization_code": None,
                    "brand": card["brand"],
                    "checks": copy.deepcopy(card["checks"]),
                    "country": card["country"],
                    "exp_month": card["exp_month"],
                    "exp_year": card["exp_year"],
                    "extended_authorization": {"status": "disabled"},
                    "fingerprint": card["fingerprint"],
                    "funding": card["funding"],
                    "incremental_authorization": {"status": "unavailable"},
                    "installments": None,
                    "last4": card["last4"],
                    "mandate": None,
                    "multicapture": {"status": "unavailable"},
                    "network": card["brand"],
                    "network_token": {"used": False},
                    "network_transaction_id": _rand(15) if ok else None,
                    "overcapture": {"maximum_amount_capturable": pi["amount"], "status": "unavailable"},
                    "regulated_status": "unregulated",
                    "three_d_secure": None,
                    "wallet": None,
                },
                "type": "card",
            },
            "receipt_email": pi["receipt_email"],
            "receipt_number": None,
            "receipt_url": f"https://pay.stripe.com/receipts/payment/{_rand(80)}" if ok else None,
            "refunded": False,
            "refunds": {"data": [], "has_more": False, "object": "list", "url": f"/v1/charges/{ch_id}/refunds"},
            "review": None,
            "shipping": None,
            "source": None,
            "source_transfer": None,
            "statement_descriptor": pi["statement_descriptor"],
            "statement_descriptor_suffix": pi["statement_descriptor_suffix"],
            "status": "succeeded" if ok else "failed",
            "transfer_data": None,
            "transfer_group": pi["transfer_group"],
        }
        return charge

    def _charge_balance_transaction(self, charge: JSON, now: int) -> None:
        # Stripe's standard US card pricing (2.9% + 30¢); other currencies are left without a fee.
        fee = round(charge["amount"] * 0.029) + 30 if charge["currency"] == "usd" else 0
        txn = self._new_balance_transaction(
            now,
            charge["amount"],
            charge["currency"],
            "charge",
            "charge",
            charge["id"],
            charge["description"],
            [
                {
                    "amount": fee,
                    "application": None,
                    "currency": charge["currency"],
                    "description": "Stripe processing fees",
                    "type": "stripe_fee",
                }
            ]
            if fee
            else [],
        )
        charge["balance_transaction"] = txn["id"]

    def _charge_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        charge = self._charges.get(groups[0])
        if charge is None:
            raise _ApiError(404, f"No such charge: '{groups[0]}'", code="resource_missing", param="id")
        return _Response(200, self._render(charge, _expand_list(ctx.params)))

    # ----------------------------------------------------------------- events

    def _emit(self, event_type: str, obj: JSON, ctx: _Ctx | None = None, previous: JSON | None = None) -> JSON:
        """Record an Event carrying a copy of ``obj`` as it is now, and queue it for the webhook endpoints.

        ``ctx`` is the API request that caused it (``None``: Stripe did it on its own, ``request.id`` is null).
        Called with the lock held.
        """
        data: JSON = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = copy.deepcopy(previous)
        endpoints = [e for e in self._endpoints.values() if e.wants(event_type)]
        event: JSON = {
            "api_version": API_VERSION,
            "created": ctx.now if ctx is not None else int(self.clock()),
            "data": data,
            "id": _new_id("evt"),
            "livemode": False,
            "object": "event",
            "pending_webhooks": len(endpoints),
            "request": {
                "id": ctx.request_id if ctx is not None else None,
                "idempotency_key": ctx.idempotency_key if ctx is not None else None,
            },
            "type": event_type,
        }
        self._events[event["id"]] = event
        self._remember_order(event["id"])
        if endpoints:
            body = self._event_body(event)
            for endpoint in endpoints:
                self._webhooks.enqueue(endpoint, event["id"], event_type, body)
        return event

    def _emit_updated(self, event_type: str, before: JSON, after: JSON, ctx: _Ctx | None) -> None:
        """Emit a ``*.updated`` event whose ``previous_attributes`` hold the changed top-level attributes
        ("If an array attribute has any updated elements, this object contains the entire array"); nothing if
        nothing changed."""
        previous = {k: before.get(k) for k in after if before.get(k) != after[k]}
        if previous:
            self._emit(event_type, after, ctx, previous)

    @staticmethod
    def _event_body(event: JSON) -> bytes:
        return json.dumps(event, indent=2).encode()

    def _get_event(self, ident: str) -> JSON:
        event = self._events.get(ident)
        if event is None:
            raise _no_such("event", ident, "id", 404)
        return event

    def _event_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        return _Response(200, self._render(self._get_event(groups[0]), _expand_list(ctx.params)))

    def _event_list(self, ctx: _Ctx, _groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        patterns: list[str] = []
        if p.get("type") not in (None, ""):
            patterns.append(str(p["type"]))
        types = p.get("types")
        if types not in (None, ""):
            if not isinstance(types, list):
                raise _ApiError(400, "Invalid array", param="types")
            patterns.extend(str(t) for t in types)
        created_ok = self._created_filter(p)
        items = [
            e
            for e in self._events.values()
            if created_ok(e) and (not patterns or any(_event_type_matches(t, e["type"]) for t in patterns))
        ]
        return _Response(200, self._list(items, p, "/v1/events", "event"))

    def events(self, type: str | None = None) -> list[JSON]:
        """Events recorded so far, oldest first (copies); ``type`` filters as Stripe's list does (an exact type,
        or a group such as ``charge.dispute.*``)."""
        with self._lock:
            return [
                copy.deepcopy(e) for e in self._events.values() if type is None or _event_type_matches(type, e["type"])
            ]

    # ----------------------------------------------------------------- webhooks

    def webhook_endpoint(
        self,
        url: str,
        secret: str | None = None,
        *,
        enabled_events: Iterable[str] = ("*",),
        max_attempts: int = DEFAULT_WEBHOOK_ATTEMPTS,
        retry_delay: float = 0.5,
        timeout: float = 5.0,
    ) -> WebhookEndpoint:
        """POST every later event (of ``enabled_events``) to ``url`` from a background thread, signed with
        ``secret`` exactly as Stripe signs (``stripe.Webhook.construct_event`` accepts it).

        A non-2xx answer (or none) is retried up to ``max_attempts`` deliveries in all, ``retry_delay`` seconds
        after the first and doubling. ``secret`` defaults to a fresh ``whsec_...``; the returned endpoint holds
        it. See :meth:`webhook_deliveries` and :meth:`wait_for_webhooks`.
        """
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must be http(s): {url!r}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        endpoint = WebhookEndpoint(
            _new_id("we"),
            url,
            secret or f"whsec_{_rand(32)}",
            tuple(enabled_events),
            max_attempts,
            retry_delay,
            timeout,
        )
        with self._lock:
            self._endpoints[endpoint.id] = endpoint
        return endpoint

    def remove_webhook_endpoint(self, endpoint: WebhookEndpoint | str) -> None:
        """Stop sending events to ``endpoint`` (deliveries already queued still go out)."""
        with self._lock:
            self._endpoints.pop(endpoint if isinstance(endpoint, str) else endpoint.id, None)

    def webhook_deliveries(self, event_id: str | None = None) -> list[WebhookDelivery]:
        """Every delivery attempt so far, oldest first (optionally of one event)."""
        with self._lock:
            return [d for d in self._deliveries if event_id is None or d.event_id == event_id]

    def wait_for_webhooks(self, timeout: float = 5.0) -> bool:
        """Wait until no delivery is queued, in flight or waiting for a retry; False if ``timeout`` passed."""
        return self._webhooks.wait_idle(timeout)

    def signed_payload(
        self, event: JSON | str, *, secret: str | None = None, timestamp: int | None = None
    ) -> tuple[bytes, str]:
        """The body and ``Stripe-Signature`` header Stripe would send for ``event`` (an Event or its id), so a
        test can deliver it itself, twice, or out of order. ``secret`` defaults to the only webhook endpoint's;
        ``timestamp`` to now by :attr:`signing_clock`."""
        with self._lock:
            if isinstance(event, str):
                if event not in self._events:
                    raise KeyError(event)
                event = copy.deepcopy(self._events[event])
            if secret is None:
                if len(self._endpoints) != 1:
                    raise ValueError("pass secret=: the server has no single webhook endpoint to take it from")
                secret = next(iter(self._endpoints.values())).secret
        body = self._event_body(event)
        when = int(self.signing_clock()) if timestamp is None else timestamp
        return body, sign_payload(body, secret, when)

    def _delivered(self, delivery: WebhookDelivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)
            event = self._events.get(delivery.event_id)
            if delivery.ok and event is not None and event["pending_webhooks"] > 0:
                event["pending_webhooks"] -= 1

    # ----------------------------------------------------------------- balance transactions

    def _new_balance_transaction(
        self,
        now: int,
        amount: int,
        currency: str,
        type_: str,
        category: str,
        source: str,
        description: str | None,
        fee_details: list[JSON],
    ) -> JSON:
        fee = sum(int(f["amount"]) for f in fee_details)
        txn: JSON = {
            "amount": amount,
            "available_on": now + 2 * 24 * 3600,
            "balance_type": "payments",
            "created": now,
            "currency": currency,
            "description": description,
            "exchange_rate": None,
            "fee": fee,
            "fee_details": fee_details,
            "id": _new_id("txn"),
            "net": amount - fee,
            "object": "balance_transaction",
            "reporting_category": category,
            "source": source,
            "status": "pending",
            "type": type_,
        }
        self._balance_transactions[txn["id"]] = txn
        self._remember_order(txn["id"])
        return txn

    def _balance_transaction_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        txn = self._balance_transactions.get(groups[0])
        if txn is None:
            raise _no_such("balance transaction", groups[0], "id", 404)
        return _Response(200, self._render(txn, _expand_list(ctx.params)))

    # ----------------------------------------------------------------- refunds

    def _refundable_charge(self, p: JSON) -> JSON:
        charge_id = _opt_str(p, "charge")
        pi_id = _opt_str(p, "payment_intent")
        if charge_id is None and pi_id is None:
            raise _ApiError(
                400, "One of the following params should be provided for this request: payment_intent or charge."
            )
        charge: JSON | None = None
        if charge_id is not None:
            charge = self._charges.get(charge_id)
            if charge is None:
                raise _no_such("charge", charge_id, "charge")
        if pi_id is not None:
            pi = self._payment_intents.get(pi_id)
            if pi is None:
                raise _no_such("payment_intent", pi_id, "payment_intent")
            if charge is not None and charge["payment_intent"] != pi_id:
                raise _ApiError(400, f"Charge {charge['id']} does not belong to PaymentIntent {pi_id}.", param="charge")
            charge = charge or (self._charges.get(pi["latest_charge"]) if pi["latest_charge"] else None)
            if charge is None:
                raise _ApiError(400, f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.")
        assert charge is not None
        # Stripe answers this for PaymentIntents without a successful charge (declined, processing, canceled,
        # uncaptured), whether the refund names the PaymentIntent or its charge.
        if charge["status"] != "succeeded" or not charge["captured"]:
            raise _ApiError(
                400, f"This PaymentIntent ({charge['payment_intent']}) does not have a successful charge to refund."
            )
        if charge["disputed"]:
            raise _ApiError(
                400, f"Charge {charge['id']} has been charged back; cannot issue a refund.", code="charge_disputed"
            )
        return charge

    def _refund_create(self, ctx: _Ctx, _groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        _check_unknown(p, _REFUND_CREATE_PARAMS)
        requested: int | None = None
        if p.get("amount") not in (None, ""):
            requested = _parse_int(p["amount"], "amount")
            if requested <= 0:
                raise _ApiError(400, "Invalid positive integer", code="parameter_invalid_integer", param="amount")
        reason = _opt_str(p, "reason")
        if reason is not None and reason not in _REFUND_REASONS:
            raise _ApiError(
                400, "Invalid reason: must be one of duplicate, fraudulent, or requested_by_customer", param="reason"
            )
        metadata = _metadata(p.get("metadata"))
        charge = self._refundable_charge(p)
        currency_param = _opt_str(p, "currency")
        if currency_param is not None and currency_param.lower() != charge["currency"]:
            raise _ApiError(400, f"Invalid currency: {currency_param}", param="currency")
        remaining = charge["amount"] - charge["amount_refunded"]
        if remaining <= 0:
            raise _ApiError(400, f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded")
        amount = remaining if requested is None else requested
        if amount > remaining:
            currency = charge["currency"]
            raise _ApiError(
                400,
                f"Refund amount ({_format_money(amount, currency)}) is greater than unrefunded amount on charge "
                f"({_format_money(remaining, currency)})",
                code="amount_too_large",
                param="amount",
            )
        # ---- validation done: the endpoint commits from here on
        card = self._payment_methods[charge["payment_method"]].card
        status = "pending" if card.refunds == "pending" else "succeeded"
        re_id = _new_id("re")
        txn = self._new_balance_transaction(
            ctx.now, -amount, charge["currency"], "refund", "refund", re_id, "REFUND FOR CHARGE", []
        )
        refund: JSON = {
            "amount": amount,
            "balance_transaction": txn["id"],
            "charge": charge["id"],
            "created": ctx.now,
            "currency": charge["currency"],
            "customer": None,
            "customer_account": None,
            "description": None,
            "destination_details": {
                "card": {
                    "reference_status": "pending",
                    "reference_type": "acquirer_reference_number",
                    "type": "refund",
                },
                "type": "card",
            },
            "id": re_id,
            "metadata": metadata,
            "object": "refund",
            "payment_intent": charge["payment_intent"],
            "payment_method": charge["payment_method"],
            "reason": reason,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": status,
            "transfer_reversal": None,
        }
        if status == "pending":
            refund["pending_reason"] = "processing"
        self._refunds[re_id] = refund
        self._remember_order(re_id)
        self._sync_charge_refunds(charge)
        self._emit("refund.created", refund, ctx)
        self._emit("charge.refunded", charge, ctx)
        return _Response(200, self._render(refund, _expand_list(p)))

    def _sync_charge_refunds(self, charge: JSON) -> None:
        """Recompute ``amount_refunded`` / ``refunded`` / ``refunds`` of ``charge`` from its refunds. Failed or
        canceled refunds gave the money back to the merchant and no longer count."""
        refunds = sorted(
            (r for r in self._refunds.values() if r["charge"] == charge["id"]),
            key=lambda r: (r["created"], self._seq.get(r["id"], 0)),
            reverse=True,
        )
        refunded = sum(r["amount"] for r in refunds if r["status"] not in ("failed", "canceled"))
        charge["amount_refunded"] = refunded
        charge["refunded"] = refunded >= charge["amount"]
        charge["refunds"]["data"] = copy.deepcopy(refunds)

    def _get_refund(self, ident: str) -> JSON:
        refund = self._refunds.get(ident)
        if refund is None:
            raise _no_such("refund", ident, "id", 404)
        return refund

    def _refund_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        return _Response(200, self._render(self._get_refund(groups[0]), _expand_list(ctx.params)))

    def _refund_update(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        refund = self._get_refund(groups[0])
        _check_unknown(ctx.params, {"metadata"})
        before = copy.deepcopy(refund)
        refund["metadata"] = _metadata(ctx.params.get("metadata"), refund["metadata"])
        self._refund_changed(before, refund, ctx)
        return _Response(200, self._render(refund, _expand_list(ctx.params)))

    def _refund_changed(self, before: JSON, refund: JSON, ctx: _Ctx | None) -> None:
        """Sync the charge and emit ``charge.refund.updated`` and ``refund.updated`` (Stripe sends the former,
        deprecated, only for refunds of a charge; every refund here has one)."""
        charge = self._charges[refund["charge"]]
        self._sync_charge_refunds(charge)
        self._emit_updated("charge.refund.updated", before, refund, ctx)
        self._emit_updated("refund.updated", before, refund, ctx)

    def _refund_list(self, ctx: _Ctx, _groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        charge, pi = _opt_str(p, "charge"), _opt_str(p, "payment_intent")
        created_ok = self._created_filter(p)
        items = [
            r
            for r in self._refunds.values()
            if (charge is None or r["charge"] == charge) and (pi is None or r["payment_intent"] == pi) and created_ok(r)
        ]
        return _Response(200, self._list(items, p, "/v1/refunds", "refund"))

    def refunds(self) -> list[JSON]:
        """Stored refunds, oldest first."""
        with self._lock:
            return copy.deepcopy(list(self._refunds.values()))

    def settle_refund(self, refund_id: str) -> JSON:
        """Test hook: a ``pending`` refund (``pm_card_pendingRefund``) succeeds, as Stripe's asynchronous
        refunds do later; emits ``charge.refund.updated`` and ``refund.updated``. Returns the refund."""
        with self._lock:
            refund = self._refunds.get(refund_id)
            if refund is None:
                raise KeyError(refund_id)
            if refund["status"] != "pending":
                raise ValueError(f"refund {refund_id} is {refund['status']}, not pending")
            before = copy.deepcopy(refund)
            refund["status"] = "succeeded"
            refund.pop("pending_reason", None)
            self._refund_changed(before, refund, None)
            return copy.deepcopy(refund)

    def fail_refund(self, refund_id: str, failure_reason: str = "expired_or_canceled_card") -> JSON:
        """Test hook: the card issuer returns a refund (``pm_card_refundFail`` does this on Stripe): its status
        becomes ``failed`` with ``failure_reason`` and a ``failure_balance_transaction`` giving the money back;
        emits ``charge.refund.updated``, ``refund.updated`` and ``refund.failed``. Returns the refund."""
        with self._lock:
            refund = self._refunds.get(refund_id)
            if refund is None:
                raise KeyError(refund_id)
            if refund["status"] not in ("pending", "succeeded"):
                raise ValueError(f"refund {refund_id} is {refund['status']}")
            now = int(self.clock())
            before = copy.deepcopy(refund)
            txn = self._new_balance_transaction(
                now,
                refund["amount"],
                refund["currency"],
                "refund_failure",
                "refund_failure",
                refund_id,
                "REFUND FAILURE",
                [],
            )
            refund.update(status="failed", failure_reason=failure_reason, failure_balance_transaction=txn["id"])
            refund.pop("pending_reason", None)
            self._refund_changed(before, refund, None)
            self._emit("refund.failed", refund)
            return copy.deepcopy(refund)

    # ----------------------------------------------------------------- disputes

    def _open_dispute(self, charge: JSON, reason: str, now: int) -> JSON:
        """The cardholder disputes ``charge``. Stripe does this shortly after the charge of a dispute test card;
        here it happens at once, as part of the confirmation. Emits ``charge.dispute.created`` then
        ``charge.dispute.funds_withdrawn`` (events Stripe sends on its own: no request id)."""
        card = charge["payment_method_details"]["card"]
        dispute: JSON = {
            "amount": charge["amount"],
            "balance_transactions": [],
            "charge": charge["id"],
            "created": now,
            "currency": charge["currency"],
            "enhanced_eligibility_types": [],
            "evidence": dict.fromkeys(_DISPUTE_EVIDENCE_FIELDS),
            "evidence_details": {
                "due_by": now + 7 * 24 * 3600,
                "enhanced_eligibility": {},
                "has_evidence": False,
                "past_due": False,
                "submission_count": 0,
            },
            "id": _new_id("du"),
            "is_charge_refundable": False,
            "livemode": False,
            "metadata": {},
            "network_reason_code": _NETWORK_REASON_CODES.get(reason),
            "object": "dispute",
            "payment_intent": charge["payment_intent"],
            "payment_method_details": {
                "card": {
                    "brand": card["brand"],
                    "case_type": "chargeback",
                    "network_reason_code": _NETWORK_REASON_CODES.get(reason),
                },
                "type": "card",
            },
            "reason": reason,
            "status": "needs_response",
        }
        self._disputes[dispute["id"]] = dispute
        self._remember_order(dispute["id"])
        charge["disputed"] = True
        self._emit("charge.dispute.created", dispute)
        txn = self._new_balance_transaction(
            now,
            -dispute["amount"],
            dispute["currency"],
            "adjustment",
            "dispute",
            dispute["id"],
            f"Chargeback withdrawal for {charge['id']}",
            [
                {
                    "amount": _DISPUTE_FEE,
                    "application": None,
                    "currency": dispute["currency"],
                    "description": "Dispute fee",
                    "type": "stripe_fee",
                }
            ],
        )
        dispute["balance_transactions"].append(copy.deepcopy(txn))
        self._emit("charge.dispute.funds_withdrawn", dispute)
        return dispute

    def _close(self, dispute: JSON, status: Literal["won", "lost"], ctx: _Ctx | None) -> None:
        now = ctx.now if ctx is not None else int(self.clock())
        dispute["status"] = status
        if status == "won":  # the money and the dispute fee come back
            txn = self._new_balance_transaction(
                now,
                dispute["amount"],
                dispute["currency"],
                "adjustment",
                "dispute_reversal",
                dispute["id"],
                f"Chargeback reversal for {dispute['charge']}",
                [
                    {
                        "amount": -_DISPUTE_FEE,
                        "application": None,
                        "currency": dispute["currency"],
                        "description": "Dispute fee",
                        "type": "stripe_fee",
                    }
                ],
            )
            dispute["balance_transactions"].append(copy.deepcopy(txn))
            self._emit("charge.dispute.funds_reinstated", dispute, ctx)
        self._emit("charge.dispute.closed", dispute, ctx)

    def _get_dispute(self, ident: str) -> JSON:
        dispute = self._disputes.get(ident)
        if dispute is None:
            raise _no_such("dispute", ident, "dispute", 404)
        return dispute

    def _dispute_retrieve(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        return _Response(200, self._render(self._get_dispute(groups[0]), _expand_list(ctx.params)))

    def _dispute_list(self, ctx: _Ctx, _groups: tuple[str, ...]) -> _Response:
        p = ctx.params
        charge, pi = _opt_str(p, "charge"), _opt_str(p, "payment_intent")
        created_ok = self._created_filter(p)
        items = [
            d
            for d in self._disputes.values()
            if (charge is None or d["charge"] == charge) and (pi is None or d["payment_intent"] == pi) and created_ok(d)
        ]
        return _Response(200, self._list(items, p, "/v1/disputes", "dispute"))

    def _require_open(self, dispute: JSON) -> None:
        if dispute["status"] not in _OPEN_DISPUTE:
            raise _ApiError(
                400, f"This dispute is already closed with a status of {dispute['status']}.", param="dispute"
            )

    def _dispute_update(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        """Evidence, metadata and submission. As in Stripe's test mode, submitting the evidence
        ``uncategorized_text=winning_evidence`` wins the dispute and ``losing_evidence`` loses it
        (docs.stripe.com/testing#disputes)."""
        dispute = self._get_dispute(groups[0])
        p = ctx.params
        _check_unknown(p, _DISPUTE_UPDATE_PARAMS)
        evidence = p.get("evidence")
        if evidence not in (None, "") and not isinstance(evidence, dict):
            raise _ApiError(400, "Invalid object", param="evidence")
        evidence = evidence or {}
        for name in evidence:
            if name not in _DISPUTE_EVIDENCE_FIELDS:
                raise _ApiError(
                    400,
                    f"Received unknown parameter: evidence[{name}]",
                    code="parameter_unknown",
                    param=f"evidence[{name}]",
                )
        submit = _parse_bool(p, "submit", True)
        metadata = _metadata(p.get("metadata"), dispute["metadata"])
        if evidence or submit:
            self._require_open(dispute)
        before = copy.deepcopy(dispute)
        dispute["metadata"] = metadata
        for name, value in evidence.items():
            dispute["evidence"][name] = value or None
        if evidence:
            dispute["evidence_details"]["has_evidence"] = True
        text = dispute["evidence"]["uncategorized_text"]
        if submit and dispute["status"] in _OPEN_DISPUTE:
            dispute["evidence_details"]["submission_count"] += 1
            if text in ("winning_evidence", "losing_evidence"):
                dispute["status"] = "under_review"
                self._emit_updated("charge.dispute.updated", before, dispute, ctx)
                self._close(dispute, "won" if text == "winning_evidence" else "lost", ctx)
                return _Response(200, self._render(dispute, _expand_list(p)))
            dispute["status"] = "under_review"
        self._emit_updated("charge.dispute.updated", before, dispute, ctx)
        return _Response(200, self._render(dispute, _expand_list(p)))

    def _dispute_close(self, ctx: _Ctx, groups: tuple[str, ...]) -> _Response:
        """Closing a dispute accepts it: Stripe marks it ``lost``."""
        dispute = self._get_dispute(groups[0])
        _check_unknown(ctx.params, ())
        self._require_open(dispute)
        self._close(dispute, "lost", ctx)
        return _Response(200, self._render(dispute, _expand_list(ctx.params)))

    def disputes(self) -> list[JSON]:
        """Stored disputes, oldest first."""
        with self._lock:
            return copy.deepcopy(list(self._disputes.values()))

    def open_dispute(self, charge_id: str, *, reason: str = "fraudulent") -> JSON:
        """The cardholder disputes an existing charge now, for its whole amount, and its funds are withdrawn
        (``charge.dispute.created`` then ``charge.dispute.funds_withdrawn``), as a dispute that comes days after the
        charge does. Returns the Dispute."""
        with self._lock:
            charge = self._charges.get(charge_id)
            if charge is None:
                raise KeyError(f"no charge {charge_id}")
            return copy.deepcopy(self._open_dispute(charge, reason, int(self.clock())))

    def close_dispute(self, dispute_id: str, *, won: bool) -> JSON:
        """Test hook: the card network decides an open dispute. ``won`` reinstates the funds and the dispute fee
        (``charge.dispute.funds_reinstated``); either way ``charge.dispute.closed`` follows. Returns the dispute."""
        with self._lock:
            dispute = self._disputes.get(dispute_id)
            if dispute is None:
                raise KeyError(dispute_id)
            if dispute["status"] not in _OPEN_DISPUTE:
                raise ValueError(f"dispute {dispute_id} is already {dispute['status']}")
            self._close(dispute, "won" if won else "lost", None)
            return copy.deepcopy(dispute)

    # ----------------------------------------------------------------- test hooks for Stripe's own actions

    def settle_processing(self, pi_id: str, *, succeed: bool = True, decline_code: str = "generic_decline") -> JSON:
        """Test hook: an asynchronous payment (``pm_card_asyncProcessing``, left ``processing`` by its
        confirmation) completes. It succeeds (``charge.succeeded``, ``payment_intent.succeeded``) or fails as a
        decline with ``decline_code`` (``charge.failed``, ``payment_intent.payment_failed``; the PaymentIntent
        returns to ``requires_payment_method`` with ``last_payment_error``). Returns the PaymentIntent."""
        with self._lock:
            pi = self._payment_intents.get(pi_id)
            if pi is None:
                raise KeyError(pi_id)
            if pi["status"] != "processing":
                raise ValueError(f"PaymentIntent {pi_id} is {pi['status']}, not processing")
            charge = self._charges[pi["latest_charge"]]
            pm = self._payment_methods[charge["payment_method"]]
            now = int(self.clock())
            failure: TestCard | None = None
            if not succeed:
                failure = next(
                    (
                        c
                        for c in TEST_PAYMENT_METHODS.values()
                        if c.outcome == "declined" and c.decline_code == decline_code
                    ),
                    None,
                )
                if failure is None:
                    raise ValueError(f"no test card declines with {decline_code!r}")
            # The same charge, now decided: it keeps its id, creation time and refunds list.
            decided = self._charge_object(charge["id"], charge["created"], pi, pm, failure)
            charge.update({k: v for k, v in decided.items() if k not in ("refunds", "receipt_url")})
            charge["receipt_url"] = decided["receipt_url"]
            if failure is None:
                self._charge_balance_transaction(charge, now)
                self._succeed(None, pi, pm, charge)
            else:
                self._decline(None, pi, pm, charge, failure)
            return copy.deepcopy(pi)

    def authenticate(self, pi_id: str, *, succeed: bool = True) -> JSON:
        """Test hook: the customer answers the authentication challenge (3D Secure) of a PaymentIntent in
        ``requires_action``, as Stripe.js does after ``confirmCardPayment`` with its client secret. Passed, the
        payment goes through (``charge.succeeded``, ``payment_intent.succeeded``); failed, the PaymentIntent
        returns to ``requires_payment_method`` with ``last_payment_error.code``
        ``payment_intent_authentication_failure`` and no charge (``payment_intent.payment_failed``), as
        docs.stripe.com/payments/3d-secure describes. Returns the PaymentIntent."""
        with self._lock:
            pi = self._payment_intents.get(pi_id)
            if pi is None:
                raise KeyError(pi_id)
            if pi["status"] != "requires_action":
                raise ValueError(f"PaymentIntent {pi_id} is {pi['status']}, not requires_action")
            pm = self._payment_methods[pi["payment_method"]]
            if succeed:
                charge = self._new_charge(int(self.clock()), pi, pm, None)
                self._succeed(None, pi, pm, charge)
            else:
                pi.update(
                    status="requires_payment_method",
                    payment_method=None,
                    next_action=None,
                    last_payment_error={
                        "code": "payment_intent_authentication_failure",
                        "doc_url": _doc_url("payment_intent_authentication_failure"),
                        "message": "The provided PaymentMethod has failed authentication. You can provide "
                        "payment_method_data or a new PaymentMethod to attempt to fulfill this PaymentIntent again.",
                        "payment_method": copy.deepcopy(pm.obj),
                        "type": "invalid_request_error",
                    },
                )
                self._emit("payment_intent.payment_failed", pi, None)
            return copy.deepcopy(pi)

    def update_card(
        self, pm_id: str, *, exp_month: int | None = None, exp_year: int | None = None, last4: str | None = None
    ) -> JSON:
        """Test hook: the card network's updater replaces the card's details (a new expiry, or a new number
        with ``last4``); emits ``payment_method.automatically_updated`` with the old card in
        ``previous_attributes``. Returns the payment method."""
        with self._lock:
            pm = self._payment_methods.get(pm_id)
            if pm is None:
                raise KeyError(pm_id)
            before = copy.deepcopy(pm.obj)
            card = pm.obj["card"]
            if exp_month is not None:
                if not 1 <= exp_month <= 12:
                    raise ValueError("exp_month must be 1..12")
                card["exp_month"] = exp_month
            if exp_year is not None:
                card["exp_year"] = exp_year
            if last4 is not None:
                if not re.fullmatch(r"\d{4}", last4):
                    raise ValueError("last4 must be four digits")
                card["last4"] = last4
            self._emit("payment_method.automatically_updated", pm.obj, None, {"card": before["card"]})
            return copy.deepcopy(pm.obj)

    def add_customer(self, customer_id: str, cards: dict[str, str], *, email: str | None = None) -> JSON:
        """Test hook: a customer under an id of our choosing with test cards attached under ids of our choosing
        (``{"pm_sandbox_visa": "pm_card_visa", ...}``), ids a person can type (``recharged testserver``); emits
        what creating a customer and attaching its cards emit. Returns the customer."""
        with self._lock:
            known = (self._customers, self._deleted_customers, self._payment_methods)
            taken = [i for i in (customer_id, *cards) if any(i in objects for objects in known)]
            unknown = [name for name in cards.values() if name not in TEST_PAYMENT_METHODS]
            if taken or unknown:
                raise ValueError(f"ids already in use: {taken}; not test payment methods: {unknown}")
            params: JSON = {} if email is None else {"email": email}
            ctx = _Ctx("POST", "/v1/customers", params, _new_id("req", 14), int(self.clock()), API_VERSION)
            response = self._customer_create(ctx, (), cus_id=customer_id)
            for pm_id, name in cards.items():
                pm = self._materialize_pm(name, ctx.now, pm_id=pm_id)
                pm.obj["customer"] = customer_id
                self._emit("payment_method.attached", pm.obj, ctx)
            return response.body
