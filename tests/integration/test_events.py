"""The inbox of processor events: a webhook is stored in one transaction and answered at once, handled later off
the request path, once per event id, each event in its own error boundary with its failures on its row; the
daemon drains it on its own, `recharged events process` without the daemon. And what card and customer events do:
a card detached or a customer deleted at the processor can no longer be charged; the card updater's new details
are taken, making an expired card usable again. On SQLite and PostgreSQL, with the real Stripe SDK against the
Stripe-compatible server, events signed as Stripe signs them.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from recharged.events import ALERT_AFTER
from recharged.planning import plan_accounts
from recharged.states import EventStatus
from recharged.status import DaemonAnswer, status_report
from recharged.store.engine import Database
from recharged.store.models import AuditRecord, Entry, FundingSource, OutboxMessage, ProcessorEvent, Recharge
from tests.e2e.commands import REPO, charging_env, command_runner, ok
from tests.helpers import Api, AsleepDaemon, api_auth, busy_account


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


def charged(api: Api, stripe_client, *cards: str) -> Recharge:
    busy_account(api.db, api.settings, api.clock, stripe_client, *(cards or ("pm_card_visa",)))
    [report] = api.daemon.runtime().recharges.run_cycle().charged
    with api.db.reading() as s:
        return s.get(Recharge, report.recharge_id)


def refunds_posted(api: Api) -> list[tuple[str, int]]:
    with api.db.reading() as s:
        return list(s.execute(select(Entry.external_id, Entry.amount).where(Entry.entry_type == "refund")).all())


def sources(api: Api) -> list[FundingSource]:
    with api.db.reading() as s:
        return list(s.scalars(select(FundingSource).order_by(FundingSource.id)))


def attention(api: Api) -> dict[str, list]:
    report = status_report(api.db, api.settings, api.clock.now(), DaemonAnswer(None, False, error="not asked"))
    found: dict[str, list] = {}
    for item in report.attention:
        found.setdefault(str(item.kind), []).append(item)
    return found


def inbox_check(api: Api) -> dict:
    [check] = api.client.get("/healthz", headers=api_auth()).json()["checks"]["events:inbox"]
    return check


# --- the inbox ----------------------------------------------------------------------------------------------------


def test_a_webhook_is_stored_and_answered_at_once_and_a_crash_after_the_answer_loses_nothing(
    make_api, stripe_client, stripe_server
):
    asleep = make_api(daemon_class=AsleepDaemon)  # stores, and dies before anything handles the event
    recharge = charged(asleep, stripe_client)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1260})
    [event] = stripe_server.events(type="refund.created")

    answer = asleep.deliver(stripe_server, event)
    assert answer.json() == {"received": True, "event": event["id"], "outcome": "stored"}
    row = asleep.event_row(event["id"])
    assert (row.type, row.object_id, row.status, row.attempts) == ("refund.created", refund.id, "pending", 0)
    assert row.payload == event["data"]["object"]  # the object as the event carried it, kept as received
    assert refunds_posted(asleep) == []
    asleep.daemon.stop()

    restarted = make_api()  # the next process finds the event in the inbox
    [processed] = restarted.settle_events()
    assert (processed.event_id, processed.outcome) == (event["id"], "handled")
    assert refunds_posted(restarted) == [(refund.id, -1_050_000)]
    row = restarted.event_row(event["id"])
    assert (row.status, row.account_id, row.last_error) == ("handled", "acme", None)
    assert refund.id in row.outcome


def test_a_redelivered_event_is_a_duplicate_and_each_event_is_handled_once(api: Api, stripe_client, stripe_server):
    recharge = charged(api, stripe_client)
    stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1260})
    [event] = stripe_server.events(type="charge.refunded")
    assert api.deliver(stripe_server, event).json()["outcome"] == "stored"
    assert api.deliver(stripe_server, event).json()["outcome"] == "duplicate"
    api.settle_events()
    assert api.daemon.runtime().events.process(event["id"]).outcome == "busy"  # handled already: never again
    assert len(refunds_posted(api)) == 1
    assert api.metric("recharged_webhooks_total", outcome="duplicate") == 1
    assert api.metric("recharged_events_total", outcome="handled") == 1
    ignored = api.deliver(stripe_server, stripe_server.events(type="charge.succeeded")[0])
    assert ignored.json()["outcome"] == "ignored"  # a type recharged does not act on: kept, so it is known again
    assert api.event_row(ignored.json()["event"]).status == EventStatus.IGNORED


def test_the_daemon_handles_a_stored_event_by_itself(api: Api, stripe_client, stripe_server):
    recharge = charged(api, stripe_client)
    stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 2520})
    [event] = stripe_server.events(type="refund.created")
    assert api.deliver(stripe_server, event).json()["outcome"] == "stored"
    assert api.daemon.wait_events_idle(30)  # woken by the webhook, off its request: nothing else was called
    assert api.event_row(event["id"]).status == "handled"
    assert refunds_posted(api) == [(event["data"]["object"]["id"], -2_100_000)]


def test_a_failing_event_waits_for_its_retry_time_and_never_holds_up_the_others(make_api, stripe_client, stripe_server):
    api = make_api(daemon_class=AsleepDaemon)
    recharge = charged(api, stripe_client, "pm_card_visa", "pm_card_mastercard")
    stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1260})
    backup = sources(api)[1]
    stripe_server.update_card(backup.payment_method, exp_year=2035)
    stripe_server.inject("http_500", path_prefix="/v1/charges", method="GET", times=None)  # the processor is down
    refund_events = stripe_server.events(type="refund.created") + stripe_server.events(type="charge.refunded")
    card_event = stripe_server.events(type="payment_method.automatically_updated")[0]
    for event in [*refund_events, card_event]:  # a second apart: the inbox handles the oldest first
        assert api.deliver(stripe_server, event).json()["outcome"] == "stored"
        api.clock.advance(timedelta(seconds=1))

    report = api.daemon.runtime().events.process_pending()
    assert [p.outcome for p in report.processed] == ["failed", "failed", "handled"]  # the oldest first
    assert sources(api)[1].exp_year == 2035  # the card event was handled all the same
    row = api.event_row(refund_events[0]["id"])
    assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 1, api.clock.now() + timedelta(seconds=30))
    assert "processor error 500" in row.last_error
    failing = attention(api)["event_failing"]
    assert sorted(a.subject for a in failing) == sorted(f"event {e['id']}" for e in refund_events)
    check = inbox_check(api)
    assert (check["status"], check["observedValue"]) == ("warn", 2)

    stripe_server.clear_faults()
    assert api.daemon.runtime().events.process_pending().processed == []  # not before their retry time
    api.clock.advance(timedelta(seconds=31))
    assert [p.outcome for p in api.daemon.runtime().events.process_pending().processed] == ["handled", "handled"]
    assert len(refunds_posted(api)) == 1
    assert "event_failing" not in attention(api)
    assert inbox_check(api)["status"] == "pass"


def test_an_event_that_keeps_failing_makes_healthz_fail_and_waiting_ones_are_shown(
    make_api, stripe_client, stripe_server
):
    api = make_api(daemon_class=AsleepDaemon)
    recharge = charged(api, stripe_client)
    stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent})
    [event] = stripe_server.events(type="charge.refunded")
    api.deliver(stripe_server, event)
    api.clock.advance(timedelta(minutes=11))  # stored, and nobody handled it
    assert attention(api)["events_waiting"][0].detail.startswith("1 event stored but not handled")
    assert inbox_check(api)["status"] == "warn"

    stripe_server.inject("http_500", path_prefix="/v1/charges", method="GET", times=None)
    for _ in range(ALERT_AFTER):
        assert inbox_check(api)["status"] == "warn"
        api.daemon.runtime().events.process_pending()
        api.clock.advance(timedelta(hours=7))
    assert api.event_row(event["id"]).attempts == ALERT_AFTER
    assert inbox_check(api)["status"] == "fail"
    assert api.client.get("/healthz").status_code == 503


def test_events_process_and_list_drain_the_inbox_without_the_daemon(
    make_api, stripe_client, stripe_server, db_url, tmp_path
):
    api = make_api(daemon_class=AsleepDaemon)
    recharge = charged(api, stripe_client)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1260})
    [event] = stripe_server.events(type="refund.created")
    api.deliver(stripe_server, event)
    api.daemon.stop()  # no daemon from here on: the admin's command does the work
    run = command_runner(tmp_path, charging_env(db_url, stripe_server.url))

    listed = json.loads(ok(run("events", "list", "--status", "pending", "--json", config=REPO / "config.toml")))
    assert [(e["id"], e["type"], e["object"]) for e in listed] == [(event["id"], "refund.created", refund.id)]
    assert event["id"] in ok(run("events", "process"))
    assert "no event to handle" in ok(run("events", "process"))
    [handled] = json.loads(ok(run("events", "list", "--account", "acme", "--json")))
    assert (handled["status"], handled["account"]) == ("handled", "acme")
    db = Database(db_url)
    try:
        with db.reading() as s:
            amounts = list(s.scalars(select(Entry.amount).where(Entry.external_id == refund.id)))
    finally:
        db.close()
    assert amounts == [-1_050_000]
    unknown = run("events", "process", "evt_unknown")
    assert (unknown.returncode, "busy" in unknown.stdout) == (0, True)


def test_events_the_inbox_lacks_after_a_restore_are_fetched_from_the_processor_once(
    make_api, stripe_client, stripe_server
):
    api = make_api(daemon_class=AsleepDaemon)
    recharge = charged(api, stripe_client)
    refund = stripe_client.client.v1.refunds.create(params={"payment_intent": recharge.payment_intent, "amount": 1260})
    [known] = stripe_server.events(type="charge.refunded")
    api.deliver(stripe_server, known)  # the restored inbox has this one; refund.created was answered after the backup
    events = api.daemon.runtime().events
    fetched = events.fetch(api.clock.now() - timedelta(days=1))
    by_outcome = {s.event_id: s.outcome for s in fetched}
    assert by_outcome[known["id"]] == "duplicate"
    assert by_outcome[stripe_server.events(type="refund.created")[0]["id"]] == "stored"
    assert by_outcome[stripe_server.events(type="charge.succeeded")[0]["id"]] == "ignored"
    assert {s.outcome for s in events.fetch(api.clock.now() - timedelta(days=1))} == {"duplicate"}
    assert {p.outcome for p in events.process_pending().processed} == {"handled"}
    assert refunds_posted(api) == [(refund.id, -1_050_000)]


def test_events_handled_before_the_inbox_existed_are_still_known_after_the_upgrade(db_url):
    from alembic import command

    db = Database(db_url)
    try:
        with db.engine.begin() as connection:
            config = db._alembic()
            config.attributes["connection"] = connection
            command.downgrade(config, "0006_reversals")
        with db.engine.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO webhook_events (id, type, payment_intent, received_at, outcome) VALUES "
                "('evt_old', 'payment_intent.succeeded', 'pi_old', '2026-11-20 10:00:00', 'recharge 7 finished')"
            )
        db.upgrade()
        with db.reading() as s:
            row = s.get(ProcessorEvent, "evt_old")
            assert (row.status, row.object_id, row.outcome) == ("handled", "pi_old", "recharge 7 finished")
    finally:
        db.close()


# --- cards and customers (issue 11, defect 6) -------------------------------------------------------------------


def test_a_card_detached_at_the_processor_can_no_longer_be_charged_and_the_admin_and_customer_see_it(
    api: Api, stripe_client, stripe_server
):
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_visa")
    [source] = sources(api)
    stripe_client.client.v1.payment_methods.detach(source.payment_method)
    [event] = stripe_server.events(type="payment_method.detached")
    for _ in range(2):
        api.deliver(stripe_server, event)
    api.settle_events()

    [source] = sources(api)
    assert source.unusable_reason.startswith("removed at the processor (detached)")
    [plan] = plan_accounts(api.db, api.settings, api.clock.now())
    assert plan.decision.reason == "no_funding_source"
    assert [a.subject for a in attention(api)["unusable_source"]] == [f"account acme source {source.id}"]
    with api.db.reading() as s:
        [audit] = s.scalars(select(AuditRecord).where(AuditRecord.action == "source.removed_at_processor")).all()
        [notice] = s.scalars(
            select(OutboxMessage).where(
                OutboxMessage.kind == "settings_changed", OutboxMessage.key == f"settings:audit:{audit.id}"
            )
        ).all()
    assert (audit.actor, audit.after["event"], audit.after["unusable"]) == (
        "Stripe (card processor)",
        event["id"],
        source.unusable_reason,
    )
    assert notice.context["changes"][0]["after"] == "can no longer be charged: please add a card"
    assert api.daemon.runtime().recharges.run_cycle().charged == []  # nothing is sent to a detached card


def test_the_card_updater_refreshes_the_card_and_makes_a_card_declined_as_expired_usable_again(
    api: Api, stripe_client, stripe_server
):
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_chargeDeclinedExpiredCard")
    [report] = api.daemon.runtime().recharges.run_cycle().charged
    assert report.phase == "failed"
    [source] = sources(api)
    assert source.unusable_reason.startswith("expired_card")

    stripe_server.update_card(source.payment_method, exp_month=4, exp_year=2031, last4="1881")
    [event] = stripe_server.events(type="payment_method.automatically_updated")
    api.deliver(stripe_server, event)
    api.settle_events()
    [source] = sources(api)
    assert (source.last4, source.exp_month, source.exp_year, source.unusable_reason) == ("1881", 4, 2031, None)
    with api.db.reading() as s:
        [audit] = s.scalars(select(AuditRecord).where(AuditRecord.action == "source.updated_at_processor")).all()
    assert audit.before["unusable"].startswith("expired_card")
    assert audit.after["unusable"] is None


def test_card_events_out_of_order_end_with_the_card_the_processor_has_now(api: Api, stripe_client, stripe_server):
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_visa")
    [source] = sources(api)
    stripe_server.update_card(source.payment_method, exp_year=2033)
    stripe_client.client.v1.payment_methods.update(source.payment_method, params={"card": {"exp_month": 7}})
    older, newer = stripe_server.events(type="payment_method.*")[-2:]
    for event in (newer, older, newer):  # the newest first, then a late one that says 12/2033
        api.deliver(stripe_server, event)
    api.settle_events()
    [source] = sources(api)
    assert (source.exp_month, source.exp_year, source.unusable_reason) == (7, 2033, None)
    with api.db.reading() as s:
        assert len(s.scalars(select(AuditRecord).where(AuditRecord.action == "source.updated_at_processor")).all()) == 1


def test_a_customer_deleted_at_the_processor_makes_all_its_cards_unusable(api: Api, stripe_client, stripe_server):
    customer = busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_visa", "pm_card_mastercard")
    forged = {
        "id": "evt_forged",
        "object": "event",
        "type": "customer.deleted",
        "data": {"object": {"id": customer, "object": "customer", "deleted": True}},
    }
    api.deliver(stripe_server, forged)  # says deleted, but the processor still has the customer
    api.settle_events()
    assert [s.unusable_reason for s in sources(api)] == [None, None]
    assert api.event_row("evt_forged").outcome == f"customer {customer} exists at the processor: nothing to do"

    stripe_client.client.v1.customers.delete(customer)
    [event] = stripe_server.events(type="customer.deleted")
    api.deliver(stripe_server, event)
    api.settle_events()
    assert [s.unusable_reason.split(" on ")[0] for s in sources(api)] == [
        "removed at the processor (customer deleted)"
    ] * 2
    with api.db.reading() as s:
        assert len(s.scalars(select(AuditRecord).where(AuditRecord.action == "source.removed_at_processor")).all()) == 2
    [plan] = plan_accounts(api.db, api.settings, api.clock.now())
    assert plan.decision.reason == "no_funding_source"


def test_card_events_about_cards_that_are_not_ours_change_nothing(api: Api, stripe_client, stripe_server):
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_visa")
    other = stripe_client.client.v1.customers.create(params={"email": "other@example.com"}).id
    theirs = stripe_client.client.v1.payment_methods.attach("pm_card_visa", params={"customer": other}).id
    stripe_client.client.v1.payment_methods.detach(theirs)
    [event] = [e for e in stripe_server.events(type="payment_method.detached") if e["data"]["object"]["id"] == theirs]
    api.deliver(stripe_server, event)
    api.settle_events()
    assert api.event_row(event["id"]).outcome == f"no card of ours is {theirs}"
    assert [s.unusable_reason for s in sources(api)] == [None]
