"""The daemon's HTTP API (usage, accounts, ops endpoints, OpenAPI) through FastAPI's TestClient, on SQLite and
PostgreSQL, with the daemon built as `recharged run` builds it (`Daemon.prepare()`, no threads started) and the
real Stripe SDK pointed at the local Stripe-compatible server. Stripe webhooks are in test_webhooks.py.

Every refused request must leave the database as it was, and no request, however malformed, gets a 500.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from recharged.accounts import adjust_balance
from recharged.config import load_settings
from recharged.daemon.process import Daemon
from recharged.errors import PaymentError
from recharged.money import format_ledger
from recharged.payments import StripeGateway
from recharged.planning import plan_accounts
from recharged.rating import longest_call, rate_time
from recharged.status import ask_daemon, status_report
from recharged.store.models import Account, Entry, FundingSource, OutboxMessage
from recharged.store.runs import finish_job_run, start_job_run
from tests.helpers import API_TOKEN as TOKEN
from tests.helpers import NOW, Api, add_account, busy_account, call, card_on_file
from tests.helpers import api_auth as auth

# --- helpers ---------------------------------------------------------------------------------------------------


def ledger(api: Api) -> tuple[int, dict[str, int]]:
    """What usage can change: the number of ledger entries and every account's balance."""
    with api.db.transaction() as s:
        count = s.scalar(select(func.count()).select_from(Entry))
        balances = dict(s.execute(select(Account.id, Account.balance)).all())
    return count, balances


def balance(api: Api, account: str = "acme") -> int:
    return ledger(api)[1][account]


def results(response) -> list[tuple[int, str | None, str]]:
    return [(r["index"], r["event_id"], r["status"]) for r in response.json()["results"]]


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


@pytest.fixture
def acme(api: Api) -> Api:
    """The API with account acme holding $10.00 and no usage yet."""
    add_account(api.db, api.settings, api.clock, "acme", opening_balance="10")
    return api


# --- POST /v1/usage --------------------------------------------------------------------------------------------


def test_70_second_call_bills_two_minutes(acme: Api):
    before = balance(acme)
    response = acme.post_usage([call("c-1", seconds=70)])
    assert response.status_code == 200
    assert response.json() == {
        "accepted": 1,
        "duplicate": 0,
        "rejected": 0,
        "results": [{"index": 0, "event_id": "c-1", "status": "accepted", "reason": None}],
    }
    assert before - balance(acme) == 4_000  # 2 minutes at $0.0200


def test_each_event_is_answered_by_index_with_a_reason_when_rejected(acme: Api):
    events = [
        call("ok-1", seconds=30),
        call("bad-account", account="nobody"),
        {**call("bad-kind"), "kind": "fax"},
        {**call("no-start"), "started_at": ""},
        call("ok-1", seconds=30),  # the same event again within the batch
        {**call("future"), "started_at": "2026-11-22T12:10:00Z"},  # 10 minutes ahead of the clock
        {**call("sms"), "kind": "sms_out", "duration_seconds": None, "quantity": 2},
    ]
    before = balance(acme)
    response = acme.post_usage(events)
    assert response.status_code == 200
    body = response.json()
    assert results(response) == [
        (0, "ok-1", "accepted"),
        (1, "bad-account", "rejected"),
        (2, "bad-kind", "rejected"),
        (3, "no-start", "rejected"),
        (4, "ok-1", "duplicate"),
        (5, "future", "rejected"),
        (6, "sms", "accepted"),
    ]
    assert (body["accepted"], body["duplicate"], body["rejected"]) == (2, 1, 4)
    reasons = [r["reason"] for r in body["results"]]
    assert "unknown account 'nobody'" in reasons[1]
    assert "unknown kind 'fax'" in reasons[2]
    assert "started_at is missing" in reasons[3]
    assert "in the future" in reasons[5]
    assert reasons[0] is None
    assert reasons[6] is None
    assert before - balance(acme) == 2_000 + 2 * 790  # one minute of dialer + two SMS segments


def test_usage_is_idempotent_by_event_id_across_requests(acme: Api):
    first = acme.post_usage([call("c-1"), call("c-2")])
    after_first = ledger(acme)
    again = acme.post_usage([call("c-2"), call("c-1"), call("c-3")])
    assert results(first) == [(0, "c-1", "accepted"), (1, "c-2", "accepted")]
    assert results(again) == [(0, "c-2", "duplicate"), (1, "c-1", "duplicate"), (2, "c-3", "accepted")]
    count, balances = ledger(acme)
    assert count == after_first[0] + 1
    assert after_first[1]["acme"] - balances["acme"] == 4_000  # only c-3 was billed


def test_the_same_event_id_with_other_content_is_rejected(acme: Api):
    acme.post_usage([call("c-1", seconds=70)])
    before = ledger(acme)
    response = acme.post_usage([call("c-1", seconds=700)])
    [result] = response.json()["results"]
    assert (result["status"], result["event_id"]) == ("rejected", "c-1")
    assert "different duration_seconds" in result["reason"]
    assert ledger(acme) == before


def test_events_that_are_not_objects_are_rejected_one_by_one(acme: Api):
    before = balance(acme)
    response = acme.post_usage(["c-1", call("c-2"), None, [call("c-3")], 7, call("c-4")])
    assert response.status_code == 200
    assert results(response) == [
        (0, None, "rejected"),
        (1, "c-2", "accepted"),
        (2, None, "rejected"),
        (3, None, "rejected"),
        (4, None, "rejected"),
        (5, "c-4", "accepted"),
    ]
    assert response.json()["results"][0]["reason"] == "an event must be a JSON object"
    assert before - balance(acme) == 2 * 4_000


def test_usage_needs_a_bearer_token(acme: Api):
    before = ledger(acme)
    missing = acme.client.post("/v1/usage", json={"events": [call("c-1")]})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["status"] == 401
    for header in ("Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer", f"bearer{TOKEN}", f"{TOKEN}"):
        response = acme.client.post("/v1/usage", json={"events": [call("c-1")]}, headers={"Authorization": header})
        assert response.status_code == 401, header
        assert "www-authenticate" in response.headers
    assert ledger(acme) == before
    # The scheme is case-insensitive (RFC 7235); the token is not.
    lower = acme.client.post("/v1/usage", json={"events": [call("c-1")]}, headers={"Authorization": f"bearer {TOKEN}"})
    assert lower.status_code == 200
    upper = acme.client.post(
        "/v1/usage", json={"events": [call("c-2")]}, headers={"Authorization": f"Bearer {TOKEN.upper()}"}
    )
    assert upper.status_code == 401


def test_any_of_several_configured_tokens_is_accepted(make_api):
    other = "second-token-abcdefghijklmnop"
    api = make_api(tokens=f"{TOKEN},\n{other}")
    add_account(api.db, api.settings, api.clock, "acme", opening_balance="10")
    response = api.client.post("/v1/usage", json={"events": [call("c-1")]}, headers=auth(other))
    assert response.status_code == 200


def test_without_configured_tokens_the_api_answers_503(make_api):
    api = make_api(tokens=None)
    add_account(api.db, api.settings, api.clock, "acme", opening_balance="10")
    before = ledger(api)
    response = api.post_usage([call("c-1")])
    assert response.status_code == 503
    assert "RECHARGED_API_TOKENS" in response.json()["error"]["message"]
    assert api.client.get("/v1/accounts/acme", headers=auth()).status_code == 503
    assert ledger(api) == before


MALFORMED = [  # (what, body, content type, status)
    ("truncated", b'{"events": [', "application/json", 400),
    ("empty", b"", "application/json", 400),
    ("not UTF-8", b"\xff\xfe{}", "application/json", 400),
    ("lone surrogate", b'{"events": [{"event_id": "\\ud800"}]}', "application/json", 400),
    ("huge integer", b"1" * 5000, "application/json", 400),  # past Python's limit on integer digits
    ("deep nesting", b"[" * 20_000 + b"]" * 20_000, "application/json", 400),  # past the recursion limit
    ("text/plain", b'{"events": [{"event_id": "c-1"}]}', "text/plain", 415),
    ("form", b'{"events": [{"event_id": "c-1"}]}', "application/x-www-form-urlencoded", 415),
    ("no content type", b'{"events": [{"event_id": "c-1"}]}', None, 415),
    ("json-ish type", b'{"events": [{"event_id": "c-1"}]}', "application/jsonp", 415),
    ("empty events", b'{"events": []}', "application/json", 422),
    ("events an object", b'{"events": {"event_id": "c-1"}}', "application/json", 422),
    ("events a string", b'{"events": "c-1"}', "application/json", 422),
    ("events null", b'{"events": null}', "application/json", 422),
    ("no events key", b'{"event": []}', "application/json", 422),
    ("an array", b"[]", "application/json", 422),
    ("a string", b'"events"', "application/json", 422),
    ("null", b"null", "application/json", 422),
]


def test_malformed_requests_get_a_clear_4xx_and_write_nothing(acme: Api):
    before = ledger(acme)
    for what, body, content_type, status in MALFORMED:
        headers = auth() | ({"Content-Type": content_type} if content_type else {})
        response = acme.client.post("/v1/usage", content=body, headers=headers)
        assert response.status_code == status, what
        assert response.headers["content-type"] == "application/json", what
        error = response.json()["error"]
        assert error["status"] == status, what
        assert error["message"], what
    assert ledger(acme) == before


def test_json_content_type_with_a_charset_is_accepted(acme: Api):
    body = json.dumps({"events": [call("c-1")]}).encode()
    response = acme.client.post(
        "/v1/usage", content=body, headers=auth() | {"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200


def oversized_body(api: Api) -> bytes:
    """A valid batch just over http.max_body_bytes."""
    limit = api.settings.http.max_body_bytes
    event = {**call("big"), "padding": "x" * (limit + 1)}
    return json.dumps({"events": [event]}).encode()


def test_a_body_over_the_limit_is_refused_by_its_content_length(acme: Api):
    before = ledger(acme)
    response = acme.client.post("/v1/usage", content=oversized_body(acme), headers=auth() | _json())
    assert response.status_code == 413
    assert str(acme.settings.http.max_body_bytes) in response.json()["error"]["message"]
    assert ledger(acme) == before


def test_a_chunked_body_over_the_limit_is_refused_while_reading(acme: Api):
    body = oversized_body(acme)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    before = ledger(acme)
    response = acme.client.post("/v1/usage", content=chunks(), headers=auth() | _json())
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]["message"]  # found by counting, not from a Content-Length
    assert ledger(acme) == before


def test_a_body_exactly_at_the_limit_is_read(acme: Api):
    limit = acme.settings.http.max_body_bytes
    body = json.dumps({"events": [call("c-1")]}).encode()
    body = body[:-1] + b" " * (limit - len(body)) + b"}"
    assert len(body) == limit
    response = acme.client.post("/v1/usage", content=body, headers=auth() | _json())
    assert response.status_code == 200


def test_more_events_than_allowed_in_one_request_is_refused_whole(acme: Api):
    most = acme.settings.http.max_events_per_request
    before = ledger(acme)
    response = acme.post_usage([call(f"c-{i}", seconds=1) for i in range(most + 1)])
    assert response.status_code == 413
    assert str(most) in response.json()["error"]["message"]
    assert ledger(acme) == before
    assert acme.post_usage([call(f"c-{i}", seconds=1) for i in range(most)]).json()["accepted"] == most


# Values a careless or hostile client might send in an event field, beside ones that are valid.
ODD_VALUES = [
    None,
    "",
    " ",
    True,
    0,
    -1,
    1.5,
    10**30,
    "1E+999999999",
    "92233720368547",
    "NaN",
    "-0",
    "\u0000",
    "\ud800",
    "acme\u0000",
    "é" * 70,
    "x" * 200,
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+01:00",
    "2026-11-20T10:00:00",
    [],
    {},
    {"nested": [1, 2]},
]
VALID = {
    "event_id": st.sampled_from(["f-1", "f-2", "f-3", "f 4", "ü"]),
    "account_id": st.sampled_from(["acme", "nobody", "ACME"]),
    "kind": st.sampled_from(["dialer", "sms_out", "lookup", "recording", "DIALER", "fax"]),
    "started_at": st.sampled_from(["2026-11-20T10:00:00Z", "2026-11-22T11:59:59+00:00", "2026-11-21T23:00:00-05:00"]),
    "duration_seconds": st.one_of(st.integers(-5, 8 * 86_400), st.sampled_from(["70", "+5", "٣", " 12 "])),
    "quantity": st.one_of(st.integers(-2, 2_000_000), st.just("3")),
    "text": st.text(max_size=200),
    "cost": st.sampled_from(["0.0125", "0.000001", "1", "-1", "100000", "1e3", "0"]),
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def usage_events(draw) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    event: dict[str, Any] = {}
    for name, valid in VALID.items():
        choice = draw(st.integers(0, 9))
        required = name in ("event_id", "account_id", "kind", "started_at")
        if choice < (6 if required else 3):
            event[name] = draw(valid)
        elif choice == 9:
            event[name] = draw(st.sampled_from(ODD_VALUES) | json_values)
    if draw(st.booleans()):
        event[draw(st.text(max_size=10))] = draw(json_values)
    return event


bodies = st.one_of(
    st.builds(lambda events: {"events": events}, st.lists(usage_events(), min_size=1, max_size=8)),
    st.builds(
        lambda events, extra: {**extra, "events": events},
        st.lists(usage_events(), max_size=3),
        st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    ),
    json_values,
)


@hypothesis_settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies)
def test_fuzzed_usage_never_gets_a_500_and_only_accepted_events_change_the_ledger(acme: Api, body):
    count_before, balances_before = ledger(acme)
    with acme.db.transaction() as s:
        known = set(s.scalars(select(Entry.external_id).where(Entry.entry_type == "usage")))
    response = acme.client.post("/v1/usage", content=json.dumps(body).encode(), headers=auth() | _json())
    assert response.status_code < 500, response.text
    count, balances = ledger(acme)
    if response.status_code != 200:
        assert (count, balances) == (count_before, balances_before)
        return
    payload = response.json()
    assert len(payload["results"]) == len(body["events"])
    assert [r["index"] for r in payload["results"]] == list(range(len(body["events"])))
    accepted = [r["event_id"] for r in payload["results"] if r["status"] == "accepted"]
    assert count - count_before == len(accepted) == payload["accepted"]
    with acme.db.transaction() as s:
        new = dict(
            s.execute(
                select(Entry.external_id, Entry.amount).where(
                    Entry.entry_type == "usage", Entry.external_id.not_in(known)
                )
            ).all()
        )
    assert sorted(new) == sorted(accepted)
    assert sum(balances.values()) - sum(balances_before.values()) == sum(new.values())
    assert all(r["reason"] for r in payload["results"] if r["status"] == "rejected")


def test_usage_metrics_count_events_by_outcome(acme: Api):
    acme.post_usage([call("c-1"), call("c-2"), call("c-3", account="nobody")])
    acme.post_usage([call("c-1")])
    assert acme.metric("recharged_usage_events_total", outcome="accepted") == 2
    assert acme.metric("recharged_usage_events_total", outcome="duplicate") == 1
    assert acme.metric("recharged_usage_events_total", outcome="rejected") == 1


class RecordingDaemon(Daemon):
    """Notes which accounts the API says took usage, instead of marking them due in the background."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reported: list[set[str]] = []

    def usage_recorded(self, account_ids: set[str]) -> None:
        self.reported.append(set(account_ids))


def test_the_daemon_hears_which_accounts_took_usage(make_api):
    api = make_api(daemon_class=RecordingDaemon)
    for account in ("acme", "beta"):
        add_account(api.db, api.settings, api.clock, account, opening_balance="10")
    api.post_usage([call("c-1", account=" acme "), call("c-2", account="beta"), call("c-3", account="nobody")])
    api.post_usage([call("c-1", account="acme"), call("c-4", account="nobody")])  # a duplicate and a rejection
    assert api.daemon.reported == [{"acme", "beta"}]


# --- GET /v1/accounts/{id} ---------------------------------------------------------------------------------------


def test_account_figures_match_the_plan(api: Api, stripe_client):
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_visa")
    response = api.client.get("/v1/accounts/acme", headers=auth())
    assert response.status_code == 200
    view = response.json()
    plan = next(plan_accounts(api.db, api.settings, api.clock.now(), ["acme"]))
    decision = plan.decision
    assert view["account_id"] == "acme"
    assert view["currency"] == "USD"
    assert view["balance"] == format_ledger(decision.balance) == "1.00000"
    assert view["threshold"] == format_ledger(decision.threshold) == "42.00000"
    assert view["recharge_amount"] == format_ledger(decision.recharge_amount) == "84.00000"
    assert view["average_daily"] == format_ledger(decision.average_daily) == "6.00000"
    assert view["runway_days"] == str(decision.runway_days)
    assert (view["decision"], view["decision_reason"]) == ("charge", "below_threshold")
    assert view["auto_recharge"] is True
    assert (view["recharge_state"], view["state_reason"], view["retry_at"]) == ("ok", None, None)
    assert view["next_cycle_at"] is None  # the scheduler is not started in these tests
    assert view["as_of"].replace("Z", "+00:00") == api.clock.now().isoformat()


def test_longest_call_is_what_the_balance_pays_for_at_the_dialer_rate(acme: Api):
    dialer = acme.settings.plans["standard"].rate_table()["dialer"]
    view = acme.client.get("/v1/accounts/acme", headers=auth()).json()
    assert view["dialer_rate_per_minute"] == "0.02000"
    assert view["longest_call_seconds"] == 500 * 60  # $10.00 at $0.02 per started minute
    acme.post_usage([call("c-1", seconds=70)])  # $9.96 left
    longest = acme.client.get("/v1/accounts/acme", headers=auth()).json()["longest_call_seconds"]
    balance_now = balance(acme)
    assert longest == longest_call(balance_now, dialer) == 498 * 60
    assert rate_time(longest, dialer).cost <= balance_now < rate_time(longest + 1, dialer).cost


def test_an_account_without_money_can_make_no_call(acme: Api):
    adjust_balance(acme.db, "acme", -1_100_000, reason="test", actor="Jane Doe", clock=acme.clock)
    view = acme.client.get("/v1/accounts/acme", headers=auth()).json()
    assert view["balance"] == "-1.00000"
    assert view["longest_call_seconds"] == 0


def test_due_since_shows_when_usage_took_the_balance_under_the_threshold(api: Api, stripe_client):
    busy_account(api.db, api.settings, api.clock, stripe_client, "pm_card_visa")
    assert api.client.get("/v1/accounts/acme", headers=auth()).json()["due_since"] is None
    api.clock.advance(timedelta(minutes=5))
    # The daemon marks due accounts after the usage request (off the request thread); do it here for certain.
    api.daemon.runtime().recharges.mark_due({"acme"}, None, timedelta(0))
    view = api.client.get("/v1/accounts/acme", headers=auth()).json()
    assert view["due_since"].replace("Z", "+00:00") == api.clock.now().isoformat()


def test_an_account_with_auto_recharge_off_says_so(acme: Api):
    view = acme.client.get("/v1/accounts/acme", headers=auth()).json()
    assert (view["auto_recharge"], view["decision"], view["decision_reason"]) == (False, "skip", "auto_recharge_off")
    assert view["runway_days"] is None  # no usage to wear the balance down


ODD_IDS = [
    "nobody",
    "ACME",  # ids are case-sensitive
    "acme%20",
    "x" * 64,
    "x" * 65,
    "x" * 5000,
    "a%2Fb",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e",
    "acme%00",
    "%00",
    "%F0%9F%92%A9",
    "%C3%A9",
    "%FF",
    "acme%0A",
    "%25",
    "acme';drop table accounts;--",
]


def test_unknown_account_ids_are_404(acme: Api):
    for path in ODD_IDS:
        response = acme.client.get(f"/v1/accounts/{path}", headers=auth())
        assert response.status_code == 404, path
        assert response.json()["error"]["status"] == 404, path
    assert acme.client.get("/v1/accounts/acme", headers=auth()).status_code == 200


def test_account_reads_need_a_bearer_token(acme: Api):
    missing = acme.client.get("/v1/accounts/acme")
    assert missing.status_code == 401
    assert "www-authenticate" in missing.headers
    assert acme.client.get("/v1/accounts/acme", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert acme.client.get("/v1/accounts/nobody").status_code == 401  # no hint whether an account exists


# --- ops: /livez /readyz /healthz /metrics ----------------------------------------------------------------------


def test_livez_fails_while_the_scheduler_is_not_running(api: Api):
    response = api.client.get("/livez")
    assert response.status_code == 503
    assert response.json() == {"status": "fail", "output": "the scheduler is not running"}


def test_readyz_passes_at_the_current_schema(api: Api):
    response = api.client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "pass"


def test_readyz_fails_when_the_schema_is_not_current(api: Api):
    with api.db.transaction() as s:
        s.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    response = api.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "fail"
    assert response.json()["output"] == "the database schema is not current: run `recharged db upgrade`"
    # an open endpoint names no database address: it went to the log
    assert api.db.url not in response.text
    assert "sqlite" not in response.text
    assert "postgresql" not in response.text


def test_readyz_fails_once_the_daemon_is_stopping(api: Api):
    api.daemon.stop()
    response = api.client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "fail", "output": "stopping"}
    assert api.client.get("/livez").status_code == 200  # stopping on purpose: no reason to restart it


def test_healthz_is_health_json_with_every_check(api: Api):
    response = api.client.get("/healthz", headers=auth())  # in full: a token holder's view
    assert response.headers["content-type"] == "application/health+json"
    report = response.json()
    assert {"database:responseTime", "scheduler:running", "cycle:age", "payments:lastCall"} <= set(report["checks"])
    for name, entries in report["checks"].items():
        assert entries, name
        assert all(entry["status"] in ("pass", "warn", "fail") for entry in entries), name
    [database] = report["checks"]["database:responseTime"]
    assert database["status"] == "pass"
    assert database["observedUnit"] == "ms"
    assert database["observedValue"] >= 0
    [scheduler] = report["checks"]["scheduler:running"]
    assert (scheduler["status"], scheduler["observedValue"]) == ("fail", False)
    [cycle] = report["checks"]["cycle:age"]
    assert (cycle["status"], cycle["observedValue"], cycle["observedUnit"]) == ("pass", 0, "s")
    assert cycle["output"] == "no successful cycle yet since start"
    [payments] = report["checks"]["payments:lastCall"]
    assert (payments["status"], payments["output"]) == ("pass", "no call yet")
    # The scheduler is not running in these tests: the service as a whole fails, and says so with a 503.
    assert report["status"] == "fail"
    assert response.status_code == 503
    assert report["version"] == "1"


def cycle_check(api: Api) -> dict[str, Any]:
    [check] = api.client.get("/healthz", headers=auth()).json()["checks"]["cycle:age"]
    return check


def record_cycle(api: Api, finished_at, status: str = "succeeded") -> None:
    with api.db.transaction() as s:
        run = start_job_run(s, "cycle", "test:1", finished_at - timedelta(minutes=1))
        finish_job_run(s, run, status, finished_at, {"charged": 0}, None)


def test_cycle_age_warns_past_one_interval_plus_grace_and_fails_past_two(api: Api):
    daemon = api.settings.daemon
    allowed = timedelta(hours=daemon.cycle_interval_hours) + timedelta(
        seconds=daemon.misfire_grace_seconds + daemon.cycle_jitter_seconds
    )
    finished = api.clock.now()
    record_cycle(api, finished)
    expected = [
        (timedelta(0), "pass"),
        (allowed, "pass"),
        (allowed + timedelta(seconds=1), "warn"),
        (2 * allowed, "warn"),
        (2 * allowed + timedelta(seconds=1), "fail"),
    ]
    for age, status in expected:
        api.clock.set(finished + age)
        check = cycle_check(api)
        assert (check["status"], check["observedValue"]) == (status, age.total_seconds()), age
        assert check["output"] == "last successful cycle"
        assert check["time"].replace("Z", "+00:00") == finished.isoformat()


def test_cycle_age_counts_from_the_last_successful_cycle_only(api: Api):
    now = api.clock.now()
    record_cycle(api, now - timedelta(hours=5))
    record_cycle(api, now - timedelta(minutes=10), status="failed")
    check = cycle_check(api)
    assert check["observedValue"] == 5 * 3600
    assert check["status"] == "warn"


def test_cycle_age_before_any_cycle_counts_from_the_start(api: Api):
    api.clock.advance(timedelta(hours=10))
    check = cycle_check(api)
    assert (check["status"], check["observedValue"]) == ("fail", 10 * 3600)
    assert check["time"] is None


@contextlib.contextmanager
def database_down(api: Api) -> Iterator[None]:
    """The database refuses new connections (the daemon's pooled ones are closed) until the block ends."""
    api.db.engine.dispose()
    url = make_url(api.db.url)
    if api.db.dialect == "sqlite":
        path = Path(url.database)
        path.rename(path.with_suffix(".away"))
        path.mkdir()  # a directory where the file was: SQLite cannot open it
        try:
            yield
        finally:
            path.rmdir()
            path.with_suffix(".away").rename(path)
        return
    admin = os.environ["RECHARGED_TEST_POSTGRES_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{url.database}" WITH ALLOW_CONNECTIONS false')
        try:
            yield
        finally:
            conn.execute(f'ALTER DATABASE "{url.database}" WITH ALLOW_CONNECTIONS true')


def test_without_the_database_health_fails_and_the_api_answers_503(acme: Api):
    with database_down(acme):
        health = acme.client.get("/healthz", headers=auth())
        assert health.status_code == 503
        report = health.json()
        [database] = report["checks"]["database:responseTime"]
        assert database["status"] == "fail"
        assert database["output"]
        [cycle] = report["checks"]["cycle:age"]
        assert (cycle["status"], cycle["output"]) == ("warn", "unknown: the database cannot be read")
        assert all(entry["status"] in ("warn", "fail") for entry in report["checks"].get("smtp:lastDelivery", []))
        assert acme.client.get("/readyz").status_code == 503
        for response in (
            acme.post_usage([call("c-1")]),
            acme.client.get("/v1/accounts/acme", headers=auth()),
        ):
            assert response.status_code == 503
            assert response.json()["error"]["message"] == "the database is unavailable; try again later"
            assert response.headers["retry-after"]
    assert acme.post_usage([call("c-1")]).json()["accepted"] == 1  # and all is well once it is back


def test_metrics_are_prometheus_text_with_the_recharged_prefix(api: Api):
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert families
    assert all(name.startswith("recharged_") for name in families)
    expected = {
        "recharged_cycles": "counter",
        "recharged_cycle_duration_seconds": "histogram",
        "recharged_last_successful_cycle_timestamp_seconds": "gauge",
        "recharged_charges": "counter",
        "recharged_declines": "counter",
        "recharged_credited_amount": "counter",
        "recharged_usage_events": "counter",
        "recharged_webhooks": "counter",
        "recharged_decisions": "counter",
        "recharged_payment_retries": "counter",
    }
    assert {name: families[name].type for name in expected} == expected


def test_metrics_show_the_accounts_needing_attention_by_reason_and_the_outbox_backlog(api: Api):
    def gauges() -> dict[tuple[str, str], float]:
        found = {}
        for family in text_string_to_metric_families(api.client.get("/metrics").text):
            for sample in family.samples:
                if sample.name.startswith(("recharged_accounts_attention", "recharged_outbox_")):
                    found[(sample.name, next(iter(sample.labels.values()), ""))] = sample.value
        return found

    reasons = ("backing_off", "suspended", "action_required", "disputed", "no_usable_card")
    statuses = ("pending", "sending", "failed")
    assert gauges() == {  # every series is there from the start, at 0, so an alert rule can compare it
        **{("recharged_accounts_attention", r): 0 for r in reasons},
        **{("recharged_outbox_messages", s): 0 for s in statuses},
        ("recharged_outbox_oldest_pending_seconds", ""): 0,
    }

    accounts = {  # id: (auto-recharge, state, its cards: usable or not)
        "later": (True, "backing_off", [True]),
        "broke": (True, "suspended", []),  # no card either: one reason each, the state first
        "auth": (True, "action_required", [True]),
        "fight": (False, "disputed", [True]),
        "nocard": (True, "ok", []),
        "lost": (True, "ok", [False]),
        "fine": (True, "ok", [False, True]),
        "off": (False, "ok", []),  # needs no card
        "gone": (False, "suspended", []),  # closed: needs nobody
    }
    for account_id in accounts:
        add_account(api.db, api.settings, api.clock, account_id)
    card = {"customer": "cus_1", "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030}
    with api.db.transaction() as s:
        for account_id, (auto, state, cards) in accounts.items():
            row = s.get(Account, account_id)
            row.auto_recharge, row.recharge_state = auto, state
            for n, usable in enumerate(cards):
                s.add(
                    FundingSource(
                        account_id=account_id,
                        payment_method=f"pm_{account_id}_{n}",
                        unusable_reason=None if usable else "lost_card",
                        added_at=NOW,
                        **card,
                    )
                )
        s.get(Account, "gone").closed_at, s.get(Account, "gone").closed_reason = NOW, "left us"
        for n, (status, queued) in enumerate(
            [
                ("pending", NOW - timedelta(hours=2)),
                ("pending", NOW - timedelta(minutes=10)),
                ("sending", NOW - timedelta(hours=3)),
                ("failed", NOW - timedelta(days=1)),
                ("failed", NOW - timedelta(days=2)),
                ("sent", NOW - timedelta(days=3)),
            ]
        ):
            s.add(
                OutboxMessage(
                    key=f"m{n}",
                    kind="receipt",
                    to_address="x@example.com",
                    context={},
                    created_at=queued,
                    status=status,
                    next_attempt_at=queued,
                )
            )

    assert gauges() == {
        ("recharged_accounts_attention", "backing_off"): 1,
        ("recharged_accounts_attention", "suspended"): 1,
        ("recharged_accounts_attention", "action_required"): 1,
        ("recharged_accounts_attention", "disputed"): 1,
        ("recharged_accounts_attention", "no_usable_card"): 2,
        ("recharged_outbox_messages", "pending"): 2,
        ("recharged_outbox_messages", "sending"): 1,
        ("recharged_outbox_messages", "failed"): 2,
        ("recharged_outbox_oldest_pending_seconds", ""): 2 * 3600,
    }
    api.clock.advance(timedelta(minutes=1))  # read at each scrape, as of then
    assert api.metric("recharged_outbox_oldest_pending_seconds") == 2 * 3600 + 60


def test_metrics_answer_without_the_database_leaving_out_what_it_holds(api: Api):
    with database_down(api):
        response = api.client.get("/metrics")
        assert response.status_code == 200
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert "recharged_cycles" in names
        assert not names & {"recharged_accounts_attention", "recharged_outbox_messages"}
    assert api.metric("recharged_outbox_messages", status="pending") == 0  # back with the database


def test_ops_endpoints_need_no_token(api: Api):
    for path in ("/livez", "/readyz", "/healthz", "/metrics", "/openapi.json"):
        assert api.client.get(path).status_code != 401, path


def failed_processor_call(api: Api, backend) -> str:
    """A real call to the processor that fails, heard by the daemon's health as `recharged run` wires it (the
    gateway's `on_call`); returns the payment method the error names."""
    record = api.daemon.health.processor.record
    gateway = StripeGateway(backend.key, api_base=backend.url, max_retries=0, on_call=record)
    card = card_on_file(backend, "pm_card_visa")
    with pytest.raises(PaymentError, match="is not attached to customer cus_someone_else"):
        gateway.card("cus_someone_else", card.payment_method)
    return card.payment_method


def test_healthz_shows_anyone_each_checks_status_only_and_a_token_holder_the_details(acme: Api, stripe_client):
    """Issue 13 item 11: the unauthenticated /healthz showed a card's payment method, the processor's error text
    and the database's host and port. Those go to a token holder (`recharged status`) and to the log."""
    payment_method = failed_processor_call(acme, stripe_client)
    url = make_url(acme.db.url)
    details = [payment_method, "cus_someone_else", "not attached", "OperationalError"]
    details += [f"{url.host}", f"{url.port}"] if url.port else []
    with database_down(acme), structlog.testing.capture_logs() as logged:
        public = acme.client.get("/healthz")
        detailed = acme.client.get("/healthz", headers=auth())

    assert public.status_code == detailed.status_code == 503
    assert public.headers["content-type"] == "application/health+json"
    shown = public.json()
    assert set(shown) == {"status", "version", "description", "checks"}
    assert shown["status"] == "fail"
    full = detailed.json()["checks"]
    assert shown["checks"] == {name: [{"status": e["status"]} for e in entries] for name, entries in full.items()}
    assert [detail for detail in details if detail in public.text] == []
    assert acme.client.get("/healthz", headers=auth("not-our-token-0123456789")).status_code == 401

    [payments] = full["payments:lastCall"]
    assert payments["status"] == "warn"
    assert f"payment method {payment_method} is not attached to customer cus_someone_else" in payments["output"]
    [database] = full["database:responseTime"]
    assert database["status"] == "fail"
    assert "OperationalError" in database["output"]
    if url.port:
        assert str(url.port) in database["output"]
    # The log has the details too, once per change of a check rather than once per probe.
    changes = [(e["check"], e["status"], e["output"]) for e in logged if e["event"] == "health.check"]
    assert [c for c in changes if c[0] == "payments:lastCall"] == [("payments:lastCall", "warn", payments["output"])]
    assert [c for c in changes if c[0] == "database:responseTime"] == [
        ("database:responseTime", "fail", database["output"])
    ]


@contextlib.contextmanager
def served(api: Api) -> Iterator[int]:
    """A real HTTP server on a free port handing each GET, with its Authorization header, to the daemon's app:
    what `recharged status` asks over HTTP. Yields the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            token = self.headers.get("Authorization")
            answer = api.client.get(self.path, headers={"Authorization": token} if token else {})
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers["content-type"])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_recharged_status_shows_the_daemons_health_details_when_it_has_the_token(
    acme: Api, stripe_client, monkeypatch: pytest.MonkeyPatch
):
    payment_method = failed_processor_call(acme, stripe_client)
    with served(acme) as port:
        settings = load_settings(None, environ={"RECHARGED_HTTP__PORT": str(port)})
        answer = ask_daemon(settings, timeout=10)  # RECHARGED_API_TOKENS holds the daemon's token
        monkeypatch.delenv("RECHARGED_API_TOKENS")
        anonymous = ask_daemon(settings, timeout=10)

    assert (answer.answered, answer.detailed) == (True, True)
    [payments] = [c for c in answer.checks if c.name == "payments:lastCall"]
    assert payments.status == "warn"
    assert payment_method in str(payments.output)
    shown = status_report(acme.db, acme.settings, acme.clock.now(), answer).as_json()["daemon"]
    assert shown["details_shown"] is True
    assert payment_method in shown["checks"]["payments:lastCall"]["output"]

    assert (anonymous.answered, anonymous.detailed, anonymous.health) == (True, False, answer.health)
    assert [(c.name, c.status, c.output) for c in anonymous.checks] == [(c.name, c.status, None) for c in answer.checks]
    assert payment_method not in json.dumps(
        status_report(acme.db, acme.settings, acme.clock.now(), anonymous).as_json()
    )


# --- OpenAPI -----------------------------------------------------------------------------------------------------


def test_openapi_documents_the_api(api: Api):
    response = api.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert {"post"} <= set(paths["/v1/usage"])
    assert {"get"} <= set(paths["/v1/accounts/{account_id}"])
    assert {"post"} <= set(paths["/v1/webhooks/stripe"])
    usage = paths["/v1/usage"]["post"]
    assert "application/json" in usage["requestBody"]["content"]
    assert {"200", "401", "413", "422"} <= set(usage["responses"])
    account = paths["/v1/accounts/{account_id}"]["get"]
    assert {"200", "401", "404"} <= set(account["responses"])
    assert "longest_call_seconds" in document["components"]["schemas"]["AccountView"]["properties"]


def test_docs_load_everything_from_the_daemon_itself(api: Api):
    """Issue 14, item 9: /docs loaded Swagger UI from a CDN, so it was blank offline. Every script, stylesheet and
    icon it names is served by the daemon."""
    page = api.client.get("/docs")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert assets, page.text
    for asset in assets:
        assert asset.startswith("/"), f"{asset} is not on this server"
        response = api.client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 500, asset  # the real files, not an error page
    assert "/openapi.json" in page.text


# --- unknown routes and methods -----------------------------------------------------------------------------


def test_unknown_paths_and_methods_are_json_4xx(api: Api):
    assert api.client.get("/v1/nothing").status_code == 404
    assert api.client.get("/v1/nothing").json()["error"]["status"] == 404
    response = api.client.get("/v1/usage", headers=auth())
    assert response.status_code == 405
    assert response.json()["error"]["status"] == 405
    assert api.client.delete("/v1/accounts/acme", headers=auth()).status_code == 405
