"""The payment processor behind a small protocol, and its Stripe adapter.

`PaymentGateway.charge` sends one off-session card payment under an idempotency key and answers what became of
it: succeeded, declined (hard or soft), action required, or still pending. Transient failures (connection
errors, timeouts, 409 idempotency-in-progress, 429, 5xx) raise `TransientPaymentError` after the inline
retries, which always resend the same key with the same parameters; the outcome is then unknown and recovery
finds it later. Card declines are answers, not errors, and are never retried here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import requests
import stripe
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from recharged.errors import RechargedError

# Card problems that will not go away by trying again: the card must be replaced or updated.
HARD_DECLINES = frozenset(
    {
        "lost_card",
        "stolen_card",
        "pickup_card",
        "fraudulent",
        "merchant_blacklist",
        "do_not_try_again",
        "revocation_of_authorization",
        "revocation_of_all_authorizations",
        "stop_payment_order",
        "expired_card",
        "incorrect_number",
        "invalid_number",
        "invalid_account",
        "incorrect_cvc",
        "invalid_cvc",
        "invalid_expiry_month",
        "invalid_expiry_year",
        "card_not_supported",
        "restricted_card",
        "security_violation",
        "transaction_not_allowed",
        "new_account_information_available",
        "account_closed",
    }
)
HARD_ADVICE = frozenset({"do_not_try_again", "confirm_card_data"})
ACTION_CODES = frozenset({"authentication_required"})

Outcome = Literal["succeeded", "declined", "action_required", "pending"]


class PaymentError(RechargedError):
    """A permanent processor problem that is not the card's: a missing or wrong key, a bad request."""


class TransientPaymentError(RechargedError):
    """The processor could not be reached or asked us to slow down; the outcome of the request is unknown."""


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    idempotency_key: str
    customer: str
    payment_method: str
    amount_minor: int
    currency: str
    description: str
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class PaymentResult:
    outcome: Outcome
    payment_intent: str | None
    decline_class: Literal["hard", "soft"] | None = None
    code: str | None = None
    decline_code: str | None = None
    advice_code: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """A payment as the processor lists it: amount in minor units, currency upper-case (as recharged keeps it),
    the processor's status (succeeded, processing, requires_action, requires_payment_method, canceled, ...)."""

    id: str
    amount: int
    currency: str
    status: str
    metadata: Mapping[str, str]
    created: datetime


@dataclass(frozen=True, slots=True)
class CardInfo:
    customer: str
    payment_method: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int


class CardDetails(Protocol):
    """What is known of a card for display: a CardInfo from the processor or a stored FundingSource."""

    @property
    def brand(self) -> str: ...
    @property
    def last4(self) -> str: ...
    @property
    def exp_month(self) -> int: ...
    @property
    def exp_year(self) -> int: ...


def card_label(card: CardDetails, *, expiry: bool = True) -> str:
    """How a card is named to admins and in logs: 'visa ...4242 exp 12/2030' (never more of the number)."""
    label = f"{card.brand} ...{card.last4}"
    return f"{label} exp {card.exp_month:02d}/{card.exp_year}" if expiry else label


class PaymentGateway(Protocol):
    def charge(self, request: ChargeRequest) -> PaymentResult:
        """Send (or re-send, with the same key) one charge."""
        ...

    def find(self, customer: str, idempotency_key: str, created_after: datetime) -> PaymentResult | None:
        """The payment made under this attempt's key, looked up without creating anything; None if none."""
        ...

    def retrieve(self, payment_intent: str) -> PaymentResult:
        """The current state of a known payment."""
        ...

    def card(self, customer: str, payment_method: str) -> CardInfo:
        """Brand, last4 and expiry of a card on file, checking that it belongs to the customer."""
        ...

    def list_payments(self, customer: str, created_after: datetime) -> list[PaymentRecord]:
        """Every payment of the customer created at or after `created_after`, whatever became of it (for
        `recharged reconcile`); newest first, as the processor lists them."""
        ...


def classify(code: str | None, decline_code: str | None, advice_code: str | None) -> Literal["hard", "soft", "action"]:
    """What a decline means: replace the card (hard), try later or elsewhere (soft), or the customer must act."""
    if code in ACTION_CODES or decline_code in ACTION_CODES:
        return "action"
    if decline_code in HARD_DECLINES or code in HARD_DECLINES or advice_code in HARD_ADVICE:
        return "hard"
    return "soft"


def declined(payment_intent: str | None, code: str | None, decline_code: str | None, advice_code: str | None,
             message: str | None) -> PaymentResult:  # fmt: skip
    verdict = classify(code, decline_code, advice_code)
    if verdict == "action":
        return PaymentResult("action_required", payment_intent, None, code, decline_code, advice_code, message)
    return PaymentResult("declined", payment_intent, verdict, code, decline_code, advice_code, message)


def _from_intent(intent: Any) -> PaymentResult:
    status = intent.status
    if status == "succeeded":
        return PaymentResult("succeeded", intent.id)
    if status in ("requires_action", "requires_confirmation"):
        return PaymentResult("action_required", intent.id, code="authentication_required")
    if status == "processing":
        return PaymentResult("pending", intent.id)
    error = getattr(intent, "last_payment_error", None)
    return declined(
        intent.id,
        getattr(error, "code", None) or status,
        getattr(error, "decline_code", None),
        getattr(error, "advice_code", None),
        getattr(error, "message", None),
    )


class RateLimiter:
    """At most `per_second` requests per second across all threads: each request takes the next free slot,
    slots 1/per_second apart, and waits for it. Real time on purpose: it paces requests, it decides nothing."""

    def __init__(
        self,
        per_second: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._spacing = 1.0 / per_second
        self._monotonic, self._sleep = monotonic, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self._monotonic()
            slot = max(now, self._next)
            self._next = slot + self._spacing
        if slot > now:
            self._sleep(slot - now)


MAX_CONNECTIONS = 300  # kept open to the processor: charges in flight (daemon.charge_concurrency <= 256) and more
CallObserver = Callable[[str, "str | None"], None]  # (what, None when it succeeded or else the error)


class StripeGateway:
    """PaymentGateway on Stripe, through `StripeClient` (never the global `stripe.api_key`).

    `rate_limiter` paces every request, retries included; `on_call` hears the final outcome of each call
    (health shows the last one) and `on_retry` each inline retry (metrics count them)."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str = "https://api.stripe.com",
        timeout_seconds: float = 30.0,
        max_retries: int = 4,
        wait: wait_base | None = None,
        retry_initial_seconds: float = 0.5,
        retry_max_seconds: float = 8.0,
        rate_limiter: RateLimiter | None = None,
        on_call: CallObserver | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._limiter, self._on_call, self._on_retry = rate_limiter, on_call, on_retry
        session = requests.Session()
        # requests keeps 10 connections per host: with more charges in flight, every request beyond those
        # would open (and, against Stripe, TLS-handshake) a connection of its own and log that it dropped it.
        adapter = HTTPAdapter(pool_maxsize=MAX_CONNECTIONS)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        if urlsplit(api_base).hostname in ("127.0.0.1", "localhost", "::1"):
            session.trust_env = False  # a local test server is never reached through a proxy
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/")},
            max_network_retries=0,  # retries are ours: same key, same parameters, counted and logged
            http_client=stripe.RequestsClient(timeout=timeout_seconds, session=session),
        )
        self._retry = Retrying(
            retry=retry_if_exception_type(TransientPaymentError),
            stop=stop_after_attempt(max_retries + 1),
            wait=wait or wait_exponential_jitter(initial=retry_initial_seconds, max=retry_max_seconds),
            reraise=True,
        )
        self.retries = 0  # transient failures retried so far, for metrics

    def _call(self, what: str, fn: Any) -> Any:
        try:
            result = self._call_with_retries(what, fn)
        except RechargedError as exc:
            if self._on_call is not None:
                self._on_call(what, str(exc))
            raise
        if self._on_call is not None:
            self._on_call(what, None)
        return result

    def _call_with_retries(self, what: str, fn: Any) -> Any:
        for attempt in self._retry:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.retries += 1
                    if self._on_retry is not None:
                        self._on_retry(what)
                if self._limiter is not None:
                    self._limiter.acquire()
                try:
                    return fn()
                except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
                    raise TransientPaymentError(f"{what}: {type(exc).__name__}: {exc.user_message or exc}") from exc
                except stripe.APIError as exc:  # 409 (idempotent request in progress) and 5xx
                    raise TransientPaymentError(f"{what}: processor error {exc.http_status}") from exc
                except (stripe.AuthenticationError, stripe.PermissionError) as exc:
                    raise PaymentError(f"{what}: the processor refused our key ({exc.http_status})") from exc
                except stripe.IdempotencyError as exc:
                    raise PaymentError(f"{what}: idempotency key reused with other parameters: {exc}") from exc
                except stripe.InvalidRequestError as exc:  # e.g. no such PaymentIntent: not worth retrying
                    raise PaymentError(f"{what}: the processor refused the request: {exc.user_message or exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def charge(self, request: ChargeRequest) -> PaymentResult:
        params: dict[str, Any] = {
            "amount": request.amount_minor,
            "currency": request.currency.lower(),
            "customer": request.customer,
            "payment_method": request.payment_method,
            "off_session": True,
            "confirm": True,
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            "description": request.description,
            "metadata": dict(request.metadata),
        }

        def send() -> PaymentResult:
            try:
                intent = self._client.v1.payment_intents.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": request.idempotency_key},
                )
            except stripe.CardError as exc:
                error = exc.error
                intent_id = error.payment_intent.id if error and error.payment_intent else None
                return declined(
                    intent_id,
                    exc.code,
                    getattr(error, "decline_code", None),
                    getattr(error, "advice_code", None),
                    exc.user_message,
                )
            except stripe.InvalidRequestError as exc:  # the card or customer is not usable as recorded
                return PaymentResult(
                    "declined", None, "hard", exc.code or "invalid_request", None, None, exc.user_message
                )
            return _from_intent(intent)

        result: PaymentResult = self._call("charge", send)
        return result

    def find(self, customer: str, idempotency_key: str, created_after: datetime) -> PaymentResult | None:
        since = int((created_after - timedelta(hours=1)).timestamp())

        def search() -> PaymentResult | None:
            params: dict[str, Any] = {"customer": customer, "created": {"gte": since}, "limit": 100}
            while True:
                page = self._client.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
                for intent in page.data:
                    metadata: dict[str, Any] = intent.metadata.to_dict() if intent.metadata else {}
                    if metadata.get("recharged_attempt") == idempotency_key:
                        return _from_intent(intent)
                if not page.has_more or not page.data:
                    return None
                params["starting_after"] = page.data[-1].id

        found: PaymentResult | None = self._call("find", search)
        return found

    def retrieve(self, payment_intent: str) -> PaymentResult:
        result: PaymentResult = self._call(
            "retrieve", lambda: _from_intent(self._client.v1.payment_intents.retrieve(payment_intent))
        )
        return result

    def card(self, customer: str, payment_method: str) -> CardInfo:
        def look() -> CardInfo:
            try:
                method = self._client.v1.payment_methods.retrieve(payment_method)
            except stripe.InvalidRequestError as exc:
                raise PaymentError(f"payment method {payment_method}: {exc.user_message or exc}") from None
            if method.customer != customer:
                raise PaymentError(f"payment method {payment_method} is not attached to customer {customer}")
            card = method.card
            if card is None:
                raise PaymentError(f"payment method {payment_method} is not a card")
            return CardInfo(customer, payment_method, card.brand, card.last4, card.exp_month, card.exp_year)

        info: CardInfo = self._call("card", look)
        return info

    def list_payments(self, customer: str, created_after: datetime) -> list[PaymentRecord]:
        since = int(created_after.timestamp())

        def page_through() -> list[PaymentRecord]:
            found: list[PaymentRecord] = []
            params: dict[str, Any] = {"customer": customer, "created": {"gte": since}, "limit": 100}
            while True:
                try:
                    page = self._client.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
                except stripe.InvalidRequestError as exc:
                    if exc.code == "resource_missing" and not found:  # no such customer: it paid nothing
                        return found
                    raise PaymentError(f"list_payments of {customer}: {exc.user_message or exc}") from exc
                for intent in page.data:
                    metadata: dict[str, Any] = intent.metadata.to_dict() if intent.metadata else {}
                    found.append(
                        PaymentRecord(
                            id=intent.id,
                            amount=int(intent.amount),
                            currency=intent.currency.upper(),
                            status=intent.status,
                            metadata={str(k): str(v) for k, v in metadata.items()},
                            created=datetime.fromtimestamp(intent.created, UTC),
                        )
                    )
                if not page.has_more or not page.data:
                    return found
                params["starting_after"] = page.data[-1].id

        records: list[PaymentRecord] = self._call("list_payments", page_through)
        return records
