"""Drive recharged.testing.stripe_server through the real ``stripe`` SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests
import stripe

from recharged.testing.stripe_server import StripeTestServer, decode_form

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
    assert customer.metadata is not None and customer.metadata["account_id"] == "acct-42"
    assert customer.livemode is False
    assert customer.created == int(fake_clock.now)

    pm = client.v1.payment_methods.attach("pm_card_visa", params={"customer": customer.id})
    assert pm.id.startswith("pm_") and pm.id != "pm_card_visa"
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
    assert isinstance(pi.latest_charge, str) and pi.latest_charge.startswith("ch_")
    assert pi.metadata is not None and pi.metadata["account_id"] == "acct-42"
    assert pi.client_secret is not None and pi.client_secret.startswith(pi.id + "_secret_")
    assert pi.last_response is not None
    assert pi.last_response.request_id is not None and pi.last_response.request_id.startswith("req_")

    charge = client.v1.charges.retrieve(pi.latest_charge)
    assert (charge.status, charge.paid, charge.amount_captured, charge.payment_intent) == (
        "succeeded",
        True,
        2000,
        pi.id,
    )
    assert charge.payment_method_details is not None and charge.payment_method_details.card is not None
    assert charge.payment_method_details.card.last4 == "4242"

    expanded = client.v1.payment_intents.retrieve(pi.id, params={"expand": ["latest_charge", "customer"]})
    assert isinstance(expanded.latest_charge, stripe.Charge)
    assert isinstance(expanded.customer, stripe.Customer) and expanded.customer.id == customer.id

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
    assert isinstance(pi.payment_method, str) and pi.payment_method.startswith("pm_")
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
    assert err.error.doc_url is not None and err.error.request_log_url is not None
    assert err.error.charge is not None and err.error.charge.startswith("ch_")
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
    assert pi.automatic_payment_methods is not None and pi.automatic_payment_methods.allow_redirects == "never"
    assert pi.payment_method_types == ["card"]

    # Older API versions (before 2026-09-30) still accept payment_method_types.
    legacy = recharge_params(customer.id, "pm_card_visa", payment_method_types=["card"])
    del legacy["allowed_payment_method_types"]
    old = client.v1.payment_intents.create(params=legacy, options={"stripe_version": "2025-10-29.clover"})
    assert old.status == "succeeded" and old.automatic_payment_methods is None


def test_authentication_required_on_session_requires_action(client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_authenticationRequired")
    del params["off_session"]
    pi = client.v1.payment_intents.create(params=params)
    assert pi.status == "requires_action"
    assert pi.next_action is not None and pi.next_action.type == "use_stripe_sdk"


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
    assert err.error is not None and err.error.type == "invalid_request_error"
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
    assert second.last_response is not None and first.last_response is not None
    assert second.last_response.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.last_response.headers
    assert len(server.payment_intents()) == 1 and len(server.charges()) == 1
    last = server.requests()[-1]
    assert (last.idempotency_key, last.replayed, last.status) == ("k-1", True, 200)


def test_declined_response_is_replayed_too(server: StripeTestServer, client: stripe.StripeClient) -> None:
    customer = new_customer(client)
    params = recharge_params(customer.id, "pm_card_chargeDeclinedInsufficientFunds")
    ids = []
    for _ in range(2):
        with pytest.raises(stripe.CardError) as excinfo:
            client.v1.payment_intents.create(params=params, options={"idempotency_key": "decl"})
        assert excinfo.value.error is not None and excinfo.value.error.payment_intent is not None
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
    assert excinfo.value.error is not None and excinfo.value.error.type == "idempotency_error"

    worker.join(timeout=5)
    assert len(results) == 1 and results[0].status == "succeeded"
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
    assert attempts[0].idempotency_key is not None and attempts[0].idempotency_key == attempts[1].idempotency_key


def test_http_429_is_rate_limit_error_and_not_retried(server: StripeTestServer, make_client: MakeClient) -> None:
    client = make_client(max_network_retries=2)
    customer = new_customer(client)
    server.inject("http_429")
    with pytest.raises(stripe.RateLimitError) as excinfo:
        client.v1.payment_intents.create(params=recharge_params(customer.id, "pm_card_visa"))
    assert excinfo.value.http_status == 429
    assert excinfo.value.error is not None and excinfo.value.error.code == "rate_limit"
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
    assert replay.id == stored["id"] and replay.status == "succeeded"
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
    assert replay.last_response is not None and replay.last_response.headers.get("Idempotent-Replayed") == "true"
    assert len(server.payment_intents()) == 1 and len(server.charges()) == 1


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
    assert updated.metadata is not None and updated.metadata["k"] == "v"


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
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0
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
    assert replay.status_code == 402 and replay.headers["Idempotent-Replayed"] == "true"
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
