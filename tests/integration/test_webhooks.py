"""POST /v1/webhooks/stripe through FastAPI's TestClient, on SQLite and PostgreSQL, with the real Stripe SDK
against the local Stripe-compatible server.

A signed event is stored in the inbox and answered `stored` at once; the daemon handles it off the request path
(`Api.settle_events` waits for that), and the event's row says what became of it. The answers and metrics below
were the outcome of the handling itself before the inbox existed: those are now read from the event's row and
from `recharged_events_total`.

Events are signed the way Stripe signs them: `Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" with the endpoint secret>`. Stripe's SDK checks the timestamp against the system clock, not the
daemon's, so the signing times here are real ones. A recharge "left half-way by a crash" is made by dropping the
connection after the server charged the card: the flow records nothing and the recharge stays in `charging`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from recharged.daemon.webhooks import PAYMENT_INTENT_EVENTS
from recharged.recharge import RechargeService
from recharged.store.models import Account, Entry, ProcessorEvent, Recharge
from tests.helpers import WEBHOOK_SECRET, Api, busy_account, card_on_file

# --- helpers ---------------------------------------------------------------------------------------------------


def signature(body: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    timestamp = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def stripe_event(event_id: str, intent: dict[str, Any], kind: str = "payment_intent.succeeded") -> dict[str, Any]:
    """A Stripe event about a PaymentIntent, carrying the object as the event says it was."""
    return {"id": event_id, "object": "event", "type": kind, "created": int(time.time()), "data": {"object": intent}}


def deliver(api: Api, event: dict[str, Any] | bytes, **signing: Any):
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    headers = {"Content-Type": "application/json", "Stripe-Signature": signature(body, **signing)}
    return api.client.post("/v1/webhooks/stripe", content=body, headers=headers)


def credits(api: Api, account: str = "acme") -> list[tuple[str, int]]:
    with api.db.transaction() as s:
        query = select(Entry.external_id, Entry.amount).where(
            Entry.account_id == account, Entry.entry_type == "recharge"
        )
        return list(s.execute(query).all())


def balance(api: Api, account: str = "acme") -> int:
    with api.db.transaction() as s:
        return s.get(Account, account).balance


def events_recorded(api: Api) -> int:
    with api.db.transaction() as s:
        return s.scalar(select(func.count()).select_from(ProcessorEvent))


def phase(api: Api, recharge_id: int) -> str:
    with api.db.transaction() as s:
        return s.get(Recharge, recharge_id).phase


def half_done(api: Api, stripe_client, gateway_factory, card: str = "pm_card_visa") -> tuple[int, dict[str, Any]]:
    """An account below its threshold whose recharge was charged at the processor, but the answer never came
    back: the recharge is left in `charging`. Returns its id and the PaymentIntent as the server holds it."""
    server = stripe_client.local()
    customer = busy_account(api.db, api.settings, api.clock, stripe_client, card)
    crashed = RechargeService(api.db, api.settings, lambda: gateway_factory(max_retries=0), api.clock)
    server.inject("drop_after_commit")
    [report] = crashed.run_cycle().charged
    assert report.phase == "charging"
    [intent] = server.payment_intents(customer=customer)
    assert intent["metadata"]["recharged_recharge"] == str(report.recharge_id)
    return report.recharge_id, intent


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


NET = 8_400_000  # what busy_account's recharge credits: 14 days x $6.00, net of VAT
BEFORE = 100_000  # busy_account's balance: $1.00


# --- signatures ------------------------------------------------------------------------------------------------


def test_a_validly_signed_event_of_another_type_is_acknowledged_and_ignored(api: Api):
    response = deliver(api, {"id": "evt_1", "object": "event", "type": "customer.created", "data": {"object": {}}})
    assert response.status_code == 200
    assert response.json() == {"received": True, "event": "evt_1", "outcome": "ignored"}
    again = deliver(api, {"id": "evt_1", "object": "event", "type": "customer.created", "data": {"object": {}}})
    assert again.json()["outcome"] == "duplicate"
    assert api.metric("recharged_webhooks_total", outcome="ignored") == 1
    assert api.metric("recharged_webhooks_total", outcome="duplicate") == 1


def test_a_payment_intent_event_without_an_object_id_is_ignored(api: Api):
    response = deliver(api, {"id": "evt_2", "object": "event", "type": "payment_intent.succeeded", "data": {}})
    assert (response.status_code, response.json()["outcome"]) == (200, "ignored")


def test_badly_signed_requests_are_400_and_leave_no_trace(api: Api):
    body = json.dumps({"id": "evt_1", "object": "event", "type": "customer.created", "data": {"object": {}}}).encode()
    now = int(time.time())
    attempts = {
        "wrong secret": signature(body, secret="whsec_someone_else"),
        "another body": signature(body.replace(b"evt_1", b"evt_2")),
        "too old": signature(body, at=now - 301),
        "no v1": f"t={now}",
        "no timestamp": signature(body).split(",", 1)[1],
        "v0 only": signature(body).replace("v1=", "v0="),
        "garbage": "hello",
    }
    for what, header in attempts.items():
        response = api.client.post(
            "/v1/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": header, "Content-Type": "application/json"},
        )
        assert response.status_code == 400, what
        assert response.json()["error"]["status"] == 400, what
    missing = api.client.post("/v1/webhooks/stripe", content=body, headers={"Content-Type": "application/json"})
    assert missing.status_code == 400
    assert "Stripe-Signature" in missing.json()["error"]["message"]
    assert events_recorded(api) == 0
    assert api.metric("recharged_webhooks_total", outcome="bad_signature") == len(attempts) + 1


def test_a_signature_within_the_tolerance_is_accepted(api: Api):
    event = {"id": "evt_recent", "object": "event", "type": "customer.created", "data": {"object": {}}}
    assert deliver(api, event, at=int(time.time()) - 240).status_code == 200


def test_signed_bodies_that_are_not_events_are_400(api: Api):
    for what, body in {
        "not JSON": b"{not json",
        "an array": b"[]",
        "no id": b'{"type": "customer.created"}',
        "no type": b'{"id": "evt_1"}',
        "id not a string": b'{"id": 1, "type": "customer.created"}',
        "not UTF-8": b'{"id": "evt_\xff", "type": "x"}',
        "lone surrogate": b'{"id": "evt_\\ud800", "type": "customer.created"}',
        "id too long": json.dumps({"id": "evt_" + "x" * 300, "type": "customer.created"}).encode(),
        "id with a NUL": b'{"id": "evt_\\u0000", "type": "customer.created"}',
        "empty id": b'{"id": "", "type": "customer.created"}',
        "type with a NUL": b'{"id": "evt_1", "type": "customer.\\u0000"}',
        "type too long": json.dumps({"id": "evt_1", "type": "x" * 81}).encode(),
        "deep nesting": b"[" * 20_000 + b"]" * 20_000,
        "huge integer": b'{"id": "evt_1", "type": "x", "n": ' + b"1" * 5000 + b"}",
    }.items():
        response = deliver(api, body)
        assert response.status_code == 400, what
    assert events_recorded(api) == 0


def test_without_a_webhook_secret_webhooks_answer_503(make_api):
    api = make_api(webhook_secret=None)
    response = deliver(api, {"id": "evt_1", "type": "customer.created", "data": {"object": {}}})
    assert response.status_code == 503
    assert "RECHARGED_STRIPE_WEBHOOK_SECRET" in response.json()["error"]["message"]


def test_a_body_over_the_limit_is_413(api: Api):
    padding = "x" * (api.settings.http.max_body_bytes + 1)
    response = deliver(api, {"id": "evt_1", "type": "customer.created", "data": {"object": {"p": padding}}})
    assert response.status_code == 413
    assert events_recorded(api) == 0


# --- recovery through webhooks -------------------------------------------------------------------------------


def test_an_event_finishes_a_recharge_left_charging_and_a_redelivery_changes_nothing(
    api: Api, stripe_client, gateway_factory
):
    recharge_id, intent = half_done(api, stripe_client, gateway_factory)
    assert (balance(api), credits(api)) == (BEFORE, [])

    first = deliver(api, stripe_event("evt_paid", intent))
    assert first.status_code == 200
    assert first.json() == {"received": True, "event": "evt_paid", "outcome": "stored"}  # was: "finished"
    api.settle_events()
    assert api.event_row("evt_paid").outcome == f"recharge {recharge_id} finished (payment succeeded)"
    assert phase(api, recharge_id) == "finished"
    assert credits(api) == [(intent["id"], NET)]
    assert balance(api) == BEFORE + NET

    again = deliver(api, stripe_event("evt_paid", intent))
    assert again.json()["outcome"] == "duplicate"
    late = deliver(api, stripe_event("evt_processing", intent, "payment_intent.processing"))  # out of order
    assert late.json()["outcome"] == "stored"  # was: "finished"
    api.settle_events()
    assert api.event_row("evt_processing").outcome == f"recharge {recharge_id} finished (payment succeeded)"
    assert api.daemon.runtime().recharges.recover() == []  # the completer finds nothing left to do
    assert credits(api) == [(intent["id"], NET)]
    assert balance(api) == BEFORE + NET
    assert len(stripe_client.intents(status="succeeded")) == 1
    assert api.metric("recharged_events_total", outcome="handled") == 2  # was: recharged_webhooks_total "handled"
    assert api.metric("recharged_webhooks_total", outcome="stored") == 2
    assert api.metric("recharged_webhooks_total", outcome="duplicate") == 1
    assert api.metric("recharged_credited_amount_total", currency="USD", kind="auto") == 84.0
    assert api.metric("recharged_charges_total", outcome="succeeded") == 1


def test_an_event_after_the_completer_finished_the_recharge_credits_nothing_more(
    api: Api, stripe_client, gateway_factory
):
    _, intent = half_done(api, stripe_client, gateway_factory)
    [recovered] = api.daemon.runtime().recharges.recover()
    assert recovered.phase == "finished"
    response = deliver(api, stripe_event("evt_paid", intent))
    assert (response.status_code, response.json()["outcome"]) == (200, "stored")  # was: "finished"
    api.settle_events()
    assert api.event_row("evt_paid").outcome.endswith("finished (payment succeeded)")
    assert credits(api) == [(intent["id"], NET)]
    assert balance(api) == BEFORE + NET


def test_the_webhook_and_the_completer_at_the_same_time_credit_once(api: Api, stripe_client, gateway_factory):
    recharge_id, intent = half_done(api, stripe_client, gateway_factory)
    completer = RechargeService(api.db, api.settings, gateway_factory, api.clock)  # another worker's service
    start = threading.Barrier(2)
    recovered: list = []

    def complete() -> None:
        start.wait()
        recovered.extend(completer.recover())

    thread = threading.Thread(target=complete)
    thread.start()
    start.wait()
    response = deliver(api, stripe_event("evt_paid", intent))
    assert response.status_code == 200
    api.settle_events()
    thread.join()
    # Whichever got the recharge's lease finished it; the other saw it somewhere on the way.
    outcome = api.event_row("evt_paid").outcome  # was: the answer's outcome
    assert outcome.split()[2] in ("claimed", "charging", "paid", "credited", "finished"), outcome
    assert phase(api, recharge_id) == "finished"
    assert credits(api) == [(intent["id"], NET)]
    assert balance(api) == BEFORE + NET


def test_an_event_that_says_succeeded_for_a_declined_payment_credits_nothing(api: Api, stripe_client, gateway_factory):
    recharge_id, intent = half_done(api, stripe_client, gateway_factory, card="pm_card_chargeDeclined")
    assert intent["status"] != "succeeded"  # the card was declined at the server
    lie = {**intent, "status": "succeeded", "amount_received": intent["amount"]}
    response = deliver(api, stripe_event("evt_lie", lie))
    assert response.status_code == 200
    api.settle_events()
    # re-fetched: declined, and no other card to try (was: the answer's outcome "failed")
    assert api.event_row("evt_lie").outcome.startswith(f"recharge {recharge_id} failed")
    assert phase(api, recharge_id) == "failed"
    assert credits(api) == []
    assert balance(api) == BEFORE
    assert stripe_client.intents(status="succeeded") == []


def test_events_about_payments_that_are_not_ours_are_acknowledged_as_not_ours(api: Api, stripe_client, gateway_factory):
    stripe_client.local()
    card = card_on_file(stripe_client)
    theirs = stripe_client.client.v1.payment_intents.create(
        params={
            "amount": 500,
            "currency": "usd",
            "customer": card.customer,
            "payment_method": card.payment_method,
            "confirm": True,
            "off_session": True,
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
        }
    )
    response = deliver(api, stripe_event("evt_theirs", theirs.to_dict()))
    assert response.status_code == 200
    assert response.json() == {"received": True, "event": "evt_theirs", "outcome": "stored"}  # was: "not_ours"
    api.settle_events()
    assert api.event_row("evt_theirs").outcome == f"payment {theirs.id} is not one of our recharges"
    assert deliver(api, stripe_event("evt_theirs", theirs.to_dict())).json()["outcome"] == "duplicate"
    assert api.metric("recharged_events_total", outcome="not_ours") == 1  # was: recharged_webhooks_total


def test_odd_but_signed_payment_intent_events_are_never_a_500(api: Api, stripe_client, gateway_factory):
    recharge_id, intent = half_done(api, stripe_client, gateway_factory)
    odd = {
        "unknown payment": {"id": "pi_does_not_exist", "object": "payment_intent"},
        "data a list": [intent],
        "object a string": intent["id"],
        "id a number": {**intent, "id": 12},
        "id too long": {**intent, "id": "pi_" + "x" * 100},
        "id with a NUL": {**intent, "id": intent["id"] + "\u0000"},
        "hint not a number": {"id": "pi_x", "metadata": {"recharged_recharge": "²"}},
        "hint too big": {"id": "pi_y", "metadata": {"recharged_recharge": "9" * 30}},
        "hint a list": {"id": "pi_z", "metadata": {"recharged_recharge": [recharge_id]}},
        "metadata a string": {"id": "pi_w", "metadata": "recharged"},
    }
    for n, (what, obj) in enumerate(odd.items()):
        event = stripe_event(f"evt_odd_{n}", {})
        event["data"] = obj if what == "data a list" else {"object": obj}
        response = deliver(api, event)
        assert response.status_code == 200, what
        assert response.json()["outcome"] in ("ignored", "stored"), what  # was: ("ignored", "not_ours")
    api.settle_events()
    with api.db.reading() as s:
        rows = list(s.scalars(select(ProcessorEvent)))
    assert len(rows) == len(odd)
    assert all(r.status == "ignored" or r.outcome.startswith(("payment ", "pi_")) for r in rows), rows
    assert api.metric("recharged_events_total", outcome="failed") == 0
    assert credits(api) == []
    assert phase(api, recharge_id) == "charging"  # none of them was about this recharge


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
intents = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.sampled_from(["pi_1", "pi_" + "x" * 70, "", "pi_\x00", "pi_é"]), json_values),
        "status": st.sampled_from(["succeeded", "requires_payment_method"]),
        "metadata": st.one_of(st.fixed_dictionaries({"recharged_recharge": json_values | st.just("1")}), json_values),
    },
)
events = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "id": st.sampled_from(["evt_1", "evt_\x00", "evt_é", " "]) | st.text(min_size=1, max_size=40) | json_values,
            "type": st.sampled_from(sorted(PAYMENT_INTENT_EVENTS)),
        },
        optional={"data": st.one_of(st.fixed_dictionaries({"object": intents | json_values}), json_values)},
    ),
)


@hypothesis_settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(event=events)
def test_fuzzed_signed_events_are_never_a_500_and_credit_nothing(api: Api, event):
    response = deliver(api, json.dumps(event).encode())
    assert response.status_code in (200, 400), response.text
    with api.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Entry)) == 0


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN"])
def test_a_signed_event_with_a_non_json_number_is_a_400_not_a_500(api: Api, constant):
    """Found by the fuzzed test above on PostgreSQL: Python's json reads Infinity and NaN, PostgreSQL's JSON type
    refuses them, and storing the event was a 500."""
    body = f'{{"id": "evt_inf", "type": "payment_intent.canceled", "data": {{"object": {{"amount": {constant}}}}}}}'
    response = deliver(api, body.encode())
    assert response.status_code == 400, response.text
    assert f"{constant} is not a JSON number" in response.text
    with api.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(ProcessorEvent)) == 0
