"""Drive recharged.testing.stripe_server through the real ``stripe`` SDK."""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests
import stripe

from recharged.testing import SANDBOX_RATE_LIMIT, StripeTestServer, decode_form

API_KEY = "sk_test_recharged"
# Card-only PaymentIntents: on API version 2026-10-28.endive (pinned by stripe-python 16) `payment_method_types`
# is no longer writable, and confirming with dynamic payment methods that allow redirects needs a return_url.
CARD_ONLY: dict[str, Any] = {"allowed_payment_method_types": ["card"]}


class FakeClock:
    """A settable POSIX clock."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(fake_clock: FakeClock) -> Iterator[StripeTestServer]:
    with StripeTestServer(clock=fake_clock) as srv:
        yield srv


MakeClient = Callable[..., stripe.StripeClient]


@pytest.fixture
def make_client(server: StripeTestServer) -> Iterator[MakeClient]:
    """Factory of SDK clients pointed at ``server`` (or at ``base_url``)."""
    sessions: list[requests.Session] = []

    def make(
        *,
        timeout: float = 5.0,
        max_network_retries: int = 0,
        api_key: str = API_KEY,
        base_url: str | None = None,
    ) -> stripe.StripeClient:
        session = requests.Session()
        session.trust_env = False  # never route 127.0.0.1 through an HTTP(S)_PROXY from the environment
        sessions.append(session)
        return stripe.StripeClient(
            api_key,
            base_addresses={"api": base_url or server.url},
            max_network_retries=max_network_retries,
            http_client=stripe.RequestsClient(timeout=timeout, session=session),
        )

    yield make
    for session in sessions:
        session.close()


@pytest.fixture
def client(make_client: MakeClient) -> stripe.StripeClient:
    return make_client()


def new_customer(client: stripe.StripeClient, **params: Any) -> stripe.Customer:
    create_params: Any = {"email": "ops@example.com", **params}
    return client.v1.customers.create(params=create_params)


def recharge_params(customer: str, payment_method: str, amount: int = 2000, **extra: Any) -> Any:
    """Params of an off-session recharge (typed ``Any``: the SDK's TypedDicts reject plain dicts)."""
    return {
        "amount": amount,
        "currency": "usd",
        "customer": customer,
        "payment_method": payment_method,
        "confirm": True,
        "off_session": True,
        "metadata": {"account_id": "acct-42"},
        **CARD_ONLY,
        **extra,
    }


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# --------------------------------------------------------------------------- happy path


def test_customer_attach_and_successful_off_session_payment(
    server: StripeTestServer, client: stripe.StripeClient, fake_clock: FakeClock
) -> None:
    customer = new_customer(client, metadata={"account_id": "acct-42"}, name="Acme")
    assert customer.id.startswith("cus_")
    assert customer.metadata is not None
    assert customer.metadata["account_id"] == "acct-42"
    assert customer.livemode is False
    assert customer.created == int(fake_clock.now)

    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    assert pm.id.startswith("pm_")
    assert pm.id != "pm_card_visa"
    assert pm.customer == customer.id
    assert pm.card is not None
    assert (pm.card.brand, pm.card.last4, pm.card.exp_month) == ("visa", "4242", 12)
    assert pm.card.exp_year > time.gmtime(fake_clock.now).tm_year

    listed = client.v1.customers.payment_methods.list(customer.id, params={"type": "card"})
    assert [m.id for m in listed.data] == [pm.id]
    assert client.v1.payment_methods.retrieve(pm.id).customer == customer.id

    pi = client.v1.payment_intents.create(
        params=recharge_params(customer.id, pm.id, description="Auto-recharge"),
        options={"idempotency_key": "recharge-1"},
    )
    assert pi.id.startswith("pi_")
    assert pi.status == "succeeded"
    assert pi.amount == pi.amount_received == 2000
    assert pi.payment_method == pm.id
    assert isinstance(pi.latest_charge, str)
    assert pi.latest_charge.startswith("ch_")
    assert pi.metadata is not None
    assert pi.metadata["account_id"] == "acct-42"
    assert pi.client_secret is not None
    assert pi.client_secret.startswith(pi.id + "_secret_")
    assert pi.last_response is not None
    assert pi.last_response.request_id is not None
    assert pi.last_response.request_id.startswith("req_")

    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert (charge.status, charge.paid, charge.amount_captured, charge.payment_intent) == (
        "succeeded",
        True,
        2000,
        pi.id,
    )
    assert charge.payment_method_details is not None
    assert charge.payment_method_details.card is not None
    assert charge.payment_method_details.card.last4 == "4242"

    expanded = client.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge", "customer"]})
    assert isinstance(expanded.latest_charge, stripe.Charge)
    assert isinstance(expanded.customer, stripe.Customer)
    assert expanded.customer.id == customer.id

    stored = server.payment_intents(customer=customer.id)
    assert [(p["id"], p["status"]) for p in stored] == [(pi.id, "succeeded")]


@pytest.mark.parametrize(
    ("test_pm", "brand", "last4"),
    [
        ("pm_card_visa", "visa", "4242"),
        ("pm_card_mastercard", "mastercard", "4444"),
        ("pm_card_chargeDeclined", "visa", "0002"),
        ("pm_card_chargeDeclinedInsufficientFunds", "visa", "9995"),
        ("pm_card_chargeDeclinedLostCard", "visa", "9987"),
        ("pm_card_chargeDeclinedStolenCard", "visa", "9979"),
        ("pm_card_chargeDeclinedExpiredCard", "visa", "0069"),
        ("pm_card_chargeDeclinedProcessingError", "visa", "0119"),
        ("pm_card_authenticationRequired", "visa", "3184"),
    ],
)
def test_attached_test_cards_have_stripe_card_details(
    client: stripe.StripeClient, test_pm: str, brand: str, last4: str
) -> None:
    customer = new_customer(client)
    pm = client.v1.payment_methods.attach(test_pm, params={"customer": customer.id})
    assert pm.card is not None
    assert (pm.card.brand, pm.card.last4, pm.type, pm.object) == (brand, last4, "card", "payment_method")


def test_test_payment_method_usable_directly_and_mastercard_succeeds(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    customer = new_customer(client)
    pi = client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_mastercard"))
    assert pi.status == "succeeded"
    assert isinstance(pi.payment_method, str)
    assert pi.payment_method.startswith("pm_")
    assert pi.payment_method != "pm_card_mastercard"  # Stripe materialises a fresh PaymentMethod
    assert server.charges()[0]["payment_method_details"]["card"]["brand"] == "mastercard"


# --------------------------------------------------------------------------- declines


@pytest.mark.parametrize(
    ("test_pm", "code", "decline_code", "advice_code", "param"),
    [
        ("pm_card_chargeDeclined", "card_declined", "generic_decline", None, None),
        ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds", "try_again_later", None),
        ("pm_card_chargeDeclinedLostCard", "card_declined", "lost_card", "do_not_try_again", None),
        ("pm_card_chargeDeclinedStolenCard", "card_declined", "stolen_card", "do_not_try_again", None),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card", "confirm_card_data", "exp_month"),
        ("pm_card_chargeDeclinedProcessingError", "processing_error", "processing_error", "try_again_later", None),
        ("pm_card_authenticationRequired", "authentication_required", "authentication_required", None, None),
    ],
)
@pytest.mark.parametrize("attach", [True, False], ids=["attached", "test-id"])
def test_declines_raise_card_error_and_intent_stays_listable(
    server: StripeTestServer,
    client: stripe.StripeClient,
    test_pm: str,
    code: str,
    decline_code: str,
    advice_code: str | None,
    param: str | None,
    attach: bool,
) -> None:
    customer = new_customer(client)
    pm_id = client.v1.payment_methods.attach(test_pm, params={"customer": customer.id}).id if attach else test_pm

    with pytest.raises(stripe.CardError) as excinfo:
        client.v1.payment_intents.create(params=recharge_params(customer.id, pm_id))

    err = excinfo.value
    assert err.http_status == 402
    assert err.code == code
    assert err.param == param
    assert err.error is not None
    assert err.error.type == "card_error"
    assert err.error.decline_code == decline_code
    assert err.error.advice_code == advice_code
    assert err.error.doc_url is not None
    assert err.error.request_log_url is not None
    assert err.error.charge is not None
    assert err.error.charge.startswith("ch_")
    failed_pi = err.error.payment_intent
    assert failed_pi is not None
    assert failed_pi.status == "requires_payment_method"
    assert failed_pi.payment_method is None
    assert failed_pi.last_payment_error is not None
    assert failed_pi.last_payment_error.code == code
    assert failed_pi.last_payment_error.decline_code == decline_code
    assert failed_pi.last_payment_error.payment_method is not None

    listed = client.v1.payment_intents.list(params={"customer": customer.id})
    assert [p.id for p in listed.data] == [failed_pi.id]
    assert listed.data[0].status == "requires_payment_method"
    assert client.v1.payment_intents.retrieve(failed_pi.id).latest_charge == err.error.charge
    charge = client.v1.charges.retrieve(err.error.charge)
    assert (charge.status, charge.failure_code, charge.paid) == ("failed", code, False)
    assert server.payment_intents(status="succeeded") == []


def test_dynamic_payment_methods_without_redirects_and_legacy_payment_method_types(
    client: stripe.StripeClient,
) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    del params["allowed_payment_method_types"]
    params["automatic_payment_methods"] = {"enabled": True, "allow_redirects": "never"}
    pi = client.v1.payment_intents.create(params=params)
    assert pi.status == "succeeded"
    assert pi.automatic_payment_methods is not None
    assert pi.automatic_payment_methods.allow_redirects == "never"
    assert pi.payment_method_types == ["card"]

    # Older API versions (before 2026-09-30) still accept payment_method_types.
    legacy = recharge_params(customer.id, "pm_card_visa", payment_method_types=["card"])
    del legacy["allowed_payment_method_types"]
    old = client.v1.payment_intents.create(params=legacy, options={"stripe_version": "2025-10-29.clover"})
    assert old.status == "succeeded"
    assert old.automatic_payment_methods is None


def test_authentication_required_on_session_requires_action(client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_authenticationRequired")
    del params["off_session"]
    pi = client.v1.payment_intents.create(params=params)
    assert pi.status == "requires_action"
    assert pi.next_action is not None
    assert pi.next_action.type == "use_stripe_sdk"


def test_create_then_confirm_and_cancel(client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    pi = client.v1.payment_intents.create(
        params={"amount": 900, "currency": "usd", "customer": customer.id, "allowed_payment_method_types": ["card"]}
    )
    assert pi.status == "requires_payment_method"
    confirmed = client.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"})
    assert confirmed.status == "succeeded"
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.cancel(pi.id)
    assert excinfo.value.code == "payment_intent_unexpected_state"

    other = client.v1.payment_intents.create(
        params={"amount": 900, "currency": "usd", "allowed_payment_method_types": ["card"]}
    )
    assert client.v1.payment_intents.cancel(other.id).status == "canceled"


# --------------------------------------------------------------------------- validation & auth


@pytest.mark.parametrize(
    ("override", "param", "code"),
    [
        ({"amount": None}, "amount", "parameter_missing"),
        ({"currency": None}, "currency", "parameter_missing"),
        ({"currency": "zzz"}, "currency", None),
        ({"amount": 49}, "amount", "amount_too_small"),
        ({"customer": "cus_doesnotexist"}, "customer", "resource_missing"),
        ({"payment_method": "pm_doesnotexist"}, "payment_method", "resource_missing"),
        ({"amount_to_charge": 5}, "amount_to_charge", "parameter_unknown"),
        ({"allowed_payment_method_types": None}, "return_url", None),  # redirects allowed: return_url needed
        (
            {"allowed_payment_method_types": None, "payment_method_types": ["card"]},
            "payment_method_types",
            "payment_method_types_no_longer_supported",
        ),
        (
            {"automatic_payment_methods": {"enabled": True, "allow_redirects": "never"}},
            "automatic_payment_methods",
            None,
        ),  # mutually exclusive with allowed_payment_method_types
    ],
)
def test_validation_errors_are_400_invalid_request(
    server: StripeTestServer, client: stripe.StripeClient, override: dict[str, Any], param: str, code: str | None
) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    params.update(override)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.create(params=params, options={"idempotency_key": "validation"})
    err = excinfo.value
    assert (err.http_status, err.param, err.code) == (400, param, code)
    assert err.error is not None
    assert err.error.type == "invalid_request_error"
    assert server.payment_intents() == []
    assert server.idempotency_status("validation") is None  # failed validation: no result saved


def test_payment_method_of_another_customer_is_rejected(client: stripe.StripeClient) -> None:
    owner, other = new_customer(client), new_customer(client)
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": owner.id})
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.create(params=recharge_params(other.id, pm.id))
    assert excinfo.value.param == "payment_method"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_methods.attach(pm.id, params={"customer": other.id})


def test_unknown_ids_are_404(client: stripe.StripeClient) -> None:
    for call in (
        lambda: client.v1.customers.retrieve("cus_nope"),
        lambda: client.v1.payment_intents.retrieve("pi_nope"),
        lambda: client.v1.payment_methods.retrieve("pm_nope"),
    ):
        with pytest.raises(stripe.InvalidRequestError) as excinfo:
            call()
        assert excinfo.value.http_status == 404
        assert excinfo.value.code == "resource_missing"


@pytest.mark.parametrize("api_key", ["sk_live_abcdefghijklmnop", "pk_test_abcdefghijkl", "nope"])
def test_authentication_failure(make_client: MakeClient, server: StripeTestServer, api_key: str) -> None:
    client = make_client(api_key=api_key)
    with pytest.raises(stripe.AuthenticationError) as excinfo:
        client.v1.customers.create(params={"email": "x@example.com"})
    assert excinfo.value.http_status == 401
    assert server.customers() == []


# --------------------------------------------------------------------------- idempotency


def test_idempotent_replay_returns_same_intent_and_creates_nothing(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    first = client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-1"})
    second = client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-1"})

    assert second.id == first.id
    assert second.latest_charge == first.latest_charge
    assert second.last_response is not None
    assert first.last_response is not None
    assert second.last_response.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.last_response.headers
    assert len(server.payment_intents()) == 1
    assert len(server.charges()) == 1
    last = server.requests()[-1]
    assert (last.idempotency_key, last.replayed, last.status) == ("k-1", True, 200)


def test_declined_response_is_replayed_too(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_chargeDeclinedInsufficientFunds")
    ids = []
    for _ in range(2):
        with pytest.raises(stripe.CardError) as excinfo:
            client.v1.payment_intents.create(params=params, options={"idempotency_key": "decl"})
        assert excinfo.value.error is not None
        assert excinfo.value.error.payment_intent is not None
        ids.append(excinfo.value.error.payment_intent.id)
    assert ids[0] == ids[1]
    assert len(server.payment_intents()) == 1


def test_same_key_different_params_is_idempotency_error(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    client.v1.payment_intents.create(
        params=recharge_params(customer.id, "pm_card_visa", amount=1000), options={"idempotency_key": "k-2"}
    )
    with pytest.raises(stripe.IdempotencyError) as excinfo:
        client.v1.payment_intents.create(
            params=recharge_params(customer.id, "pm_card_visa", amount=1500), options={"idempotency_key": "k-2"}
        )
    assert excinfo.value.http_status == 400
    assert "same parameters" in str(excinfo.value.user_message)
    assert len(server.payment_intents()) == 1


def test_concurrent_same_key_gets_409_while_first_is_in_progress(
    server: StripeTestServer, make_client: MakeClient
) -> None:
    first_client, second_client = make_client(), make_client()
    customer = new_customer(first_client)
    params = recharge_params(customer.id, "pm_card_visa")
    server.inject("slow", seconds=0.5)
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.append(
            first_client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-3"})
        )
    )
    worker.start()
    wait_until(lambda: server.idempotency_status("k-3") == "in_progress")

    with pytest.raises(stripe.APIError) as excinfo:  # v16 maps 409 to APIError (and retries it if allowed)
        second_client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-3"})
    assert excinfo.value.http_status == 409
    assert excinfo.value.error is not None
    assert excinfo.value.error.type == "idempotency_error"

    worker.join(timeout=5)
    assert len(results) == 1
    assert results[0].status == "succeeded"
    assert [p["id"] for p in server.payment_intents()] == [results[0].id]
    assert server.idempotency_status("k-3") == "completed"


def test_idempotency_keys_expire_with_the_clock(
    server: StripeTestServer, client: stripe.StripeClient, fake_clock: FakeClock
) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    first = client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-4"})

    fake_clock.advance(24 * 3600 - 1)
    assert client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-4"}).id == first.id

    fake_clock.advance(2)  # Stripe no longer holds the key: a new request is made
    assert server.idempotency_status("k-4") is None
    again = client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-4"})
    assert again.id != first.id
    assert again.created == int(fake_clock.now)
    assert len(server.payment_intents(status="succeeded")) == 2


def test_idempotency_ttl_is_configurable(make_client: MakeClient, fake_clock: FakeClock) -> None:
    with StripeTestServer(clock=fake_clock, idempotency_ttl=60) as short_lived:
        client = make_client(base_url=short_lived.url)
        client.v1.customers.create(params={"name": "a"}, options={"idempotency_key": "c"})
        fake_clock.advance(59)
        client.v1.customers.create(params={"name": "a"}, options={"idempotency_key": "c"})
        assert len(short_lived.customers()) == 1
        fake_clock.advance(2)
        client.v1.customers.create(params={"name": "a"}, options={"idempotency_key": "c"})
        assert len(short_lived.customers()) == 2


# --------------------------------------------------------------------------- fault injection


def test_http_500_is_api_error_without_side_effects(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    server.inject("http_500")
    with pytest.raises(stripe.APIError) as excinfo:
        client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-5"})
    assert excinfo.value.http_status == 500
    assert server.payment_intents() == []
    # Nothing was executed, so nothing was saved under the key: a retry does the work.
    assert client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-5"}).status == "succeeded"
    assert server.requests()[-2].fault == "http_500"


def test_sdk_retries_500_with_same_key(server: StripeTestServer, make_client: MakeClient) -> None:
    client = make_client(max_network_retries=1)
    customer = new_customer(client)
    server.inject("http_500")
    pi = client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_visa"))
    assert pi.status == "succeeded"
    attempts = [r for r in server.requests() if r.path == "/v1/payment_intents"]
    assert [r.status for r in attempts] == [500, 200]
    assert attempts[0].idempotency_key is not None
    assert attempts[0].idempotency_key == attempts[1].idempotency_key


def test_http_429_is_rate_limit_error_and_not_retried(server: StripeTestServer, make_client: MakeClient) -> None:
    client = make_client(max_network_retries=2)
    customer = new_customer(client)
    server.inject("http_429")
    with pytest.raises(stripe.RateLimitError) as excinfo:
        client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_visa"))
    assert excinfo.value.http_status == 429
    assert excinfo.value.error is not None
    assert excinfo.value.error.code == "rate_limit"
    assert [r.status for r in server.requests() if r.path == "/v1/payment_intents"] == [429]
    assert server.payment_intents() == []


def test_slow_response_times_out_but_work_completes(server: StripeTestServer, make_client: MakeClient) -> None:
    client = make_client(timeout=0.2)
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    server.inject("slow", seconds=0.5)
    with pytest.raises(stripe.APIConnectionError) as excinfo:
        client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-6"})
    assert excinfo.value.should_retry is True

    wait_until(lambda: server.idempotency_status("k-6") == "completed")
    [stored] = server.payment_intents()
    replay = client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-6"})
    assert replay.id == stored["id"]
    assert replay.status == "succeeded"
    assert len(server.payment_intents()) == 1


def test_drop_after_commit_charges_but_client_sees_connection_error(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    server.inject("drop_after_commit")
    with pytest.raises(stripe.APIConnectionError):
        client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-7"})

    [stored] = server.payment_intents()
    assert stored["status"] == "succeeded"  # the charge was made although the client saw an error
    assert server.requests()[-1].dropped is True

    replay = client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-7"})
    assert replay.id == stored["id"]
    assert replay.last_response is not None
    assert replay.last_response.headers.get("Idempotent-Replayed") == "true"
    assert len(server.payment_intents()) == 1
    assert len(server.charges()) == 1


def test_sdk_retry_after_drop_replays_instead_of_charging_twice(
    server: StripeTestServer, make_client: MakeClient
) -> None:
    client = make_client(max_network_retries=1)
    customer = new_customer(client)
    server.inject("drop_after_commit")
    pi = client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_visa"))
    assert pi.status == "succeeded"
    attempts = [r for r in server.requests() if r.path == "/v1/payment_intents"]
    assert [(r.dropped, r.replayed) for r in attempts] == [(True, False), (False, True)]
    assert [p["id"] for p in server.payment_intents()] == [pi.id]


def test_fault_matching_and_times(server: StripeTestServer, client: stripe.StripeClient) -> None:
    server.inject("http_500", path_prefix="/v1/customers", method="POST", times=2)
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            new_customer(client)
    assert new_customer(client).id.startswith("cus_")

    server.inject("http_500", path_prefix=None, method=None, times=None)
    with pytest.raises(stripe.APIError):
        client.v1.payment_intents.list()
    server.clear_faults()
    client.v1.payment_intents.list()

    with pytest.raises(ValueError, match="unknown fault"):
        server.inject("explode")  # type: ignore[arg-type]


def test_latency_and_rate_limit(server: StripeTestServer, client: stripe.StripeClient) -> None:
    server.latency = 0.15
    started = time.monotonic()
    client.v1.payment_intents.list()
    assert time.monotonic() - started >= 0.15
    server.latency = 0.0

    server.rate_limit = 2
    client.v1.payment_intents.list()
    client.v1.payment_intents.list()
    with pytest.raises(stripe.RateLimitError):
        client.v1.payment_intents.list()
    server.rate_limit = None
    client.v1.payment_intents.list()


# --------------------------------------------------------------------------- listing & inspection


def test_list_pagination_with_starting_after(
    server: StripeTestServer, client: stripe.StripeClient, fake_clock: FakeClock
) -> None:
    customer, other = new_customer(client), new_customer(client)
    created = []
    for i in range(5):
        fake_clock.advance(1 if i % 2 else 0)  # some share a second: order must still be newest first
        created.append(client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_visa")).id)
    client.v1.payment_intents.create(params=recharge_params(other.id, "pm_card_visa"))
    newest_first = list(reversed(created))

    seen: list[str] = []
    starting_after: str | None = None
    pages = 0
    while True:
        params: Any = {"customer": customer.id, "limit": 2}
        if starting_after:
            params["starting_after"] = starting_after
        page = client.v1.payment_intents.list(params=params)
        pages += 1
        seen.extend(p.id for p in page.data)
        if not page.has_more:
            break
        starting_after = page.data[-1].id
    assert seen == newest_first
    assert pages == 3

    auto = client.v1.payment_intents.list(params={"customer": customer.id, "limit": 2}).auto_paging_iter()
    assert [p.id for p in auto] == newest_first
    before = client.v1.payment_intents.list(params={"customer": customer.id, "ending_before": newest_first[3]})
    assert [p.id for p in before.data] == newest_first[:3]
    assert len(client.v1.payment_intents.list(params={"limit": 100}).data) == 6

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.list(params={"starting_after": "pi_missing"})
    assert excinfo.value.param == "starting_after"


def test_search_by_metadata(client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    wanted = client.v1.payment_intents.create(
        params=recharge_params(customer.id, "pm_card_visa", metadata={"recharge_id": "r-1"})
    )
    client.v1.payment_intents.create(
        params=recharge_params(customer.id, "pm_card_visa", metadata={"recharge_id": "r-2"})
    )
    found = client.v1.payment_intents.search(
        params={"query": f"metadata['recharge_id']:'r-1' AND customer:'{customer.id}'"}
    )
    assert [p.id for p in found.data] == [wanted.id]


def test_recorded_requests_expose_decoded_params(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client, metadata={"account_id": "a-1", "plan": "pro"})
    client.v1.payment_intents.list(params={"customer": customer.id, "limit": 3})
    post, get = server.requests()
    assert (post.method, post.path) == ("POST", "/v1/customers")
    assert post.params == {"email": "ops@example.com", "metadata": {"account_id": "a-1", "plan": "pro"}}
    assert post.idempotency_key  # the SDK sends one on every POST
    assert post.stripe_version == stripe.api_version
    assert (get.method, get.path, get.params, get.idempotency_key) == (
        "GET",
        "/v1/payment_intents",
        {"customer": customer.id, "limit": "3"},
        None,
    )


def test_customer_update_default_payment_method(client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    updated = client.v1.customers.update(
        customer.id, params={"invoice_settings": {"default_payment_method": pm.id}, "metadata": {"k": "v"}}
    )
    assert updated.invoice_settings is not None
    assert updated.invoice_settings.default_payment_method == pm.id
    assert updated.metadata is not None
    assert updated.metadata["k"] == "v"


def test_decode_form_nesting() -> None:
    pairs = parse_qsl(
        "amount=100&metadata[a]=1&metadata[0]=x&expand[0]=latest_charge&expand[1]=customer"
        "&automatic_payment_methods[enabled]=true&items[0][price]=p1&items[1][price]=p2&tags[]=a&tags[]=b"
    )
    assert decode_form(pairs) == {
        "amount": "100",
        "metadata": {"a": "1", "0": "x"},
        "expand": ["latest_charge", "customer"],
        "automatic_payment_methods": {"enabled": "true"},
        "items": [{"price": "p1"}, {"price": "p2"}],
        "tags": ["a", "b"],
    }


def test_server_lifecycle_and_url() -> None:
    server = StripeTestServer()
    with pytest.raises(RuntimeError):
        _ = server.url
    server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.port > 0
    finally:
        server.stop()
    server.stop()  # idempotent


def test_raw_wire_format_matches_stripe(server: StripeTestServer) -> None:
    """Check the bytes the SDK parses: form encoding in, Stripe's JSON error shape and headers out."""
    http = requests.Session()
    http.trust_env = False
    auth = ("sk_test_raw", "")  # Basic auth, as with `curl -u sk_test_...:`
    customer = http.post(f"{server.url}/v1/customers", data={"metadata[account_id]": "a"}, auth=auth).json()
    form = {
        "amount": "5000",
        "currency": "usd",
        "customer": customer["id"],
        "payment_method": "pm_card_chargeDeclinedLostCard",
        "confirm": "true",
        "off_session": "true",
        "allowed_payment_method_types[0]": "card",
    }
    first = http.post(f"{server.url}/v1/payment_intents", data=form, auth=auth, headers={"Idempotency-Key": "raw"})
    assert first.status_code == 402
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Request-Id"].startswith("req_")
    error = first.json()["error"]
    assert set(error) == {
        "advice_code",
        "charge",
        "code",
        "decline_code",
        "doc_url",
        "message",
        "payment_intent",
        "payment_method",
        "request_log_url",
        "type",
    }  # null members are left out, as Stripe does
    assert (error["type"], error["code"], error["decline_code"], error["advice_code"]) == (
        "card_error",
        "card_declined",
        "lost_card",
        "do_not_try_again",
    )
    assert error["payment_intent"]["object"] == "payment_intent"
    assert error["payment_intent"]["last_payment_error"]["decline_code"] == "lost_card"

    replay = http.post(f"{server.url}/v1/payment_intents", data=form, auth=auth, headers={"Idempotency-Key": "raw"})
    assert replay.status_code == 402
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()

    unauthenticated = http.get(f"{server.url}/v1/payment_intents")
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["type"] == "invalid_request_error"
    assert http.get(f"{server.url}/v1/nothing_here", auth=auth).status_code == 404
    http.close()


def test_concurrent_distinct_requests(server: StripeTestServer, make_client: MakeClient) -> None:
    customer = new_customer(make_client())
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            make_client().v1.payment_intents.create(
                params=recharge_params(customer.id, "pm_card_visa", amount=1000 + i),
                options={"idempotency_key": f"recharge-{i}"},
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert errors == []
    assert sorted(p["amount"] for p in server.payment_intents(status="succeeded")) == list(range(1000, 1016))


def test_stop_does_not_wait_for_slow_handlers(make_client: MakeClient, fake_clock: FakeClock) -> None:
    server = StripeTestServer(clock=fake_clock).start()
    client = make_client(base_url=server.url)
    server.inject("slow", path_prefix=None, method=None, seconds=30)
    failures: list[BaseException] = []

    def call() -> None:
        try:
            client.v1.payment_intents.list()
        except stripe.APIConnectionError as exc:
            failures.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: len(server.requests()) == 1)
    started = time.monotonic()
    server.stop()
    caller.join(timeout=5)
    assert time.monotonic() - started < 2
    assert len(failures) == 1


# --------------------------------------------------------------------------- shared helpers (after the charge)


def paid_intent(client: stripe.StripeClient, test_pm: str = "pm_card_visa", amount: int = 2000) -> stripe.PaymentIntent:
    """A succeeded off-session PaymentIntent of a new customer, paid with ``test_pm``."""
    customer = new_customer(client)
    pi = client.v1.payment_intents.create(params=recharge_params(customer.id, test_pm, amount=amount))
    assert pi.status == "succeeded"
    return pi


def event_types(server: StripeTestServer, pattern: str | None = None) -> list[str]:
    return [e["type"] for e in server.events(pattern)]


def raw_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.auth = ("sk_test_raw", "")
    return session


class Receiver:
    """A webhook endpoint: records each POST (body, Stripe-Signature) and answers the queued statuses, then 200."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, str]] = []
        self.statuses: deque[int] = deque()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append((body, self.headers.get("Stripe-Signature", "")))
                status = receiver.statuses.popleft() if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/webhooks"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body, _ in self.received]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# --------------------------------------------------------------------------- refunds


def test_partial_then_full_refund_updates_the_charge(server: StripeTestServer, client: stripe.StripeClient) -> None:
    pi = paid_intent(client)
    first = client.v1.refunds.create(
        params={"payment_intent": pi.id, "amount": 500, "reason": "requested_by_customer", "metadata": {"k": "v"}},
        options={"idempotency_key": "refund-1"},
    )
    assert first.id.startswith("re_")
    assert (first.object, first.status, first.amount, first.currency) == ("refund", "succeeded", 500, "usd")
    assert (first.payment_intent, first.charge, first.reason) == (pi.id, pi.latest_charge, "requested_by_customer")
    assert first.metadata is not None
    assert first.metadata["k"] == "v"
    assert isinstance(first.balance_transaction, str)

    replay = client.v1.refunds.create(
        params={"payment_intent": pi.id, "amount": 500, "reason": "requested_by_customer", "metadata": {"k": "v"}},
        options={"idempotency_key": "refund-1"},
    )
    assert replay.id == first.id
    assert replay.last_response is not None
    assert replay.last_response.headers.get("Idempotent-Replayed") == "true"

    assert isinstance(pi.latest_charge, str)
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (500, False)

    rest = client.v1.refunds.create(params={"charge": pi.latest_charge})  # no amount: what is left
    assert rest.amount == 1500
    expanded = client.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge"]})
    assert isinstance(expanded.latest_charge, stripe.Charge)
    assert (expanded.latest_charge.amount_refunded, expanded.latest_charge.refunded) == (2000, True)
    assert expanded.latest_charge.refunds is not None
    assert [r.id for r in expanded.latest_charge.refunds.data] == [rest.id, first.id]  # newest first

    listed = client.v1.refunds.list(params={"payment_intent": pi.id})
    assert [r.id for r in listed.data] == [rest.id, first.id]
    assert client.v1.refunds.retrieve(first.id).amount == 500
    assert len(server.refunds()) == 2
    assert event_types(server, "refund.*") == ["refund.created", "refund.created"]
    refunded = server.events("charge.refunded")
    assert [e["data"]["object"]["amount_refunded"] for e in refunded] == [500, 2000]


def test_refund_errors_match_stripe(client: stripe.StripeClient) -> None:
    pi = paid_intent(client)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 2500})
    err = excinfo.value
    assert (err.http_status, err.code, err.param) == (400, "amount_too_large", "amount")
    assert err.user_message == "Refund amount ($25.00) is greater than unrefunded amount on charge ($20.00)"

    client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 1500})
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 501})
    assert excinfo.value.user_message == "Refund amount ($5.01) is greater than unrefunded amount on charge ($5.00)"
    client.v1.refunds.create(params={"payment_intent": pi.id})
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.refunds.create(params={"payment_intent": pi.id})
    assert excinfo.value.code == "charge_already_refunded"
    assert excinfo.value.user_message == f"Charge {pi.latest_charge} has already been refunded."

    customer = new_customer(client)
    with pytest.raises(stripe.CardError) as declined:
        client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_chargeDeclined"))
    assert declined.value.error is not None
    assert declined.value.error.payment_intent is not None
    failed_id = declined.value.error.payment_intent.id
    unconfirmed = client.v1.payment_intents.create(params={"amount": 900, "currency": "usd", **CARD_ONLY})
    for params in (
        {"payment_intent": failed_id},
        {"charge": declined.value.error.charge},
        {"payment_intent": unconfirmed.id},
    ):
        with pytest.raises(stripe.InvalidRequestError) as excinfo:
            client.v1.refunds.create(params=params)  # type: ignore[arg-type]
        assert excinfo.value.http_status == 400
        assert "does not have a successful charge to refund" in str(excinfo.value.user_message)

    cases: list[tuple[dict[str, Any], str | None, str | None]] = [
        ({}, None, None),
        ({"payment_intent": "pi_missing"}, "payment_intent", "resource_missing"),
        ({"charge": "ch_missing"}, "charge", "resource_missing"),
        ({"payment_intent": pi.id, "reason": "changed_mind"}, "reason", None),
        ({"payment_intent": pi.id, "amount": 0}, "amount", "parameter_invalid_integer"),
    ]
    for params, param, code in cases:
        with pytest.raises(stripe.InvalidRequestError) as excinfo:
            client.v1.refunds.create(params=params)  # type: ignore[arg-type]
        assert (excinfo.value.param, excinfo.value.code) == (param, code)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.refunds.retrieve("re_missing")
    assert (excinfo.value.http_status, excinfo.value.code) == (404, "resource_missing")


def test_pending_refund_settles_later(server: StripeTestServer, client: stripe.StripeClient) -> None:
    pi = paid_intent(client, "pm_card_pendingRefund")
    refund = client.v1.refunds.create(params={"payment_intent": pi.id, "amount": 700})
    assert refund.status == "pending"
    assert isinstance(pi.latest_charge, str)
    assert client.v1.charges.retrieve(pi.latest_charge).amount_refunded == 700  # a pending refund counts

    settled = server.settle_refund(refund.id)
    assert settled["status"] == "succeeded"
    assert client.v1.refunds.retrieve(refund.id).status == "succeeded"
    updates = server.events("charge.refund.updated") + server.events("refund.updated")
    assert [e["data"]["previous_attributes"]["status"] for e in updates] == ["pending", "pending"]
    assert all(e["request"] == {"id": None, "idempotency_key": None} for e in updates)
    with pytest.raises(ValueError, match="not pending"):
        server.settle_refund(refund.id)


def test_refund_fails_later_and_the_charge_is_no_longer_refunded(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    pi = paid_intent(client, "pm_card_refundFail")
    refund = client.v1.refunds.create(params={"payment_intent": pi.id})
    assert refund.status == "succeeded"  # "its status begins as succeeded. Some time later, ... failed"
    assert isinstance(pi.latest_charge, str)
    assert client.v1.charges.retrieve(pi.latest_charge).refunded is True

    failed = server.fail_refund(refund.id)
    assert (failed["status"], failed["failure_reason"]) == ("failed", "expired_or_canceled_card")
    again = client.v1.refunds.retrieve(refund.id, params={"expand": ["failure_balance_transaction"]})
    assert again.status == "failed"
    assert isinstance(again.failure_balance_transaction, stripe.BalanceTransaction)
    assert again.failure_balance_transaction.amount == 2000
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (0, False)
    assert [t for t in event_types(server) if "refund" in t][-3:] == [
        "charge.refund.updated",
        "refund.updated",
        "refund.failed",
    ]
    assert server.events("refund.failed")[0]["data"]["object"]["status"] == "failed"
    with pytest.raises(ValueError, match="failed"):
        server.fail_refund(refund.id)
    # The money is back: the charge can be refunded again.
    assert client.v1.refunds.create(params={"payment_intent": pi.id}).amount == 2000


# --------------------------------------------------------------------------- disputes


def test_dispute_test_card_is_disputed_and_won(server: StripeTestServer, client: stripe.StripeClient) -> None:
    pi = paid_intent(client, "pm_card_createDispute", amount=2000)
    assert isinstance(pi.latest_charge, str)
    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert charge.disputed is True
    assert charge.payment_method_details is not None
    assert charge.payment_method_details.card is not None
    assert charge.payment_method_details.card.last4 == "0259"

    [listed] = client.v1.disputes.list(params={"payment_intent": pi.id}).data
    dispute = client.v1.disputes.retrieve(listed.id)
    assert dispute.id.startswith("du_")
    assert (dispute.status, dispute.reason, dispute.amount, dispute.charge) == (
        "needs_response",
        "fraudulent",
        2000,
        charge.id,
    )
    [withdrawal] = dispute.balance_transactions
    assert (withdrawal.amount, withdrawal.fee, withdrawal.net, withdrawal.reporting_category) == (
        -2000,
        1500,
        -3500,
        "dispute",
    )
    assert client.v1.balance_transactions.retrieve(withdrawal.id).description == (
        f"Chargeback withdrawal for {charge.id}"
    )
    assert isinstance(charge.balance_transaction, str)
    assert client.v1.balance_transactions.retrieve(charge.balance_transaction).amount == 2000
    assert event_types(server)[-4:] == [
        "charge.succeeded",
        "payment_intent.succeeded",
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
    ]
    created = server.events("charge.dispute.created")[0]
    assert created["request"]["id"] is None  # Stripe opens it on its own
    assert created["data"]["object"]["balance_transactions"] == []

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.refunds.create(params={"payment_intent": pi.id})
    assert excinfo.value.code == "charge_disputed"
    assert excinfo.value.user_message == f"Charge {charge.id} has been charged back; cannot issue a refund."

    won = server.close_dispute(dispute.id, won=True)
    assert won["status"] == "won"
    assert [t["amount"] for t in won["balance_transactions"]] == [-2000, 2000]
    assert [t["net"] for t in won["balance_transactions"]] == [-3500, 3500]
    assert event_types(server, "charge.dispute.*")[-2:] == ["charge.dispute.funds_reinstated", "charge.dispute.closed"]
    closed = server.events("charge.dispute.closed")[0]
    assert closed["data"]["object"]["status"] == "won"
    assert client.v1.disputes.retrieve(dispute.id).status == "won"
    with pytest.raises(ValueError, match="already won"):
        server.close_dispute(dispute.id, won=False)


def test_lost_dispute_only_closes(server: StripeTestServer, client: stripe.StripeClient) -> None:
    pi = paid_intent(client, "pm_card_createDisputeProductNotReceived")
    [dispute] = server.disputes()
    assert (dispute["reason"], dispute["payment_intent"]) == ("product_not_received", pi.id)
    lost = server.close_dispute(dispute["id"], won=False)
    assert (lost["status"], len(lost["balance_transactions"])) == ("lost", 1)
    assert event_types(server, "charge.dispute.*") == [
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.closed",
    ]


@pytest.mark.parametrize(("evidence", "status"), [("winning_evidence", "won"), ("losing_evidence", "lost")])
def test_dispute_evidence_decides_it_as_in_stripe_test_mode(
    server: StripeTestServer, client: stripe.StripeClient, evidence: str, status: str
) -> None:
    paid_intent(client, "pm_card_createDispute")
    [dispute] = server.disputes()
    decided = client.v1.disputes.update(
        dispute["id"], params={"evidence": {"uncategorized_text": evidence}, "submit": True}
    )
    assert decided.status == status
    assert decided.evidence.uncategorized_text == evidence
    assert "charge.dispute.closed" in event_types(server)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.disputes.close(dispute["id"])


def test_closing_a_dispute_accepts_it(server: StripeTestServer, client: stripe.StripeClient) -> None:
    paid_intent(client, "pm_card_createDispute")
    [dispute] = server.disputes()
    assert client.v1.disputes.close(dispute["id"]).status == "lost"
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.disputes.retrieve("du_missing")
    assert excinfo.value.http_status == 404


# --------------------------------------------------------------------------- events


def test_every_step_of_a_payment_records_an_event(
    server: StripeTestServer, client: stripe.StripeClient, fake_clock: FakeClock
) -> None:
    customer = new_customer(client)
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    fake_clock.advance(5)
    pi = client.v1.payment_intents.create(
        params=recharge_params(customer.id, pm.id), options={"idempotency_key": "evt-key"}
    )
    assert event_types(server) == [
        "customer.created",
        "payment_method.attached",
        "payment_intent.created",
        "charge.succeeded",
        "payment_intent.succeeded",
    ]
    succeeded = server.events("payment_intent.succeeded")[0]
    post = server.requests()[-1]
    assert succeeded["id"].startswith("evt_")
    assert (succeeded["object"], succeeded["livemode"], succeeded["pending_webhooks"]) == ("event", False, 0)
    assert succeeded["api_version"] == stripe.api_version
    assert succeeded["created"] == int(fake_clock.now)
    assert succeeded["request"] == {"id": post.request_id, "idempotency_key": "evt-key"}
    assert succeeded["data"]["object"] == server.payment_intents()[0]  # the object as it was then
    assert "previous_attributes" not in succeeded["data"]
    created = server.events("payment_intent.created")[0]
    assert created["data"]["object"]["status"] == "requires_confirmation"  # a snapshot, not the live object

    fetched = client.v1.events.retrieve(succeeded["id"])
    assert isinstance(fetched, stripe.Event)
    assert fetched.type == "payment_intent.succeeded"
    assert fetched.data.object["id"] == pi.id
    newest_first = client.v1.events.list()
    assert [e.type for e in newest_first.data] == list(reversed(event_types(server)))
    only = client.v1.events.list(params={"type": "payment_intent.*"})
    assert [e.type for e in only.data] == ["payment_intent.succeeded", "payment_intent.created"]
    assert [e.type for e in client.v1.events.list(params={"type": "charge.succeeded"}).data] == ["charge.succeeded"]
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.events.retrieve("evt_missing")
    assert excinfo.value.http_status == 404


def test_declines_authentication_cancel_and_updates_record_events(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    customer = new_customer(client)
    with pytest.raises(stripe.CardError):
        client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_chargeDeclinedInsufficientFunds"))
    failed = server.events("payment_intent.payment_failed")[0]["data"]["object"]
    assert failed["last_payment_error"]["decline_code"] == "insufficient_funds"
    assert server.events("charge.failed")[0]["data"]["object"]["failure_code"] == "card_declined"

    params = recharge_params(customer.id, "pm_card_authenticationRequired")
    del params["off_session"]
    client.v1.payment_intents.create(params=params)
    assert event_types(server, "payment_intent.requires_action") == ["payment_intent.requires_action"]

    other = client.v1.payment_intents.create(params={"amount": 900, "currency": "usd", **CARD_ONLY})
    client.v1.payment_intents.cancel(other.id)
    assert server.events("payment_intent.canceled")[0]["data"]["object"]["id"] == other.id

    client.v1.customers.update(customer.id, params={"email": "new@example.com", "metadata": {"plan": "pro"}})
    [updated] = server.events("customer.updated")
    assert updated["data"]["previous_attributes"] == {"email": "ops@example.com", "metadata": {}}
    client.v1.customers.update(customer.id, params={"email": "new@example.com"})  # no change: no event
    assert len(server.events("customer.updated")) == 1


# --------------------------------------------------------------------------- webhooks


def test_webhooks_are_signed_as_stripe_signs_them(
    server: StripeTestServer, client: stripe.StripeClient, receiver: Receiver
) -> None:
    endpoint = server.webhook_endpoint(receiver.url, "whsec_test_secret")
    pi = paid_intent(client)
    assert server.wait_for_webhooks(timeout=5)
    delivered = receiver.events()
    assert [e["type"] for e in delivered] == event_types(server)
    for body, header in receiver.received:
        event = stripe.Webhook.construct_event(body.decode(), header, endpoint.secret)
        assert isinstance(event, stripe.Event)
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(body.decode(), header, "whsec_someone_else")
    assert delivered[-1]["data"]["object"]["id"] == pi.id
    assert delivered[-1]["pending_webhooks"] == 1  # as sent; the server now counts it delivered
    assert server.events()[-1]["pending_webhooks"] == 0
    assert all(d.ok and d.attempt == 1 for d in server.webhook_deliveries())


def test_failed_webhook_deliveries_are_retried_a_bounded_number_of_times(
    server: StripeTestServer, client: stripe.StripeClient, receiver: Receiver
) -> None:
    server.webhook_endpoint(receiver.url, "whsec_x", enabled_events=["customer.created"], retry_delay=0.01)
    receiver.statuses.extend([500, 503])
    customer = new_customer(client)
    assert server.wait_for_webhooks(timeout=5)
    assert [d.status for d in server.webhook_deliveries()] == [500, 503, 200]
    assert [d.attempt for d in server.webhook_deliveries()] == [1, 2, 3]
    assert [json.loads(body)["data"]["object"]["id"] for body, _ in receiver.received] == [customer.id] * 3
    for body, header in receiver.received:  # each attempt is signed when it is sent
        stripe.Webhook.construct_event(body.decode(), header, "whsec_x")

    receiver.received.clear()
    receiver.statuses.extend([500] * 10)
    new_customer(client)
    assert server.wait_for_webhooks(timeout=5)
    assert len(receiver.received) == 4  # the first delivery and three retries, as in Stripe's test mode
    assert server.events("customer.created")[-1]["pending_webhooks"] == 1
    assert event_types(server, "payment_method.*") == []  # other events were not sent to this endpoint


def socket_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_webhook_endpoint_is_given_up(server: StripeTestServer, client: stripe.StripeClient) -> None:
    probe = socket_port()
    server.webhook_endpoint(f"http://127.0.0.1:{probe}/gone", "whsec_x", max_attempts=2, retry_delay=0.01)
    new_customer(client)
    assert server.wait_for_webhooks(timeout=5)
    deliveries = server.webhook_deliveries()
    assert [(d.status, d.attempt) for d in deliveries] == [(None, 1), (None, 2)]
    assert deliveries[0].error


def test_signed_payload_lets_a_test_deliver_events_itself(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    paid_intent(client)
    first, last = server.events()[0], server.events()[-1]
    body, header = server.signed_payload(last["id"], secret="whsec_mine")
    event = stripe.Webhook.construct_event(body.decode(), header, "whsec_mine")
    assert (event.id, event.type) == (last["id"], "payment_intent.succeeded")
    again_body, again_header = server.signed_payload(last, secret="whsec_mine")  # twice: the same body
    assert again_body == body
    stripe.Webhook.construct_event(again_body.decode(), again_header, "whsec_mine")
    old_body, old_header = server.signed_payload(first, secret="whsec_mine", timestamp=int(time.time()) - 3600)
    with pytest.raises(stripe.SignatureVerificationError):  # outside the SDK's 300 s tolerance
        stripe.Webhook.construct_event(old_body.decode(), old_header, "whsec_mine")
    with pytest.raises(ValueError, match="secret"):
        server.signed_payload(first)
    endpoint = server.webhook_endpoint("http://127.0.0.1:9/unused")
    assert endpoint.secret.startswith("whsec_")
    _, header = server.signed_payload(first)
    assert header.startswith("t=")
    assert ",v1=" in header


# --------------------------------------------------------------------------- payment methods and customers


def test_a_detached_payment_method_cannot_be_used_again(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    detached = client.v1.payment_methods.detach(pm.id)
    assert detached.customer is None
    [event] = server.events("payment_method.detached")
    assert event["data"]["object"]["customer"] is None
    assert "previous_attributes" not in event["data"]  # Stripe sends them with *.updated events only

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.create(params=recharge_params(customer.id, pm.id))
    assert excinfo.value.http_status == 400
    assert str(excinfo.value.user_message).startswith(
        "The provided PaymentMethod was previously used with a PaymentIntent without Customer attachment"
    )
    assert "It may not be used again." in str(excinfo.value.user_message)
    pending = client.v1.payment_intents.create(params={"amount": 900, "currency": "usd", **CARD_ONLY})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.confirm(pending.id, params={"payment_method": pm.id})
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_methods.attach(pm.id, params={"customer": customer.id})
    assert excinfo.value.user_message == (
        "This PaymentMethod was previously used without being attached to a Customer or was detached from a "
        "Customer, and may not be used again."
    )
    assert server.payment_intents(status="succeeded") == []


def test_deleting_a_customer(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    deleted = client.v1.customers.delete(customer.id)
    assert (deleted.id, deleted.deleted) == (customer.id, True)
    assert server.events("customer.deleted")[0]["data"]["object"]["email"] == "ops@example.com"
    assert client.v1.customers.retrieve(customer.id).deleted is True  # a deleted customer can still be read
    assert server.customers() == []

    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_visa"))
    assert (excinfo.value.code, excinfo.value.param) == ("resource_missing", "customer")
    assert excinfo.value.user_message == f"No such customer: '{customer.id}'"
    other = new_customer(client)
    with pytest.raises(stripe.InvalidRequestError):  # its payment methods are unusable
        client.v1.payment_intents.create(params=recharge_params(other.id, pm.id))
    for call in (
        lambda: client.v1.customers.delete(customer.id),
        lambda: client.v1.customers.update(customer.id, params={"name": "x"}),
        lambda: client.v1.customers.payment_methods.list(customer.id),
    ):
        with pytest.raises(stripe.InvalidRequestError) as excinfo:
            call()
        assert (excinfo.value.http_status, excinfo.value.code) == (404, "resource_missing")


def test_card_updates_automatic_and_by_the_api(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    assert pm.card is not None
    old_year = pm.card.exp_year

    updated = server.update_card(pm.id, exp_month=3, exp_year=old_year + 4, last4="1881")
    assert (updated["card"]["exp_month"], updated["card"]["last4"]) == (3, "1881")
    [auto] = server.events("payment_method.automatically_updated")
    assert auto["data"]["previous_attributes"]["card"]["exp_year"] == old_year
    assert auto["data"]["object"]["card"]["exp_year"] == old_year + 4
    assert auto["request"]["id"] is None
    after = client.v1.payment_intents.create(params=recharge_params(customer.id, pm.id))
    charge = client.v1.charges.retrieve(str(after.latest_charge))
    assert charge.payment_method_details is not None
    assert charge.payment_method_details.card is not None
    assert charge.payment_method_details.card.last4 == "1881"

    changed = client.v1.payment_methods.update(
        pm.id, params={"card": {"exp_month": 7}, "billing_details": {"name": "Ada"}, "metadata": {"k": "v"}}
    )
    assert changed.card is not None
    assert (changed.card.exp_month, changed.billing_details.name) == (7, "Ada")
    [plain] = server.events("payment_method.updated")
    assert set(plain["data"]["previous_attributes"]) == {"billing_details", "card", "metadata"}
    with pytest.raises(stripe.CardError) as excinfo:
        client.v1.payment_methods.update(pm.id, params={"card": {"exp_month": 13}})
    assert excinfo.value.code == "invalid_expiry_month"

    loose = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    client.v1.payment_methods.detach(loose.id)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_methods.update(loose.id, params={"metadata": {"k": "v"}})
    assert excinfo.value.user_message == "You must save this PaymentMethod to a customer before you can update it."
    with pytest.raises(KeyError):
        server.update_card("pm_missing", exp_month=1)


# --------------------------------------------------------------------------- asynchronous payments


def test_processing_payment_succeeds_later(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    pi = client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_asyncProcessing"))
    assert pi.status == "processing"
    assert pi.amount_received == 0
    assert client.v1.charges.retrieve(str(pi.latest_charge)).status == "pending"
    assert event_types(server)[-2:] == ["charge.pending", "payment_intent.processing"]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create(params={"payment_intent": pi.id})

    settled = server.settle_processing(pi.id, succeed=True)
    assert (settled["status"], settled["amount_received"]) == ("succeeded", 2000)
    charge = client.v1.charges.retrieve(str(pi.latest_charge))
    assert (charge.id, charge.status, charge.paid, charge.captured) == (pi.latest_charge, "succeeded", True, True)
    assert event_types(server)[-2:] == ["charge.succeeded", "payment_intent.succeeded"]
    assert server.events()[-1]["request"]["id"] is None
    with pytest.raises(ValueError, match="not processing"):
        server.settle_processing(pi.id)


def test_processing_payment_fails_later(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    pi = client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_asyncProcessing"))
    failed = server.settle_processing(pi.id, succeed=False, decline_code="insufficient_funds")
    assert (failed["status"], failed["payment_method"]) == ("requires_payment_method", None)
    assert failed["last_payment_error"]["decline_code"] == "insufficient_funds"
    retrieved = client.v1.payment_intents.retrieve(pi.id)
    assert retrieved.last_payment_error is not None
    assert retrieved.last_payment_error.code == "card_declined"
    assert client.v1.charges.retrieve(str(pi.latest_charge)).status == "failed"
    assert event_types(server)[-2:] == ["charge.failed", "payment_intent.payment_failed"]
    # It can be confirmed again with another card.
    assert client.v1.payment_intents.confirm(pi.id, params={"payment_method": "pm_card_visa"}).status == "succeeded"


def test_a_payment_declined_off_session_for_authentication_is_confirmed_on_session_and_authenticated(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    customer = new_customer(client)
    with pytest.raises(stripe.CardError) as declined:
        client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_authenticationRequired"))
    pi_id = declined.value.error.payment_intent.id
    pm_id = declined.value.error.payment_intent.last_payment_error.payment_method.id
    assert client.v1.payment_intents.retrieve(pi_id).status == "requires_payment_method"
    with pytest.raises(ValueError, match="not requires_action"):
        server.authenticate(pi_id)
    # Stripe.js confirmCardPayment(client_secret, {payment_method}): on-session, the bank asks for a challenge
    waiting = client.v1.payment_intents.confirm(pi_id, params={"payment_method": pm_id})
    assert (waiting.status, waiting.next_action.type) == ("requires_action", "use_stripe_sdk")
    passed = server.authenticate(pi_id)
    assert (passed["status"], passed["amount_received"], passed["next_action"]) == ("succeeded", 2000, None)
    assert client.v1.charges.retrieve(str(passed["latest_charge"])).status == "succeeded"
    assert event_types(server)[-2:] == ["charge.succeeded", "payment_intent.succeeded"]


def test_a_failed_authentication_leaves_the_payment_waiting_for_another_method(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_authenticationRequired")
    del params["off_session"]
    pi = client.v1.payment_intents.create(params=params)
    assert pi.status == "requires_action"
    failed = server.authenticate(pi.id, succeed=False)
    assert (failed["status"], failed["payment_method"]) == ("requires_payment_method", None)
    assert failed["last_payment_error"]["code"] == "payment_intent_authentication_failure"
    assert client.v1.payment_intents.retrieve(pi.id).latest_charge is None  # no charge was made
    assert event_types(server)[-1] == "payment_intent.payment_failed"


# --------------------------------------------------------------------------- idempotency of errors, headers, limits


def test_stored_500_is_replayed_for_the_key_until_it_expires(
    server: StripeTestServer, make_client: MakeClient, fake_clock: FakeClock
) -> None:
    client = make_client(max_network_retries=2)
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    server.inject("http_500_stored")
    for _ in range(2):
        with pytest.raises(stripe.APIError) as excinfo:
            client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-500"})
        assert excinfo.value.http_status == 500
        assert excinfo.value.headers is not None
        assert excinfo.value.headers["Stripe-Should-Retry"] == "false"  # the SDK does not retry it
    posts = [r for r in server.requests() if r.path == "/v1/payment_intents"]
    assert [(r.status, r.replayed) for r in posts] == [(500, False), (500, True)]
    assert server.idempotency_status("k-500") == "completed"
    assert server.payment_intents() == []  # it failed before doing anything

    fake_clock.advance(24 * 3600 + 1)  # the key expired: the same request is executed afresh
    assert client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-500"}).status == "succeeded"


def test_500_after_commit_is_indeterminate_but_events_tell(
    server: StripeTestServer, client: stripe.StripeClient
) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_visa")
    server.inject("http_500_after_commit")
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            client.v1.payment_intents.create(params=params, options={"idempotency_key": "k-indeterminate"})
    [stored] = server.payment_intents()
    assert stored["status"] == "succeeded"  # the charge went through although both answers were 500s
    assert server.events("payment_intent.succeeded")[0]["data"]["object"]["id"] == stored["id"]


def test_retry_headers(server: StripeTestServer) -> None:
    http = raw_session()
    customer = http.post(f"{server.url}/v1/customers", data={"name": "a"}).json()
    form = {
        "amount": "900",
        "currency": "usd",
        "customer": customer["id"],
        "payment_method": "pm_card_chargeDeclined",
        "confirm": "true",
        "allowed_payment_method_types[0]": "card",
    }
    server.inject("http_500")
    unsaved = http.post(f"{server.url}/v1/payment_intents", data=form, headers={"Idempotency-Key": "h-1"})
    assert (unsaved.status_code, unsaved.headers["Stripe-Should-Retry"]) == (500, "true")
    declined = http.post(f"{server.url}/v1/payment_intents", data=form, headers={"Idempotency-Key": "h-1"})
    assert declined.status_code == 402
    assert "Stripe-Should-Retry" not in declined.headers
    replayed = http.post(f"{server.url}/v1/payment_intents", data=form, headers={"Idempotency-Key": "h-1"})
    assert (replayed.status_code, replayed.headers["Stripe-Should-Retry"]) == (402, "false")

    server.inject("slow", seconds=0.5)
    first = threading.Thread(
        target=lambda: http.post(f"{server.url}/v1/payment_intents", data=form, headers={"Idempotency-Key": "h-2"})
    )
    first.start()
    wait_until(lambda: server.idempotency_status("h-2") == "in_progress")
    conflict = raw_session().post(f"{server.url}/v1/payment_intents", data=form, headers={"Idempotency-Key": "h-2"})
    assert (conflict.status_code, conflict.headers["Stripe-Should-Retry"]) == (409, "true")
    first.join(timeout=5)

    server.inject("http_429")
    limited = http.post(f"{server.url}/v1/payment_intents", data=form)
    assert limited.status_code == 429
    assert "Stripe-Should-Retry" not in limited.headers  # a real rate limit: the SDKs do not retry it
    http.close()


def test_validation_errors_are_not_saved_under_the_key(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    too_long = "a" * 996 + "wxyz!"
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.payment_intents.create(
            params=recharge_params(customer.id, "pm_card_visa", description=too_long),
            options={"idempotency_key": "k-desc"},
        )
    err = excinfo.value
    assert (err.http_status, err.param) == (400, "description")
    assert err.user_message == "Invalid string: aaaa...xyz!; must be at most 1000 characters"
    assert server.idempotency_status("k-desc") is None
    # Nothing was saved: the same key now carries the corrected request.
    ok = client.v1.payment_intents.create(
        params=recharge_params(customer.id, "pm_card_visa", description="d" * 1000),
        options={"idempotency_key": "k-desc"},
    )
    assert ok.description == "d" * 1000


def test_date_header_comes_from_the_server_clock(
    server: StripeTestServer, client: stripe.StripeClient, fake_clock: FakeClock
) -> None:
    customer = new_customer(client)
    assert customer.last_response is not None
    assert customer.last_response.headers["Date"] == email.utils.formatdate(fake_clock.now, usegmt=True)
    fake_clock.advance(3600)
    with pytest.raises(stripe.InvalidRequestError) as excinfo:
        client.v1.customers.retrieve("cus_missing")
    assert excinfo.value.headers is not None
    assert excinfo.value.headers["Date"] == "Sun, 15 Jun 2025 16:06:40 GMT"


def test_rate_limit_counts_reads_and_writes_apart(server: StripeTestServer, client: stripe.StripeClient) -> None:
    assert SANDBOX_RATE_LIMIT == 25
    server.rate_limit = 2
    client.v1.payment_intents.list()
    client.v1.payment_intents.list()
    new_customer(client)  # writes have their own budget
    new_customer(client)
    with pytest.raises(stripe.RateLimitError):
        client.v1.payment_intents.list()
    with pytest.raises(stripe.RateLimitError):
        new_customer(client)
    server.rate_limit = None
    with StripeTestServer(rate_limit=SANDBOX_RATE_LIMIT) as sandbox:
        assert sandbox.rate_limit == 25


@pytest.mark.parametrize(
    ("currency", "refused", "accepted"), [("isk", 550, 500), ("ugx", 1050, 1000), ("kwd", 5125, 5130)]
)
def test_amounts_off_the_currency_step_are_refused_as_stripe_documents(
    client: stripe.StripeClient, currency: str, refused: int, accepted: int
) -> None:
    """ISK and UGX are sent as two-decimal amounts whose decimals are always 00; three-decimal currencies need the
    last digit 0 (docs.stripe.com/currencies, "Special cases" and three-decimal currencies)."""
    customer = new_customer(client)
    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    params = {"currency": currency, "customer": customer.id, "payment_method": pm.id, "confirm": True}
    with pytest.raises(stripe.InvalidRequestError, match="must be a multiple of"):
        client.v1.payment_intents.create(params={**params, "amount": refused})
    ok = client.v1.payment_intents.create(
        params={**params, "amount": accepted, "allowed_payment_method_types": ["card"], "off_session": True}
    )
    assert ok.status == "succeeded"
