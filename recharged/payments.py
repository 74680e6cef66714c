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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import requests
import stripe
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from recharged.cards import CardDetails as CardDetails  # the card values, kept importable from here too
from recharged.cards import CardInfo as CardInfo
from recharged.cards import card_label as card_label
from recharged.errors import (
    DatabaseError,
    NoSuchCardError,
    PaymentError,
    ProcessorFault,
    RechargedError,
    TransientPaymentError,
)
from recharged.states import AttemptStatus, DeclineClass

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

# What the processor said of an attempt: every AttemptStatus but `abandoned`, which only recharged concludes.
# `error`: the processor refused our request (an integration error), which never counts against the card.
Outcome = Literal[
    AttemptStatus.SUCCEEDED,
    AttemptStatus.DECLINED,
    AttemptStatus.ACTION_REQUIRED,
    AttemptStatus.PENDING,
    AttemptStatus.ERROR,
]


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
class Authentication:
    """A payment waiting for the customer to authenticate: its client secret and next action, for Stripe.js."""

    payment_intent: str
    client_secret: str | None = field(repr=False)
    next_action: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class PaymentResult:
    outcome: Outcome
    payment_intent: str | None
    decline_class: DeclineClass | None = None
    code: str | None = None
    decline_code: str | None = None
    advice_code: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """A payment as the processor lists it: amount in minor units, currency upper-case (as recharged keeps it),
    the processor's status (succeeded, processing, requires_action, requires_payment_method, canceled, ...), and
    its latest charge with the refunds and disputes since."""

    id: str
    amount: int
    currency: str
    status: str
    metadata: Mapping[str, str]
    created: datetime
    latest_charge: ChargeRecord | None = None  # with its refunds and disputes (`list_payments` expands it)


@dataclass(frozen=True, slots=True)
class RefundRecord:
    """A refund as the processor holds it now: amount in the charge's minor units, currency upper-case, status
    pending, requires_action, succeeded, failed or canceled. Only a succeeded refund has given money back."""

    id: str
    charge: str | None
    payment_intent: str | None
    amount: int
    currency: str
    status: str
    created: datetime


@dataclass(frozen=True, slots=True)
class DisputeRecord:
    """A dispute as the processor holds it now. `funds_withdrawn` / `funds_reinstated`: its balance transactions
    took the disputed amount from us / gave it back (a won dispute); `amount` is in the charge's minor units."""

    id: str
    charge: str | None
    payment_intent: str | None
    amount: int
    currency: str
    status: str  # warning_needs_response, needs_response, under_review, won, lost, ...
    reason: str | None
    funds_withdrawn: bool
    funds_reinstated: bool
    created: datetime


@dataclass(frozen=True, slots=True)
class ChargeRecord:
    """A charge with everything given back since: its refunds (every one, whatever its status) and disputes."""

    id: str
    payment_intent: str | None
    amount: int
    currency: str
    status: str
    amount_refunded: int
    disputed: bool
    metadata: Mapping[str, str]
    refunds: tuple[RefundRecord, ...]
    disputes: tuple[DisputeRecord, ...]
    created: datetime


@dataclass(frozen=True, slots=True)
class MethodRecord:
    """A payment method as the processor holds it now; `customer` None: detached (it can never be used again).
    The card details are None for a payment method that is not a card."""

    id: str
    customer: str | None
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    id: str
    deleted: bool


class PaymentGateway(Protocol):
    # Our clock minus the processor's, as its last answer showed (None before any answer).
    skew: timedelta | None

    def charge(self, request: ChargeRequest) -> PaymentResult:
        """Send (or re-send, with the same key) one charge."""
        ...

    def find(self, customer: str, idempotency_key: str, created_after: datetime) -> PaymentResult | None:
        """The payment made under this attempt's key, looked up without creating anything; None if none."""
        ...

    def retrieve(self, payment_intent: str) -> PaymentResult:
        """The current state of a known payment."""
        ...

    def authentication(self, payment_intent: str) -> Authentication | None:
        """What the customer's browser needs to authenticate a payment (its client secret for Stripe.js, and the
        next action when Stripe gives one); None when the payment no longer waits for them (paid, processing,
        cancelled)."""
        ...

    def card(self, customer: str, payment_method: str) -> CardInfo:
        """Brand, last4 and expiry of a card on file, checking that it belongs to the customer."""
        ...

    def list_payments(self, customer: str, created_after: datetime) -> list[PaymentRecord]:
        """Every payment of the customer created at or after `created_after`, whatever became of it, with its
        latest charge, refunds and disputes (for `recharged reconcile`); newest first, as the processor lists
        them. PaymentError when the customer's payments cannot be listed (a customer deleted at the processor)."""
        ...

    # --- after the charge: re-read what an event was about (never trusting the event's own copy) -------------

    def charge_details(self, charge: str) -> ChargeRecord | None:
        """A charge with all its refunds and disputes as they are now; None when the processor has no such charge."""
        ...

    def refund(self, refund: str) -> RefundRecord | None:
        """A refund as it is now; None when the processor has no such refund."""
        ...

    def dispute(self, dispute: str) -> DisputeRecord | None:
        """A dispute as it is now; None when the processor has no such dispute."""
        ...

    def payment_method(self, payment_method: str) -> MethodRecord | None:
        """A payment method as it is now (attached or detached, its card's details); None when there is none."""
        ...

    def customer(self, customer: str) -> CustomerRecord | None:
        """Whether a customer exists or was deleted; None when the processor never had it."""
        ...

    def recent_reversals(self, created_after: datetime) -> tuple[list[RefundRecord], list[DisputeRecord]]:
        """Every refund and dispute created at or after `created_after`, whoever's charge they concern (for
        `recharged reconcile`: a refund of an older charge is found too)."""
        ...

    def events_since(self, created_after: datetime) -> list[dict[str, Any]]:
        """The processor's events created at or after `created_after`, oldest first, as plain dicts shaped as the
        webhooks deliver them (Stripe keeps them 30 days): what a restored database's inbox may be missing."""
        ...


def classify(code: str | None, decline_code: str | None, advice_code: str | None) -> DeclineClass | Literal["action"]:
    """What a decline means: replace the card (hard), try later or elsewhere (soft), or the customer must act."""
    if code in ACTION_CODES or decline_code in ACTION_CODES:
        return "action"
    if decline_code in HARD_DECLINES or code in HARD_DECLINES or advice_code in HARD_ADVICE:
        return DeclineClass.HARD
    return DeclineClass.SOFT


def declined(payment_intent: str | None, code: str | None, decline_code: str | None, advice_code: str | None,
             message: str | None) -> PaymentResult:  # fmt: skip
    verdict = classify(code, decline_code, advice_code)
    if verdict == "action":
        return PaymentResult(
            AttemptStatus.ACTION_REQUIRED, payment_intent, None, code, decline_code, advice_code, message
        )
    return PaymentResult(AttemptStatus.DECLINED, payment_intent, verdict, code, decline_code, advice_code, message)


# What the processor says of a card whose ids we hold wrong (an import brought them, or a mistake): it has no such
# payment method or customer, or the payment method is another customer's. Never the customer's card: an
# integration error (AttemptStatus.ERROR) with this code, and recharge.py sets the card aside without blame.
NOT_HELD = frozenset({"payment_method_missing", "customer_missing", "payment_method_of_another_customer"})

# PaymentIntent states that only a request of ours can cause (we always confirm, and capture automatically).
OUR_STATES = frozenset({"requires_confirmation", "requires_capture"})


def integration_error(exc: stripe.StripeError) -> PaymentResult:
    """The processor refused our request (4xx, not about the card): what it said, for ops."""
    message = f"{exc.http_status} {exc.code or 'invalid_request'}: {exc.user_message or exc}"
    return PaymentResult(AttemptStatus.ERROR, None, None, exc.code or "invalid_request", None, None, message[:500])


def _from_intent(intent: Any) -> PaymentResult:
    status = intent.status
    if status == "succeeded":
        return PaymentResult(AttemptStatus.SUCCEEDED, intent.id)
    if status == "requires_action":
        return PaymentResult(AttemptStatus.ACTION_REQUIRED, intent.id, code="authentication_required")
    if status in OUR_STATES:
        message = f"the payment was left in {status}: our request did not confirm it or capture it"
        return PaymentResult(AttemptStatus.ERROR, intent.id, code=status, message=message)
    if status == "processing":
        return PaymentResult(AttemptStatus.PENDING, intent.id)
    error = getattr(intent, "last_payment_error", None)
    return declined(
        intent.id,
        getattr(error, "code", None) or status,
        getattr(error, "decline_code", None),
        getattr(error, "advice_code", None),
        getattr(error, "message", None),
    )


# Takes the next free slot of a budget shared with other instances, at this many requests per second, and answers
# how many seconds until it; DatabaseError when the budget cannot be reached (store/budget.py).
SharedSlots = Callable[[float], float]


class RateLimiter:
    """At most `per_second` requests per second: each request takes the next free slot, slots 1/per_second apart,
    and waits for it. The slots are this process's, across its threads; with `shared`, they are taken from a
    budget every instance shares (in the database), so that `per_second` is the whole deployment's. Real time on
    purpose: it paces requests, it decides nothing."""

    def __init__(
        self,
        per_second: float,
        *,
        shared: SharedSlots | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._per_second, self._spacing = per_second, 1.0 / per_second
        self._shared = shared
        self._monotonic, self._sleep = monotonic, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Wait for this request's slot. TransientPaymentError when the shared budget cannot give one: nothing was
        sent, and the gateway retries it as it retries a processor that did not answer (never a decline)."""
        if self._shared is not None:
            try:
                wait = self._shared(self._per_second)
            except DatabaseError as exc:
                raise TransientPaymentError(f"no turn in the processor budget, nothing was sent: {exc}") from exc
        else:
            with self._lock:
                now = self._monotonic()
                slot = max(now, self._next)
                self._next = slot + self._spacing
            wait = slot - now
        if wait > 0:
            self._sleep(wait)


def _retried_inline(exc: BaseException) -> bool:
    """Transient failures are retried with the same key, except a ProcessorFault: Stripe may replay what it stored."""
    return isinstance(exc, TransientPaymentError) and not isinstance(exc, ProcessorFault)


# How far back of an attempt's start (on our clock) its payment is looked for (on the processor's): any plausible
# skew between the two clocks, e.g. a host resumed from suspend or with NTP broken, is far less than this.
LOOKUP_MARGIN = timedelta(days=2)

MAX_CONNECTIONS = 300  # kept open to the processor: charges in flight (daemon.charge_concurrency <= 256) and more
CallObserver = Callable[[str, "str | None"], None]  # (what, None when it succeeded or else the error)

# An admin at a terminal waits for these (`sources add` verifying a card, `reconcile`, `events fetch`). When the
# processor cannot be connected to at all, nothing was sent and back-off will not help within seconds: they get a
# short connect timeout and at most one quick retry, then say what to check. Charges keep their keyed retries.
ADMIN_CONNECT_TIMEOUT_SECONDS = 5.0
UNREACHABLE_RETRY_SECONDS = 0.2
_connect_timeout: ContextVar[float | None] = ContextVar("recharged_connect_timeout", default=None)


def _unreachable(exc: BaseException) -> str | None:
    """Why the processor could not be connected to (refused, a name that does not resolve, no route, no answer
    within the connect timeout), when that is what `exc` (a stripe APIConnectionError) was: the request was never
    sent. None for anything else, e.g. a connection lost after the request went out."""
    cause = exc.__cause__
    if not isinstance(cause, requests.ConnectionError) or isinstance(cause, requests.exceptions.SSLError):
        return None
    reason = getattr(cause.args[0], "reason", None) if cause.args else None
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return "its host name does not resolve"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # a subclass of ConnectTimeoutError: first
        error = reason.__cause__
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        return error.strerror.lower() if isinstance(error, OSError) and error.strerror else "no connection"
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "no answer to connect"
    return None


def _nothing_sent(state: RetryCallState) -> bool:
    """The last attempt could not connect to the processor at all."""
    error = state.outcome.exception() if state.outcome is not None else None
    cause = error.__cause__ if isinstance(error, TransientPaymentError) else None
    return isinstance(cause, stripe.APIConnectionError) and _unreachable(cause) is not None


class _Adapter(HTTPAdapter):
    """requests' adapter, with the short connect timeout of an admin call while one runs (the read timeout stays)."""

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        connect = _connect_timeout.get()
        if connect is not None:
            read = timeout[1] if isinstance(timeout, tuple) else timeout
            timeout = (connect if read is None else min(connect, read), read)  # type: ignore[assignment]
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)


@contextmanager
def _short_connect_timeout(seconds: float) -> Iterator[None]:
    token = _connect_timeout.set(seconds)
    try:
        yield
    finally:
        _connect_timeout.reset(token)


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
        on_skew: Callable[[timedelta], None] | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._limiter, self._on_call, self._on_retry = rate_limiter, on_call, on_retry
        session = requests.Session()
        # requests keeps 10 connections per host: with more charges in flight, every request beyond those
        # would open (and, against Stripe, TLS-handshake) a connection of its own and log that it dropped it.
        adapter = _Adapter(pool_maxsize=MAX_CONNECTIONS)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        if urlsplit(api_base).hostname in ("127.0.0.1", "localhost", "::1"):
            session.trust_env = False  # a local test server is never reached through a proxy
        session.hooks["response"].append(self._clock_of)
        self.skew: timedelta | None = None  # our clock minus the processor's, from its last answer
        self._on_skew = on_skew
        self._now = now or (lambda: datetime.now(UTC))  # our clock: the injected Clock's `now`
        self._api_base = api_base.rstrip("/")
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/")},
            max_network_retries=0,  # retries are ours: same key, same parameters, counted and logged
            http_client=stripe.RequestsClient(timeout=timeout_seconds, session=session),
        )
        backoff = wait or wait_exponential_jitter(initial=retry_initial_seconds, max=retry_max_seconds)
        self._retry = Retrying(
            # A ProcessorFault is not retried with the same key: the processor may replay what it stored.
            retry=retry_if_exception(
                lambda e: isinstance(e, TransientPaymentError) and not isinstance(e, ProcessorFault)
            ),
            stop=stop_after_attempt(max_retries + 1),
            wait=backoff,
            reraise=True,
        )
        # Admin calls: the same, except that when nothing could be sent they try once more, quickly, at most.
        quick = wait or (lambda _state: UNREACHABLE_RETRY_SECONDS)
        unreachable_attempts = min(max_retries, 1) + 1
        self._admin_retry = Retrying(
            retry=retry_if_exception(_retried_inline),
            stop=lambda state: (
                state.attempt_number >= (unreachable_attempts if _nothing_sent(state) else max_retries + 1)
            ),
            wait=lambda state: quick(state) if _nothing_sent(state) else backoff(state),
            reraise=True,
        )
        self.retries = 0  # transient failures retried so far, for metrics

    def _clock_of(self, response: requests.Response, *_args: Any, **_kwargs: Any) -> None:
        """Every answer carries the processor's time (the `Date` header, to the second): keep how far our clock
        is from it, for /healthz, the metrics and the charge flow's refusal to charge past a tolerance."""
        stamped = response.headers.get("Date")
        if not stamped:
            return
        try:
            theirs = parsedate_to_datetime(stamped)
        except (TypeError, ValueError):
            return
        if theirs.tzinfo is None:
            return
        self.skew = self._now() - theirs
        if self._on_skew is not None:
            self._on_skew(self.skew)

    def _call(self, what: str, fn: Any, *, keyed: bool = False, admin: bool = False) -> Any:
        """`fn` with inline retries of what is transient; `keyed`: a POST under an idempotency key, where a 5xx
        the processor does not ask us to retry raises ProcessorFault instead of being sent again; `admin`: an
        admin waits for it (see ADMIN_CONNECT_TIMEOUT_SECONDS)."""
        try:
            if admin:
                with _short_connect_timeout(ADMIN_CONNECT_TIMEOUT_SECONDS):
                    result = self._call_with_retries(what, fn, keyed, self._admin_retry)
            else:
                result = self._call_with_retries(what, fn, keyed, self._retry)
        except RechargedError as exc:
            if self._on_call is not None:
                self._on_call(what, str(exc))
            raise
        if self._on_call is not None:
            self._on_call(what, None)
        return result

    def _call_with_retries(self, what: str, fn: Any, keyed: bool, retrying: Retrying) -> Any:
        for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.retries += 1
                    if self._on_retry is not None:
                        self._on_retry(what)
                if self._limiter is not None:
                    self._limiter.acquire()
                try:
                    return fn()
                except stripe.APIConnectionError as exc:
                    why = _unreachable(exc)
                    if why is not None:
                        raise TransientPaymentError(
                            f"cannot reach the payment processor at {self._api_base}: {why}; "
                            "check [payments] stripe_api_base and the network"
                        ) from exc
                    raise TransientPaymentError(f"{what}: {type(exc).__name__}: {exc.user_message or exc}") from exc
                except stripe.RateLimitError as exc:
                    raise TransientPaymentError(f"{what}: {type(exc).__name__}: {exc.user_message or exc}") from exc
                except stripe.APIError as exc:  # 409 (idempotent request in progress) and 5xx
                    should_retry = (exc.headers or {}).get("Stripe-Should-Retry")
                    status = exc.http_status or 0
                    if keyed and status >= 500 and should_retry != "true":
                        raise ProcessorFault(
                            f"{what}: processor error {status} (not retried with the same key)"
                        ) from exc
                    if should_retry == "false":
                        raise PaymentError(f"{what}: processor error {status}, and it asked not to retry") from exc
                    raise TransientPaymentError(f"{what}: processor error {status}") from exc
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
            except stripe.InvalidRequestError as exc:
                # Only an answer about the card or the customer counts against the card; any other refusal is
                # a fault of our request (an integration error), which leaves the card and the customer alone.
                gone = self._card_gone(request.customer, request.payment_method)
                if gone in NOT_HELD:  # the ids we hold are wrong: our error, never the customer's decline
                    message = f"{exc.http_status} {gone}: {exc.user_message or exc}"[:500]
                    return PaymentResult(AttemptStatus.ERROR, None, None, gone, None, None, message)
                if gone is not None:
                    return PaymentResult(
                        AttemptStatus.DECLINED, None, DeclineClass.HARD, gone, None, None, exc.user_message
                    )
                return integration_error(exc)
            return _from_intent(intent)

        result: PaymentResult = self._call("charge", send, keyed=True)
        return result

    def _card_gone(self, customer: str, payment_method: str) -> str | None:
        """Why the card can no longer be charged, asked of the processor itself: it went away
        ("payment_method_detached", "customer_deleted"), or it never was what we hold (NOT_HELD:
        "payment_method_missing", "customer_missing", "payment_method_of_another_customer"); None when the card is
        fine, or when that cannot be told now (then the refusal is treated as ours, and the card is left alone)."""
        try:
            try:
                method = self._client.v1.payment_methods.retrieve(payment_method)
            except stripe.InvalidRequestError as exc:
                return "payment_method_missing" if exc.code == "resource_missing" else None
            if method.customer is None:
                return "payment_method_detached"
            if method.customer != customer:
                return "payment_method_of_another_customer"
            try:
                found = self._client.v1.customers.retrieve(customer)
            except stripe.InvalidRequestError as exc:
                return "customer_missing" if exc.code == "resource_missing" else None
            return "customer_deleted" if getattr(found, "deleted", False) else None
        except stripe.StripeError:
            return None

    def find(self, customer: str, idempotency_key: str, created_after: datetime) -> PaymentResult | None:
        """The customer's PaymentIntents are listed back to `created_after` less LOOKUP_MARGIN and matched on the
        attempt key we put in their metadata. `created` is stamped by the processor's clock and `created_after`
        comes from ours, so the margin covers any plausible skew (days, not an hour): None means the processor
        positively holds no payment for the key. When the customer cannot be listed (deleted at the processor),
        the key is looked up with the search API; if that cannot answer either, PaymentError: unknown, not "none"."""
        since = int((created_after - LOOKUP_MARGIN).timestamp())

        def by_listing() -> PaymentResult | None:
            params: dict[str, Any] = {"customer": customer, "created": {"gte": since}, "limit": 100}
            while True:
                try:
                    page = self._client.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
                except stripe.InvalidRequestError as exc:
                    if exc.code != "resource_missing":
                        raise
                    return by_search()
                for intent in page.data:
                    metadata: dict[str, Any] = intent.metadata.to_dict() if intent.metadata else {}
                    if metadata.get("recharged_attempt") == idempotency_key:
                        return _from_intent(intent)
                if not page.has_more or not page.data:
                    return None
                params["starting_after"] = page.data[-1].id

        def by_search() -> PaymentResult | None:
            query = f"metadata['recharged_attempt']:'{idempotency_key}'"
            page = self._client.v1.payment_intents.search(params={"query": query, "limit": 10})
            return _from_intent(page.data[0]) if page.data else None

        found: PaymentResult | None = self._call("find", by_listing)
        return found

    def retrieve(self, payment_intent: str) -> PaymentResult:
        result: PaymentResult = self._call(
            "retrieve", lambda: _from_intent(self._client.v1.payment_intents.retrieve(payment_intent))
        )
        return result

    def authentication(self, payment_intent: str) -> Authentication | None:
        def look() -> Authentication | None:
            intent = self._client.v1.payment_intents.retrieve(payment_intent)
            # Off-session, Stripe fails a payment that needs authentication (requires_payment_method, with the
            # error authentication_required); on-session it waits in requires_action. Either way the customer's
            # browser confirms it with the client secret (Stripe.js confirmCardPayment / handleNextAction).
            if intent.status not in ("requires_action", "requires_payment_method", "requires_confirmation"):
                return None
            action = intent.next_action
            return Authentication(intent.id, intent.client_secret, None if action is None else action.to_dict())

        found: Authentication | None = self._call("retrieve", look)
        return found

    def card(self, customer: str, payment_method: str) -> CardInfo:
        def look() -> CardInfo:
            try:
                method = self._client.v1.payment_methods.retrieve(payment_method)
            except stripe.InvalidRequestError as exc:
                missing = exc.code == "resource_missing" or exc.http_status == 404
                raise (NoSuchCardError if missing else PaymentError)(
                    f"payment method {payment_method}: {exc.user_message or exc}"
                ) from None
            if method.customer != customer:
                raise NoSuchCardError(f"payment method {payment_method} is not attached to customer {customer}")
            card = method.card
            if card is None:
                raise NoSuchCardError(f"payment method {payment_method} is not a card")
            return CardInfo(customer, payment_method, card.brand, card.last4, card.exp_month, card.exp_year)

        info: CardInfo = self._call("card", look, admin=True)
        return info

    def list_payments(self, customer: str, created_after: datetime) -> list[PaymentRecord]:
        since = int(created_after.timestamp())

        def page_through() -> list[PaymentRecord]:
            found: list[PaymentRecord] = []
            params: dict[str, Any] = {
                "customer": customer,
                "created": {"gte": since},
                "limit": 100,
                "expand": ["data.latest_charge", "data.latest_charge.refunds"],
            }
            while True:
                try:
                    page = self._client.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
                except stripe.InvalidRequestError as exc:
                    # A customer that cannot be listed (deleted at the processor) did not "pay nothing": its payments
                    # cannot be checked, and the caller must say so.
                    raise PaymentError(f"list_payments of {customer}: {exc.user_message or exc}") from exc
                for intent in page.data:
                    metadata: dict[str, Any] = intent.metadata.to_dict() if intent.metadata else {}
                    latest = intent.latest_charge
                    found.append(
                        PaymentRecord(
                            id=intent.id,
                            amount=int(intent.amount),
                            currency=intent.currency.upper(),
                            status=intent.status,
                            metadata={str(k): str(v) for k, v in metadata.items()},
                            created=datetime.fromtimestamp(intent.created, UTC),
                            latest_charge=None
                            if latest is None or isinstance(latest, str)
                            else self._charge_record(latest.to_dict()),
                        )
                    )
                if not page.has_more or not page.data:
                    return found
                params["starting_after"] = page.data[-1].id

        records: list[PaymentRecord] = self._call("list_payments", page_through, admin=True)
        return records

    # --- after the charge ----------------------------------------------------------------------------------

    def charge_details(self, charge: str) -> ChargeRecord | None:
        def look() -> ChargeRecord | None:
            found = _or_none(lambda: self._client.v1.charges.retrieve(charge, params={"expand": ["refunds"]}))
            return None if found is None else self._charge_record(found.to_dict())

        record: ChargeRecord | None = self._call("charge_details", look)
        return record

    def refund(self, refund: str) -> RefundRecord | None:
        def look() -> RefundRecord | None:
            found = _or_none(lambda: self._client.v1.refunds.retrieve(refund))
            return None if found is None else _refund_record(found.to_dict())

        record: RefundRecord | None = self._call("refund", look)
        return record

    def dispute(self, dispute: str) -> DisputeRecord | None:
        def look() -> DisputeRecord | None:
            found = _or_none(lambda: self._client.v1.disputes.retrieve(dispute))
            return None if found is None else _dispute_record(found.to_dict())

        record: DisputeRecord | None = self._call("dispute", look)
        return record

    def payment_method(self, payment_method: str) -> MethodRecord | None:
        def look() -> MethodRecord | None:
            found = _or_none(lambda: self._client.v1.payment_methods.retrieve(payment_method))
            if found is None:
                return None
            data = found.to_dict()
            card = data.get("card") or {}
            return MethodRecord(
                id=str(data["id"]),
                customer=_id_of(data.get("customer")),
                brand=card.get("brand"),
                last4=card.get("last4"),
                exp_month=card.get("exp_month"),
                exp_year=card.get("exp_year"),
            )

        record: MethodRecord | None = self._call("payment_method", look)
        return record

    def customer(self, customer: str) -> CustomerRecord | None:
        def look() -> CustomerRecord | None:
            found = _or_none(lambda: self._client.v1.customers.retrieve(customer))
            if found is None:
                return None
            return CustomerRecord(str(found.id), bool(getattr(found, "deleted", False)))

        record: CustomerRecord | None = self._call("customer", look)
        return record

    def recent_reversals(self, created_after: datetime) -> tuple[list[RefundRecord], list[DisputeRecord]]:
        since = int(created_after.timestamp())

        def page_through() -> tuple[list[RefundRecord], list[DisputeRecord]]:
            return (
                self._all("refunds", {"created": {"gte": since}}, _refund_record),
                self._all("disputes", {"created": {"gte": since}}, _dispute_record),
            )

        found: tuple[list[RefundRecord], list[DisputeRecord]] = self._call("recent_reversals", page_through, admin=True)
        return found

    def events_since(self, created_after: datetime) -> list[dict[str, Any]]:
        since = int(created_after.timestamp())

        def page_through() -> list[dict[str, Any]]:
            params: dict[str, Any] = {"created": {"gte": since}, "limit": 100}
            found: list[dict[str, Any]] = []
            while True:
                page = self._client.v1.events.list(params=params)  # type: ignore[arg-type]
                found += [event.to_dict() for event in page.data]
                if not page.has_more or not page.data:
                    return sorted(found, key=lambda e: (int(e.get("created") or 0), str(e.get("id"))))
                params["starting_after"] = page.data[-1].id

        events: list[dict[str, Any]] = self._call("events_since", page_through, admin=True)
        return events

    def _charge_record(self, charge: dict[str, Any]) -> ChargeRecord:
        """A charge (as a plain dict, its `refunds` list expanded or not) with every refund and dispute: the
        refunds list is paged through when it has more, the disputes are listed when the charge was disputed."""
        listed = charge.get("refunds")
        refunds = [_refund_record(r) for r in (listed or {}).get("data") or []]
        if listed is None or listed.get("has_more"):
            refunds = self._all("refunds", {"charge": charge["id"]}, _refund_record)
        disputes = self._all("disputes", {"charge": charge["id"]}, _dispute_record) if charge.get("disputed") else []
        metadata = charge.get("metadata") or {}
        return ChargeRecord(
            id=str(charge["id"]),
            payment_intent=_id_of(charge.get("payment_intent")),
            amount=int(charge["amount"]),
            currency=str(charge["currency"]).upper(),
            status=str(charge.get("status")),
            amount_refunded=int(charge.get("amount_refunded") or 0),
            disputed=bool(charge.get("disputed")),
            metadata={str(k): str(v) for k, v in metadata.items()},
            refunds=tuple(sorted(refunds, key=lambda r: (r.created, r.id))),
            disputes=tuple(sorted(disputes, key=lambda d: (d.created, d.id))),
            created=datetime.fromtimestamp(int(charge["created"]), UTC),
        )

    def _all(
        self, kind: Literal["refunds", "disputes"], where: dict[str, Any], parse: Callable[[dict[str, Any]], Any]
    ) -> list[Any]:
        """Every refund or dispute matching `where` (a charge, a creation time), page after page."""
        service = self._client.v1.refunds if kind == "refunds" else self._client.v1.disputes
        params: dict[str, Any] = {**where, "limit": 100}
        found: list[Any] = []
        while True:
            page = service.list(params=params)  # type: ignore[arg-type]
            found += [parse(item.to_dict()) for item in page.data]
            if not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id


def _or_none(fetch: Callable[[], Any]) -> Any:
    """What `fetch` retrieved, or None when the processor has no such object (404 resource_missing)."""
    try:
        return fetch()
    except stripe.InvalidRequestError as exc:
        if exc.code == "resource_missing" or exc.http_status == 404:
            return None
        raise


def _id_of(value: Any) -> str | None:
    """The id of a reference that may be expanded (an object) or not (its id)."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


def _refund_record(refund: dict[str, Any]) -> RefundRecord:
    return RefundRecord(
        id=str(refund["id"]),
        charge=_id_of(refund.get("charge")),
        payment_intent=_id_of(refund.get("payment_intent")),
        amount=int(refund["amount"]),
        currency=str(refund["currency"]).upper(),
        status=str(refund.get("status")),
        created=datetime.fromtimestamp(int(refund["created"]), UTC),
    )


def _dispute_record(dispute: dict[str, Any]) -> DisputeRecord:
    """Funds moved when the dispute's balance transactions say so: a negative one withdrew the disputed amount,
    a positive one reinstated it (their amounts are in the settlement currency: only their signs are used)."""
    movements = [int(t.get("amount") or 0) for t in dispute.get("balance_transactions") or [] if isinstance(t, dict)]
    return DisputeRecord(
        id=str(dispute["id"]),
        charge=_id_of(dispute.get("charge")),
        payment_intent=_id_of(dispute.get("payment_intent")),
        amount=int(dispute["amount"]),
        currency=str(dispute["currency"]).upper(),
        status=str(dispute.get("status")),
        reason=dispute.get("reason"),
        funds_withdrawn=any(m < 0 for m in movements),
        funds_reinstated=any(m > 0 for m in movements),
        created=datetime.fromtimestamp(int(dispute["created"]), UTC),
    )
