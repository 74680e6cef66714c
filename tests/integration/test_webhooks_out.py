"""Signed webhooks out to the CRM (issue 15): every event fired by its real cause through the real services, in
the cause's transaction, routed to the configured endpoints, signed per Standard Webhooks and verified as the CRM
would, with the `standardwebhooks` package, at a real HTTP receiver on loopback. Retries keep the event id, the
schedule ends in `failed` (shown by status, /healthz and /metrics), a hanging endpoint holds up only its own
queue, a rolled-back cause sends nothing, and two senders never deliver one event twice. SQLite and PostgreSQL.

The services run on the fixed test clock (November 2026); the senders on a clock near the real one, since a
Standard Webhooks receiver refuses a `webhook-timestamp` more than 5 minutes from its own clock.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from recharged.accounts import adjust_balance, change_account, close_account
from recharged.clock import FixedClock
from recharged.config import Settings, load_settings
from recharged.daemon.http import create_app
from recharged.daemon.process import Daemon
from recharged.errors import ConfigError, ConflictError, NotFoundError
from recharged.mail.notices import notify_from_plans
from recharged.mail.statements import issue_monthly_statements
from recharged.mail.webhook_deliveries import list_deliveries, replay, webhooks_check
from recharged.mail.webhook_sender import WebhookSender, configured_endpoints
from recharged.planning import plan_accounts
from recharged.recharge import RechargeService
from recharged.status import DaemonAnswer, status_report
from recharged.store.models import Receipt, Recharge, WebhookDelivery, WebhookEvent
from tests.helpers import (
    API_TOKEN,
    OTHER_SECRET,
    SECRET,
    Api,
    Receiver,
    add_account,
    api_auth,
    busy_account,
    commit_fails_once,
    open_dispute,
)

ACTOR = "Jane Doe"
SECRETS = {"RECHARGED_WEBHOOK_SECRET_CRM": SECRET, "RECHARGED_WEBHOOK_SECRET_BILLING": OTHER_SECRET}


# --- a receiver, as the CRM runs one (tests.helpers.Receiver) -------------------------------------------------


@pytest.fixture
def crm():
    with Receiver() as receiver:
        yield receiver


@pytest.fixture
def real_clock() -> FixedClock:
    """The senders' clock: the real time, moved by hand."""
    return FixedClock(datetime.now(UTC).replace(microsecond=0))


def with_endpoints(settings: Settings, *endpoints: tuple[str, str, list[str]], **webhooks: object) -> Settings:
    section = settings.webhooks.model_validate(
        {"endpoints": [{"name": n, "url": u, "events": e} for n, u, e in endpoints], **webhooks}
    )
    return settings.model_copy(update={"webhooks": section})


def sender(db, settings: Settings, clock, **options) -> WebhookSender:
    return WebhookSender(db, settings, clock, configured_endpoints(settings, SECRETS), **options)


def hooked(settings: Settings, receiver: Receiver, events: tuple[str, ...] = ("*",), **webhooks) -> Settings:
    return with_endpoints(settings, ("crm", receiver.url, list(events)), **webhooks)


def deliveries(db) -> list[WebhookDelivery]:
    with db.reading() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def events_of(db, event_type: str | None = None) -> list[dict]:
    with db.reading() as s:
        rows = s.scalars(select(WebhookEvent).order_by(WebhookEvent.created_at, WebhookEvent.id))
        found = [json.loads(e.body) for e in rows]
    return [e for e in found if event_type is None or e["type"] == event_type]


# --- configuration and secrets ------------------------------------------------------------------------------------


def test_an_endpoint_without_a_valid_secret_is_refused_naming_the_variable_and_never_shows_it(settings):
    hooks = with_endpoints(settings, ("crm", "https://crm.example/hooks", ["*"]))
    with pytest.raises(
        ConfigError, match=r"'crm': no signing secret: set RECHARGED_WEBHOOK_SECRET_CRM or the credential"
    ):
        configured_endpoints(hooks, {})
    bad = "whsec_" + base64.b64encode(b"too short").decode()
    with pytest.raises(ConfigError) as caught:
        configured_endpoints(hooks, {"RECHARGED_WEBHOOK_SECRET_CRM": bad})
    assert "environment RECHARGED_WEBHOOK_SECRET_CRM is not whsec_ and the base64 of 24 to 64" in str(caught.value)
    assert bad not in str(caught.value)
    with pytest.raises(ConfigError, match="is not whsec_"):
        configured_endpoints(hooks, {"RECHARGED_WEBHOOK_SECRET_CRM": "not-a-secret"})
    [endpoint] = configured_endpoints(hooks, SECRETS)
    assert SECRET not in repr(endpoint)
    assert SECRET not in str(endpoint)
    assert endpoint.key == bytes(range(32))


def test_config_refuses_unknown_event_types_duplicate_names_bad_urls_and_secrets(tmp_path):
    def refused(table: str) -> str:
        path = tmp_path / "config.toml"
        path.write_text(table)
        with pytest.raises(ConfigError) as caught:
            load_settings(path, environ={})
        return str(caught.value)

    endpoint = '[[webhooks.endpoints]]\nname = "crm"\nurl = "https://crm.example/h"\n'
    assert "webhooks.endpoints.0.events.1 = 'balance.lo': Value error, not an event type" in refused(
        endpoint + 'events = ["balance.low", "balance.lo"]\n'
    )
    assert "endpoint names must be unique: crm given more than once" in refused((endpoint + 'events = ["*"]\n') * 2)
    assert "must be an http:// or https:// URL" in refused(endpoint.replace("https://", "ftp://") + 'events = ["*"]\n')
    text = refused(endpoint.replace("https://", "https://u:hunter2@") + 'events = ["*"]\n')
    assert "a user or password in the URL is a secret" in text
    assert "hunter2" not in text
    text = refused(endpoint + f'events = ["*"]\nsecret = "{SECRET}"\n')
    assert "secrets never go in config.toml" in text
    assert SECRET not in text
    assert "webhooks.endpoints.0.name" in refused(endpoint.replace('"crm"', '"CRM"') + 'events = ["*"]\n')


# --- each event from its real cause ---------------------------------------------------------------------------------


def test_automatic_and_one_time_recharges_are_told_signed_with_their_receipts(
    db, settings, clock, gateway_factory, stripe_client, crm, real_clock
):
    hooks = hooked(settings, crm)
    busy_account(db, hooks, clock, stripe_client, "pm_card_visa")
    service = RechargeService(db, hooks, gateway_factory, clock)
    service.run_cycle(plans_seen=lambda plans: notify_from_plans(db, clock.now(), plans))
    service.topup("acme", 1_000_000, ACTOR)
    report = sender(db, hooks, real_clock).send_due()
    assert report.ok
    assert crm.types() == ["recharge.succeeded", "recharge.succeeded"]  # a working auto-recharge: no balance.low
    auto, topup = crm.events()
    headers = crm.requests[0][0]
    assert headers["webhook-id"] == auto["id"]
    assert auto["id"].startswith("evt_")
    assert headers["webhook-signature"].startswith("v1,")
    assert int(headers["webhook-timestamp"]) == int(real_clock.now().timestamp())
    assert headers["content-type"] == "application/json"
    assert (auto["account_id"], auto["created_at"]) == ("acme", "2026-11-22T12:00:00Z")
    data = auto["data"]
    assert (data["kind"], data["currency"], data["receipt"], data["card"]["last4"]) == (
        "auto",
        "USD",
        "R-000001",
        "4242",
    )
    assert (data["amount"], data["vat"], data["total"], data["balance_after"]) == (
        "84.00000",
        "16.80000",
        "100.80000",
        "85.00000",
    )
    assert (topup["data"]["kind"], topup["data"]["amount"], topup["data"]["total"]) == ("topup", "10.00000", "12.00000")
    assert topup["data"]["receipt"] == "R-000002"
    assert [d.status for d in deliveries(db)] == ["delivered", "delivered"]
    assert sender(db, hooks, real_clock).send_due().runs[0].delivered == []  # nothing twice


def test_declines_tell_the_failure_the_next_try_the_suspension_and_the_unusable_card(
    db, settings, clock, gateway_factory, stripe_client, crm, real_clock
):
    payments = settings.payments.model_copy(update={"retry_schedule_hours": [4.0], "card_retry_after_decline_hours": 0})
    hooks = hooked(settings.model_copy(update={"payments": payments}), crm)
    busy_account(db, hooks, clock, stripe_client, "pm_card_chargeDeclinedInsufficientFunds")
    busy_account(db, hooks, clock, stripe_client, "pm_card_chargeDeclinedLostCard", account="bolt")
    service = RechargeService(db, hooks, gateway_factory, clock)
    service.run_cycle()
    clock.advance(timedelta(hours=4, minutes=1))
    service.run_cycle()
    sender(db, hooks, real_clock).send_due()
    acme = [e for e in crm.events() if e["account_id"] == "acme"]
    assert [e["type"] for e in acme] == ["recharge.failed", "recharge.failed", "auto_recharge.suspended"]
    first, second, suspended = acme
    assert (first["data"]["reason"], first["data"]["decline_code"]) == ("declined", "insufficient_funds")
    assert first["data"]["next_try_at"] == "2026-11-22T16:00:00Z"
    assert first["data"]["auto_recharge"]["state"] == "backing_off"
    assert (second["data"]["next_try_at"], second["data"]["auto_recharge"]["state"]) == (None, "suspended")
    assert (suspended["data"]["failed_cycles"], suspended["data"]["auto_recharge"]["enabled"]) == (2, True)
    bolt = [e for e in crm.events() if e["account_id"] == "bolt"]
    assert [e["type"] for e in bolt][:2] == ["funding_source.unusable", "recharge.failed"]
    assert bolt[0]["data"]["reason"].startswith("lost_card on 2026-11-22")
    assert (len(bolt[0]["data"]["last4"]), bolt[0]["data"]["default"]) == (4, True)


def test_a_card_that_needs_the_customer_is_told_as_action_required_not_as_a_failure(
    db, settings, clock, gateway_factory, stripe_client, crm, real_clock
):
    hooks = hooked(settings, crm)
    busy_account(db, hooks, clock, stripe_client, "pm_card_authenticationRequired")
    RechargeService(db, hooks, gateway_factory, clock).run_cycle()
    sender(db, hooks, real_clock).send_due()
    [event] = crm.events()
    assert event["type"] == "recharge.action_required"
    assert event["data"]["payment_intent"].startswith("pi_")
    assert event["data"]["auto_recharge"]["state"] == "action_required"


def test_balance_low_is_told_once_per_crossing_then_depleted_and_recovered(db, settings, clock, crm, real_clock):
    hooks = hooked(settings, crm)
    add_account(db, hooks, clock, opening_balance="10.00")  # above the $5.00 minimum reserve, auto-recharge off

    def cycle() -> list[str]:
        """What the cycle's plans tell, delivered."""
        notify_from_plans(db, clock.now(), plan_accounts(db, hooks, clock.now()))
        clock.advance(timedelta(hours=4))
        before = len(crm.requests)
        sender(db, hooks, real_clock).send_due()
        return [e["type"] for e in crm.events()[before:]]

    assert cycle() == []
    adjust_balance(db, "acme", -700_000, reason="usage", actor=ACTOR, clock=clock)  # $3.00
    assert cycle() == ["balance.low"]
    assert cycle() == []  # the same crossing: not again every cycle
    [low] = events_of(db, "balance.low")
    assert (low["data"]["balance"], low["data"]["threshold"], low["data"]["currency"]) == ("3.00000", "5.00000", "USD")
    assert low["data"]["auto_recharge"] == {"enabled": False, "decision": "auto_recharge_off"}
    adjust_balance(db, "acme", -400_000, reason="usage", actor=ACTOR, clock=clock)  # -$1.00
    assert cycle() == ["balance.depleted"]
    adjust_balance(db, "acme", 2_000_000, reason="paid", actor=ACTOR, clock=clock)  # $19.00
    assert cycle() == ["balance.recovered"]
    assert cycle() == []
    adjust_balance(db, "acme", -1_700_000, reason="usage", actor=ACTOR, clock=clock)  # $2.00: a second crossing
    assert cycle() == ["balance.low"]
    # Automatic recharge on but failing (no card it can charge): low all the same.
    add_account(db, hooks, clock, "bolt", opening_balance="1.00", auto_recharge=True)
    assert cycle() == ["balance.low"]
    assert events_of(db, "balance.low")[-1]["data"]["auto_recharge"] == {
        "enabled": True,
        "decision": "no_funding_source",
    }
    # A closed account is told nothing: neither low nor, when it is closed while low, recovered.
    close_account(db, "bolt", reason="moved away", actor=ACTOR, clock=clock)
    add_account(db, hooks, clock, "cask", opening_balance="1.00")
    close_account(db, "cask", reason="never used", actor=ACTOR, clock=clock)
    assert cycle() == []


def test_a_spend_cap_reached_is_told_once(db, settings, clock, gateway_factory, stripe_client, crm, real_clock):
    """acme's automatic recharge charged 100.80 under a 24-hour cap of 101.00; when its balance falls under the
    threshold again, the 0.20 left is below the processor's minimum charge: the cap stops automatic recharge."""
    hooks = hooked(settings, crm)
    busy_account(db, hooks, clock, stripe_client, "pm_card_visa")
    overrides = {"max_recharge": "101", "max_charged_per_day": "101"}
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=hooks, overrides=overrides)
    service = RechargeService(db, hooks, gateway_factory, clock)

    def cycle() -> list[str]:
        report = service.run_cycle(plans_seen=lambda plans: notify_from_plans(db, clock.now(), plans))
        clock.advance(timedelta(hours=1))
        return [r.phase for r in report.charged]

    assert cycle() == ["finished"]
    adjust_balance(db, "acme", -8_000_000, reason="usage", actor=ACTOR, clock=clock)  # 85.00 -> 5.00
    assert cycle() == cycle() == []
    sender(db, hooks, real_clock).send_due()
    assert crm.types() == [
        "auto_recharge.changed",
        "recharge.succeeded",
        "balance.low",  # a cap that stops automatic recharge leaves the balance low
        "cap.reached",
    ]
    cap = crm.events()[-1]["data"]
    assert (cap["cap"], cap["limit"], cap["balance"]) == ("max_charged_per_day", "101.00000", "5.00000")


def test_an_admins_change_of_automatic_recharge_is_told_with_before_after_and_who(db, settings, clock, crm, real_clock):
    hooks = hooked(settings, crm)
    add_account(db, hooks, clock)
    change_account(db, "acme", actor=ACTOR, clock=clock, settings=hooks, email="ap@acme.example")  # not told
    change_account(
        db, "acme", actor="John Roe", clock=clock, settings=hooks, auto_recharge=True, overrides={"max_recharge": "250"}
    )
    sender(db, hooks, real_clock).send_due()
    [changed] = crm.events()
    assert changed["type"] == "auto_recharge.changed"
    assert changed["data"]["actor"] == "John Roe"
    assert changed["data"]["changes"] == {
        "auto_recharge": {"before": False, "after": True},
        "max_recharge": {"before": None, "after": "250.00000"},
    }
    assert changed["data"]["auto_recharge"]["enabled"] is True


def test_a_monthly_statement_is_told_when_issued(db, settings, clock, crm, real_clock):
    hooks = hooked(settings, crm, events=("statement.issued",))
    add_account(db, hooks, clock, opening_balance="10.00")
    assert issue_monthly_statements(db, hooks, clock, datetime(2026, 12, 1, 6, tzinfo=UTC)) == 1
    sender(db, hooks, real_clock).send_due()
    [issued] = crm.events()
    assert (issued["type"], issued["data"]["month"]) == ("statement.issued", "2026-11")
    assert (issued["data"]["opening_balance"], issued["data"]["closing_balance"]) == ("10.00000", "10.00000")


# --- after the charge: refunds and disputes, through the processor's own webhooks ----------------------------------


def _deliver_all(api: Api, server, seen: set[str]) -> None:
    """Post the server's new events to the daemon's Stripe webhook twice each, newest first, then let it handle them."""
    fresh = [e for e in server.events() if e["id"] not in seen]
    for stripe_event in [*reversed(fresh), *fresh]:
        assert api.deliver(server, stripe_event).status_code == 200
        seen.add(stripe_event["id"])
    api.settle_events()


def _charged(api: Api, stripe_client, card: str) -> Recharge:
    busy_account(api.db, api.settings, api.clock, stripe_client, card)
    [report] = api.daemon.runtime().recharges.run_cycle().charged
    with api.db.reading() as s:
        return s.get(Recharge, report.recharge_id)


def test_refund_dispute_and_its_win_are_each_told_once(make_api, stripe_client, stripe_server, crm, real_clock):
    api = make_api()
    hooks = hooked(api.settings, crm, events=("refund.created", "dispute.created", "dispute.closed"))
    recharge, seen = _charged(api, stripe_client, "pm_card_visa"), set()
    _deliver_all(api, stripe_server, seen)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1260})
    _deliver_all(api, stripe_server, seen)
    [intent] = [pi for pi in stripe_server.payment_intents() if pi["id"] == recharge.payment_intent]
    dispute = open_dispute(stripe_server, intent["latest_charge"])
    _deliver_all(api, stripe_server, seen)
    stripe_server.close_dispute(dispute["id"], won=True)
    _deliver_all(api, stripe_server, seen)
    _deliver_all(api, stripe_server, set())  # every event of the processor again: nothing new to tell
    sender(api.db, hooks, real_clock).send_due()
    refunded, disputed, closed = crm.events()
    assert [refunded["type"], disputed["type"], closed["type"]] == [
        "refund.created",
        "dispute.created",
        "dispute.closed",
    ]
    assert refunded["data"]["refund_id"] == refund.id
    assert (refunded["data"]["amount"], refunded["data"]["balance_change"]) == ("12.60000", "-10.50000")
    assert refunded["data"]["payment"]["receipt"] == "R-000001"
    assert (disputed["data"]["dispute_id"], disputed["data"]["reason"]) == (dispute["id"], "fraudulent")
    assert disputed["data"]["auto_recharge"]["state"] == "disputed"
    assert (closed["data"]["status"], closed["data"]["balance_change"]) == ("won", "84.00000")


def test_a_lost_dispute_is_told_closed_with_nothing_given_back(make_api, stripe_client, stripe_server, crm, real_clock):
    api = make_api()
    hooks = hooked(api.settings, crm, events=("dispute.created", "dispute.closed"))
    _charged(api, stripe_client, "pm_card_createDispute")  # Stripe's test card: disputed at once
    seen: set[str] = set()
    _deliver_all(api, stripe_server, seen)
    [dispute] = stripe_server.disputes()
    stripe_server.close_dispute(dispute["id"], won=False)
    _deliver_all(api, stripe_server, seen)
    sender(api.db, hooks, real_clock).send_due()
    assert crm.types() == ["dispute.created", "dispute.closed"]
    closed = crm.events()[1]["data"]
    assert (closed["dispute_id"], closed["status"], closed["balance_change"]) == (dispute["id"], "lost", "0.00000")


# --- delivery: retries, failure, replay, isolation, crashes, concurrency --------------------------------------------


def _changes(db, settings, clock, accounts: int = 1) -> None:
    """One auto_recharge.changed event per account (created and then opted in by an admin)."""
    for n in range(accounts):
        add_account(db, settings, clock, f"acct{n}")
        change_account(db, f"acct{n}", actor=ACTOR, clock=clock, settings=settings, auto_recharge=True)


def test_a_retry_sends_the_same_event_id_and_body_signed_anew(db, settings, clock, real_clock):
    with Receiver(answers=(500, 200)) as crm:
        hooks = hooked(settings, crm)
        _changes(db, hooks, clock)
        the_sender = sender(db, hooks, real_clock)
        first = the_sender.send_due()
        assert (first.ok, len(first.runs[0].retrying)) == (False, 1)
        [pending] = deliveries(db)
        assert (pending.status, pending.attempts, pending.last_status_code) == ("pending", 1, 500)
        assert pending.last_error.startswith("HTTP 500")
        assert pending.next_attempt_at == real_clock.now() + timedelta(seconds=5)
        assert the_sender.send_due().runs[0].retrying == []  # not due yet
        assert len(crm.requests) == 1
        real_clock.advance(timedelta(seconds=5))
        assert the_sender.send_due().ok
        (h1, b1), (h2, b2) = crm.requests
        assert h1["webhook-id"] == h2["webhook-id"] == json.loads(b1)["id"]
        assert b1 == b2
        assert int(h2["webhook-timestamp"]) - int(h1["webhook-timestamp"]) == 5
        assert h1["webhook-signature"] != h2["webhook-signature"]
        assert [e["id"] for e in crm.events()] == [json.loads(b1)["id"]] * 2  # both verify
        [delivered] = deliveries(db)
        assert (delivered.status, delivered.attempts, delivered.last_status_code) == ("delivered", 2, 200)


def test_a_delivery_fails_after_the_schedule_shows_in_status_and_is_replayed_with_its_id(db, settings, clock):
    sender_clock = FixedClock(clock.now())
    with Receiver(answers=(503,)) as crm:
        hooks = hooked(settings, crm)
        _changes(db, hooks, clock)
        the_sender = sender(db, hooks, sender_clock)
        schedule = hooks.webhooks.retry_after_seconds
        assert sum(schedule) >= 86_400  # retried for at least a day
        the_sender.send_due()
        for wait in schedule:
            [d] = deliveries(db)
            assert d.status == "pending"
            sender_clock.advance(timedelta(seconds=wait))
            the_sender.send_due()
        [failed] = deliveries(db)
        assert (failed.status, failed.attempts, failed.last_status_code) == ("failed", len(schedule) + 1, 503)
        assert len(crm.requests) == len(schedule) + 1
        assert len({h["webhook-id"] for h, _ in crm.requests}) == 1
        sender_clock.advance(timedelta(days=7))
        the_sender.send_due()
        assert len(crm.requests) == len(schedule) + 1  # given up: not tried again

    report = status_report(db, hooks, sender_clock.now(), DaemonAnswer(None, False, error="not asked"))
    [attention] = [a for a in report.attention if a.kind == "webhook_failed"]
    assert attention.subject == "webhook endpoint crm"
    assert "1 event failed for good" in attention.detail
    assert "HTTP 503" in attention.detail
    assert webhooks_check(db, sender_clock.now())["status"] == "warn"
    [listed] = list_deliveries(db, status="failed")
    assert (listed.endpoint, listed.type, listed.attempts) == ("crm", "auto_recharge.changed", 8)

    with Receiver() as fixed:
        hooks = hooked(settings, fixed)
        assert replay(db, failed.event_id, configured_endpoints(hooks, SECRETS), sender_clock.now()) == ["crm"]
        assert sender(db, hooks, sender_clock).send_due().ok
        assert [h["webhook-id"] for h, _ in fixed.requests] == [failed.event_id]
    assert webhooks_check(db, sender_clock.now())["status"] == "pass"
    with pytest.raises(NotFoundError, match="no webhook event 'evt_nope'"):
        replay(db, "evt_nope", configured_endpoints(hooks, SECRETS), sender_clock.now())
    other = with_endpoints(settings, ("billing", fixed.url, ["statement.issued"]))
    with pytest.raises(ConflictError, match=r"no configured webhook endpoint takes auto_recharge\.changed"):
        replay(db, failed.event_id, configured_endpoints(other, SECRETS), sender_clock.now())


def test_each_endpoint_gets_the_types_it_asked_for_signed_with_its_own_secret(db, settings, clock, crm, real_clock):
    with Receiver() as billing:
        hooks = with_endpoints(settings, ("crm", crm.url, ["*"]), ("billing", billing.url, ["statement.issued"]))
        add_account(db, hooks, clock, opening_balance="10.00")
        change_account(db, "acme", actor=ACTOR, clock=clock, settings=hooks, auto_recharge=True)
        issue_monthly_statements(db, hooks, clock, datetime(2026, 12, 1, 6, tzinfo=UTC))
        assert sender(db, hooks, real_clock).send_due().ok
        assert crm.types() == ["auto_recharge.changed", "statement.issued"]
        assert billing.types(OTHER_SECRET) == ["statement.issued"]
        with pytest.raises(Exception, match="No matching signature"):
            billing.events(SECRET)


def test_a_hanging_endpoint_delays_only_its_own_queue(db, settings, clock, real_clock):
    """The slow endpoint sleeps past the timeout (0.5 s); the other endpoint's events go out meanwhile, the worker
    started for the slow one is not started twice, and a change that writes an event commits without waiting."""
    with Receiver(hang=3.0) as slow, Receiver() as fast:
        hooks = with_endpoints(settings, ("crm", slow.url, ["*"]), ("billing", fast.url, ["*"]), timeout_seconds=0.5)
        _changes(db, hooks, clock, accounts=3)
        the_sender = sender(db, hooks, real_clock)
        started = time.monotonic()
        assert the_sender.start() == ["crm", "billing"]
        assert time.monotonic() - started < 0.5  # the job returns at once
        assert fast.wait_for(3, timeout=5)
        assert slow.wait_for(1, timeout=5)
        assert not the_sender.wait_idle(0)  # billing's all went out while crm's worker still waits for its first
        assert "crm" not in the_sender.start()  # never a second worker for it
        t0 = time.monotonic()
        change_account(db, "acct0", actor=ACTOR, clock=clock, settings=hooks, overrides={"max_recharge": "300"})
        assert time.monotonic() - t0 < 0.5  # writing an event waits for no endpoint
        assert the_sender.wait_idle(5)
        assert len(slow.requests) == 1  # no answer: its run stopped, the rest of its queue waits
        rows = [d for d in deliveries(db) if d.endpoint == "crm"]
        assert [(d.status, d.attempts) for d in rows][:3] == [("pending", 1), ("pending", 0), ("pending", 0)]
        assert rows[0].last_error == "no answer within 0.5 s"
        assert rows[0].last_status_code is None
        assert [d.status for d in deliveries(db) if d.endpoint == "billing"][:3] == ["delivered"] * 3
        the_sender.close()


def test_an_event_rolled_back_with_its_cause_is_never_sent(
    db, settings, clock, gateway_factory, stripe_client, crm, real_clock
):
    hooks = hooked(settings, crm)
    busy_account(db, hooks, clock, stripe_client, "pm_card_visa")
    service = RechargeService(db, hooks, gateway_factory, clock)
    with commit_fails_once(Receipt) as fired, pytest.raises(RuntimeError, match="went away"):
        service.topup("acme", 1_000_000, ACTOR)
    assert fired
    assert events_of(db) == []
    assert sender(db, hooks, real_clock).send_due().runs[0].delivered == []
    assert crm.requests == []
    [report] = service.recover()  # the paid top-up is credited now, and told once
    assert report.phase == "finished"
    sender(db, hooks, real_clock).send_due()
    assert crm.types() == ["recharge.succeeded"]


def test_two_senders_at_once_deliver_each_event_once(db, settings, clock, crm, real_clock):
    hooks = hooked(settings, crm)
    for n in range(20):
        add_account(db, hooks, clock, f"acct{n}", opening_balance="1.00")
    assert issue_monthly_statements(db, hooks, clock, datetime(2026, 12, 1, 6, tzinfo=UTC)) == 20
    senders = [sender(db, hooks, real_clock, instance=name) for name in ("host-a:1", "host-b:2")]
    barrier = threading.Barrier(2)
    reports: list = []

    def run(one: WebhookSender) -> None:
        barrier.wait()
        reports.append(one.send_due())

    threads = [threading.Thread(target=run, args=(one,)) for one in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    ids = [h["webhook-id"] for h, _ in crm.requests]
    assert len(ids) == len(set(ids)) == 20
    assert sum(len(r.runs[0].delivered) for r in reports) == 20
    assert {(d.status, d.attempts) for d in deliveries(db)} == {("delivered", 1)}


# --- the daemon: start-up, its job, /healthz and /metrics -------------------------------------------------------


def test_the_daemon_refuses_an_endpoint_without_secret_sends_on_its_job_and_shows_failures(
    db_url, clock, gateway_factory, monkeypatch, tmp_path: Path
):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("RECHARGED_WEBHOOK_SECRET_CRM", raising=False)
    monkeypatch.setenv("RECHARGED_API_TOKENS", API_TOKEN)
    monkeypatch.setenv("RECHARGED_STRIPE_API_KEY", "sk_test_unused")
    with Receiver(answers=(200, 503)) as crm:
        base = load_settings(None, environ={"RECHARGED_DATABASE__URL": db_url})
        hooks = hooked(base, crm, retry_after_seconds=[1.0])

        def daemon() -> Daemon:
            return Daemon(None, hooks, clock, gateway=lambda _settings: gateway_factory())

        refused = daemon()
        with pytest.raises(ConfigError, match="RECHARGED_WEBHOOK_SECRET_CRM"):
            refused.prepare()
        refused.db.close()

        monkeypatch.setenv("RECHARGED_WEBHOOK_SECRET_CRM", SECRET)
        running = daemon()
        try:
            running.prepare()
            client = TestClient(create_app(running))
            _changes(running.db, hooks, clock, accounts=2)
            job = running._jobs_table()["webhooks"]
            job()  # as the scheduler runs it
            assert running.wait_webhooks_idle(10)
            assert len(crm.requests) == 2  # the first delivered, the second answered 503
            clock.advance(timedelta(seconds=2))
            job()
            assert running.wait_webhooks_idle(10)
            states = sorted((d.status, d.attempts) for d in deliveries(running.db))
            assert states == [("delivered", 1), ("failed", 2)]

            [check] = client.get("/healthz", headers=api_auth()).json()["checks"]["webhooks:deliveries"]
            assert check["status"] == "warn"
            assert "1 failed for good (endpoints crm)" in check["output"]
            metrics = client.get("/metrics").text
            assert 'recharged_webhook_deliveries{endpoint="crm",status="failed"} 1.0' in metrics
            assert 'recharged_webhook_deliveries{endpoint="crm",status="pending"} 0.0' in metrics
        finally:
            running.stop()


def test_nothing_is_sent_for_accounts_and_days_with_nothing_to_tell(db, settings, clock, crm, real_clock):
    hooks = hooked(settings, crm)
    add_account(db, hooks, clock, opening_balance="100.00")
    notify_from_plans(db, clock.now(), plan_accounts(db, hooks, clock.now()))
    report = sender(db, hooks, real_clock).send_due()
    assert (report.routed, crm.requests) == (0, [])
    assert list_deliveries(db) == []
