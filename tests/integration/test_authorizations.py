"""Call authorizations (issue 16): the longest call the available money pays for, held until the call's usage
settles it, the dialer releases it or it expires; concurrent calls never hold more than is available. Over the
HTTP API (TestClient, and a real uvicorn server for the concurrent requests), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
import uvicorn
from sqlalchemy import event, func, select, update

from recharged.accounts import close_account
from recharged.authorizations import expire_due
from recharged.daemon.http import create_app
from recharged.planning import plan_accounts
from recharged.status import DaemonAnswer, status_report
from recharged.store.models import Account, Authorization, Entry
from recharged.usage import UsageRecorder, import_csv
from recharged.verify import verify
from tests.helpers import Api, add_account, call

DIALER = "dialer-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
OPS = "ops-token-0123456789abcdef"
TOKENS = f"dialer:usage:write:{DIALER},viewer:accounts:read:{READER},ops:admin:{OPS}"


def auth(token: str = DIALER) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(make_api) -> Api:
    api = make_api(tokens=TOKENS)
    add_account(api.db, api.settings, api.clock, "acme", opening_balance="10")  # $0.02 a minute, per minute
    return api


def ask(api: Api, call_id: str, account: str = "acme", **extra: Any):
    body = {"account_id": account, "kind": "dialer", "call_id": call_id, **extra}
    return api.client.post("/v1/authorizations", json=body, headers=auth())


def held(api: Api, account: str = "acme") -> tuple[int, int, int]:
    """(balance, accounts.reserved, the sum of the open authorizations) in Units."""
    with api.db.reading() as s:
        balance, reserved = s.execute(select(Account.balance, Account.reserved).where(Account.id == account)).one()
        open_sum = s.scalar(
            select(func.coalesce(func.sum(Authorization.reserved_amount), 0)).where(
                Authorization.account_id == account, Authorization.status == "open"
            )
        )
    return balance, reserved, int(open_sum)


def test_a_call_is_authorized_for_as_long_as_the_available_money_pays_and_that_money_is_held(api: Api):
    first = ask(api, "c-1")
    assert first.status_code == 201, first.text
    body = first.json()
    # $10.00 pays 500 minutes; no length asked: [authorizations] max_seconds (2 hours) at most
    assert (body["authorized_seconds"], body["reserved_amount"], body["currency"]) == (7200, "2.40000", "USD")
    assert body["status"] == "open"
    assert body["expires_at"] == "2026-11-22T14:05:00Z"  # its length and the 300-second grace
    short = ask(api, "c-2", requested_seconds=90).json()
    assert (short["authorized_seconds"], short["reserved_amount"]) == (90, "0.04000")  # 90 s bill as 2 minutes
    assert held(api) == (1_000_000, 244_000, 244_000)  # the ledger untouched, $2.44 held

    view = api.client.get("/v1/accounts/acme", headers=auth(READER)).json()
    assert (view["balance"], view["reserved"], view["available"]) == ("10.00000", "2.44000", "7.56000")
    assert view["longest_call_seconds"] == 378 * 60  # what $7.56 pays, not $10.00

    again = ask(api, "c-1")  # the same call again: its first authorization, nothing more held
    assert again.status_code == 200
    assert again.json() == body
    assert held(api)[1] == 244_000


def test_what_is_not_available_is_refused_with_a_reason_and_nothing_held(api: Api):
    ask(api, "big", requested_seconds=30_000)  # 500 minutes: all of the $10.00
    before = held(api)
    refused = ask(api, "c-2")
    assert refused.status_code == 402
    assert refused.json()["error"]["reason"] == "insufficient_balance"
    assert "0.00000 USD available" in refused.json()["error"]["message"]
    assert held(api) == before
    with api.db.reading() as s:
        assert s.scalar(select(func.count()).select_from(Authorization)) == 1
    for bad, status in (
        ({"kind": "sms_out"}, 422),  # billed per segment: not a call
        ({"kind": "telex"}, 422),
        ({"account_id": "ghost"}, 404),
        ({"requested_seconds": 0}, 422),
    ):
        assert ask(api, "c-3", **bad).status_code == status, bad
    assert ask(api, "with space").status_code == 422
    assert (
        api.client.post(
            "/v1/authorizations", json={"account_id": "acme", "kind": "dialer", "call_id": "x"}, headers=auth(READER)
        ).status_code
        == 403
    )
    assert held(api) == before


def test_the_calls_usage_settles_it_in_one_transaction_and_a_longer_call_is_debited_in_full(api: Api):
    authorization = ask(api, "c-1", requested_seconds=120).json()
    usage = {**call("cdr-1", seconds=300), "authorization_id": authorization["id"]}  # 5 minutes, 2 authorized
    assert api.post_usage([usage], token=DIALER).json()["accepted"] == 1
    assert held(api) == (1_000_000 - 10_000, 0, 0)  # $0.10 debited, nothing held any more
    settled = api.client.get(f"/v1/authorizations/{authorization['id']}", headers=auth()).json()
    assert (settled["status"], settled["usage_event_id"]) == ("settled", "cdr-1")
    # the same usage again is a duplicate; another event naming the settled authorization is usage only
    assert api.post_usage([usage], token=DIALER).json()["duplicate"] == 1
    assert (
        api.post_usage([{**call("cdr-2"), "authorization_id": authorization["id"]}], token=DIALER).json()["accepted"]
        == 1
    )
    assert held(api)[1:] == (0, 0)
    assert verify(api.db).ok


def test_usage_naming_no_authorization_or_another_accounts_is_rejected(api: Api):
    add_account(api.db, api.settings, api.clock, "bolt", opening_balance="10")
    bolts = ask(api, "b-1", account="bolt").json()
    answer = api.post_usage(
        [
            {**call("cdr-1"), "authorization_id": 999_999},
            {**call("cdr-2"), "authorization_id": bolts["id"]},
            {**call("cdr-3"), "authorization_id": "abc"},
        ],
        token=DIALER,
    ).json()
    assert [r["status"] for r in answer["results"]] == ["rejected", "rejected", "rejected"]
    assert "is no authorization" in answer["results"][0]["reason"]
    assert "another account's" in answer["results"][1]["reason"]
    assert "whole number" in answer["results"][2]["reason"]
    assert held(api)[0] == 1_000_000
    assert held(api, "bolt")[1] == 240_000


def test_a_csv_import_settles_authorizations_too_over_several_batches(api: Api, tmp_path):
    ids = [ask(api, f"c-{n}", requested_seconds=60).json()["id"] for n in range(5)]
    assert held(api)[1] == 5 * 2_000
    rows = [f"cdr-{n},acme,dialer,2026-11-22T11:00:00Z,45,,,,{i}" for n, i in enumerate(ids)]
    rows.append("cdr-x,acme,dialer,2026-11-22T11:00:00Z,45,,,,999999")  # no such authorization: rejected
    path = tmp_path / "cdrs.csv"
    path.write_text(
        "event_id,account_id,kind,started_at,duration_seconds,quantity,text,cost,authorization_id\n"
        + "\n".join(rows)
        + "\n"
    )
    result = import_csv(UsageRecorder(api.db, api.settings, api.clock), path, batch_size=2)  # three batches
    assert (result.accepted, result.rejected) == (5, 1)
    assert held(api) == (1_000_000 - 5 * 2_000, 0, 0)
    assert verify(api.db).ok


def test_release_expiry_and_extension(api: Api):
    one = ask(api, "c-1", requested_seconds=60).json()
    released = api.client.delete(f"/v1/authorizations/{one['id']}", headers=auth())
    assert released.status_code == 200
    assert released.json()["status"] == "released"
    assert api.client.delete(f"/v1/authorizations/{one['id']}", headers=auth()).json()["status"] == "released"
    assert held(api)[1] == 0

    two = ask(api, "c-2", requested_seconds=60).json()
    longer = api.client.post(f"/v1/authorizations/{two['id']}/extend", json={"requested_seconds": 600}, headers=auth())
    assert longer.status_code == 200, longer.text
    assert (longer.json()["authorized_seconds"], longer.json()["reserved_amount"]) == (600, "0.20000")
    assert longer.json()["expires_at"] == "2026-11-22T12:15:00Z"
    assert held(api)[1:] == (20_000, 20_000)
    too_long = api.client.post(
        f"/v1/authorizations/{two['id']}/extend", json={"requested_seconds": 86_400}, headers=auth()
    )
    assert too_long.status_code == 200
    assert too_long.json()["authorized_seconds"] == 500 * 60  # all of the $10.00 for this one call
    assert ask(api, "c-3").status_code == 402

    api.clock.advance(timedelta(seconds=500 * 60 + 301))  # past its length and the grace
    assert expire_due(api.db, api.clock) == 1
    assert api.client.get(f"/v1/authorizations/{two['id']}", headers=auth()).json()["status"] == "expired"
    assert held(api)[1:] == (0, 0)
    gone = api.client.post(f"/v1/authorizations/{two['id']}/extend", json={}, headers=auth())
    assert gone.status_code == 409
    # the call's usage arriving late still bills the call, and settles nothing
    late = {**call("cdr-2", seconds=60, at="2026-11-22T12:00:00Z"), "authorization_id": two["id"]}
    assert api.post_usage([late], token=DIALER).json()["accepted"] == 1
    assert held(api) == (1_000_000 - 2_000, 0, 0)


def test_an_account_expires_its_stale_reservations_when_it_authorizes_its_next_call(api: Api):
    ask(api, "c-1", requested_seconds=30_000)  # all of it
    assert ask(api, "c-2").status_code == 402
    api.clock.advance(timedelta(seconds=30_000 + 301))
    assert ask(api, "c-3", requested_seconds=60).status_code == 201  # no job needed
    assert held(api)[1:] == (2_000, 2_000)


def test_a_refusal_still_expires_the_stale_reservations_it_found(api: Api):
    ask(api, "c-1", requested_seconds=60)
    with api.db.transaction() as s:  # the balance spent meanwhile: nothing left once c-1 is gone either
        s.execute(update(Account).where(Account.id == "acme").values(balance=0))
        s.execute(update(Entry).where(Entry.account_id == "acme").values(amount=0))
    api.clock.advance(timedelta(seconds=60 + 301))
    assert ask(api, "c-2").status_code == 402
    assert held(api)[1:] == (0, 0)  # c-1 expired, and that was kept although c-2 was refused
    assert api.client.get("/v1/authorizations/1", headers=auth()).json()["status"] == "expired"


def test_a_settled_authorization_cannot_be_released(api: Api):
    one = ask(api, "c-1", requested_seconds=60).json()
    api.post_usage([{**call("cdr-1", seconds=30), "authorization_id": one["id"]}], token=DIALER)
    refused = api.client.delete(f"/v1/authorizations/{one['id']}", headers=auth())
    assert refused.status_code == 409
    assert "cdr-1" in refused.json()["error"]["message"]
    assert api.client.delete("/v1/authorizations/999999", headers=auth()).status_code == 404


def test_reserved_money_counts_as_spent_for_the_recharge_decision(api: Api):
    def decision():
        [plan] = [p for p in plan_accounts(api.db, api.settings, api.clock.now()) if p.account_id == "acme"]
        return plan.decision

    assert decision().balance == 1_000_000
    ask(api, "c-1", requested_seconds=30_000)  # every cent held for a call in progress
    assert decision().balance == 0
    assert decision().balance < decision().threshold  # a fully reserved balance is due


def test_verify_finds_reserved_money_its_authorizations_do_not_hold(api: Api):
    ask(api, "c-1", requested_seconds=60)
    assert verify(api.db).ok
    with api.db.transaction() as s:
        s.execute(update(Account).where(Account.id == "acme").values(reserved=5))
    report = verify(api.db)
    assert not report.ok
    assert any("reserved 0.00005, its open authorizations hold 0.02000" in p for p in report.violations)


@contextlib.contextmanager
def live(api: Api) -> Iterator[str]:
    """The daemon's app on a real uvicorn server on a free port, as `recharged run` serves it."""
    sock = socket.create_server(("127.0.0.1", 0))
    # as process.py configures it: uvicorn's own logging config would change the process's loggers for good
    config = uvicorn.Config(create_app(api.daemon), log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_fifty_concurrent_calls_never_hold_more_than_is_available(api: Api):
    with api.db.transaction() as s:  # $1.00 available: 25 calls of 2 minutes at $0.02
        s.execute(update(Account).where(Account.id == "acme").values(balance=100_000))
        s.execute(update(Entry).where(Entry.account_id == "acme").values(amount=100_000))
    answers: list[int] = []
    start = threading.Barrier(50)

    def dial(base: str, n: int) -> None:
        body = {"account_id": "acme", "kind": "dialer", "call_id": f"c-{n}", "requested_seconds": 120}
        with requests.Session() as session:
            start.wait()
            answers.append(session.post(f"{base}/v1/authorizations", json=body, headers=auth(), timeout=60).status_code)

    with live(api) as base:
        threads = [threading.Thread(target=dial, args=(base, n)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(set(answers)) == [201, 402]
    assert answers.count(201) == 25
    balance, reserved, open_sum = held(api)
    assert (balance, reserved, open_sum) == (100_000, 100_000, 100_000)
    assert verify(api.db).ok


def test_an_overdraft_lets_calls_go_below_zero_as_far_as_an_admin_allows(api: Api):
    assert ask(api, "c-1", requested_seconds=30_000).status_code == 201  # all of the $10.00
    assert ask(api, "c-2").status_code == 402
    for bad in ("-1", "abc", "0.000001"):
        refused = api.client.patch("/v1/accounts/acme", json={"overdraft": bad, "actor": "Jane Doe"}, headers=auth(OPS))
        assert refused.status_code == 422, bad
        assert "overdraft" in refused.json()["error"]["message"]
    changed = api.client.patch("/v1/accounts/acme", json={"overdraft": "1.00", "actor": "Jane Doe"}, headers=auth(OPS))
    assert changed.status_code == 200
    assert (changed.json()["overdraft"], changed.json()["available"]) == ("1.00000", "1.00000")
    more = ask(api, "c-2")
    assert (more.status_code, more.json()["authorized_seconds"]) == (201, 50 * 60)  # $1.00 at $0.02 a minute
    trail = api.client.get("/v1/accounts/acme/audit", headers=auth(OPS)).json()["data"]
    assert (trail[0]["before"], trail[0]["after"]) == ({"overdraft": "0.00000"}, {"overdraft": "1.00000"})


def test_status_and_metrics_show_the_calls_in_progress(api: Api):
    ask(api, "c-1", requested_seconds=120)
    two = ask(api, "c-2", requested_seconds=30_000).json()  # all the $9.96 left: 498 minutes
    ask(api, "c-3")  # refused: nothing left
    ask(api, "c-1", requested_seconds=120)  # the same call again
    longer = api.client.post(
        f"/v1/authorizations/{two['id']}/extend", json={"requested_seconds": 40_000}, headers=auth()
    )
    assert longer.status_code == 402  # refused too: no more money
    add_account(api.db, api.settings, api.clock, "birch")
    close_account(api.db, "birch", reason="moved away", actor="Jane Doe", clock=api.clock)
    assert ask(api, "c-4", account="birch").json()["error"]["reason"] == "account_closed"

    def calls() -> dict[str, Any]:
        report = status_report(api.db, api.settings, api.clock.now(), DaemonAnswer(None, False, error="not asked"))
        return dict(report.as_json()["calls"])

    assert calls() == {
        "open_authorizations": {"USD": 2},
        "held": {"USD": "10.00000"},
        "expired_last_24h": 0,
        "refused_last_24h": {"account_closed": 1, "insufficient_balance": 2},
    }
    api.clock.advance(timedelta(hours=25))
    assert calls()["refused_last_24h"] == {}
    metrics = api.client.get("/metrics").text
    assert 'recharged_authorizations_total{outcome="granted"} 2.0' in metrics
    assert 'recharged_authorizations_total{outcome="refused"} 3.0' in metrics
    assert 'recharged_authorizations_total{outcome="repeated"} 1.0' in metrics
    assert 'recharged_authorizations_open{currency="USD"} 2.0' in metrics
    assert 'recharged_reserved_amount{currency="USD"} 10.0' in metrics


def test_the_dialers_balance_read_is_one_row_and_counts_what_calls_hold(api: Api):
    ask(api, "c-1", requested_seconds=120)
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    engine = api.db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        read = api.client.get("/v1/accounts/acme/balance", headers=auth())
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert read.status_code == 200
    assert read.json() == {
        "account_id": "acme",
        "currency": "USD",
        "balance": "10.00000",
        "reserved": "0.04000",
        "overdraft": "0.00000",
        "available": "9.96000",
        "kind": "dialer",
        "longest_call_seconds": 498 * 60,
        "status": "open",
    }
    ours = [s for s in statements if "accounts" in s]
    assert len(ours) == 1, statements  # the account's row by its primary key, nothing else
    assert (
        api.client.get("/v1/accounts/acme/balance?kind=sms_out", headers=auth(READER)).json()["longest_call_seconds"]
        is None
    )
    assert api.client.get("/v1/accounts/ghost/balance", headers=auth()).status_code == 404
    assert api.client.get("/v1/accounts/acme/balance").status_code == 401


@pytest.mark.parametrize(
    ("currency", "rate", "opening", "authorized", "reserved", "left"),
    [
        # 3 yen a minute in 6-second steps plus a 1 yen connect fee: 100 yen pay 330 steps
        ("JPY", "price_per_minute = 3\nincrement_seconds = 6\nconnect_fee = 1\n", "100", 1980, "100.00000", 9_600_000),
        # 0.015 KWD a minute by the second: 1.000 KWD pay 4,000 seconds
        ("KWD", "price_per_minute = 0.015\nincrement_seconds = 1\n", "1.000", 4000, "1.00000", 98_500),
    ],
)
def test_authorizations_in_a_zero_and_a_three_decimal_currency_are_exact(
    make_api, currency, rate, opening, authorized, reserved, left
):
    amounts = (
        ""
        if currency == "JPY"
        else (
            f'[recharge.currencies.{currency}]\nmin_threshold = 0\nmin_recharge = 0\nmax_recharge = "off"\n'
            'max_charged_per_day = "off"\nmax_charged_per_30_days = "off"\n\n'
        )
    )
    config = f'{amounts}[plans.standard]\ncurrency = "{currency}"\n\n[plans.standard.rates.dialer]\nmeasure = "time"\n'
    api = make_api(tokens=TOKENS, config=config + rate)
    add_account(api.db, api.settings, api.clock, "acme", opening_balance=opening)
    whole = ask(api, "c-1").json()
    assert (whole["authorized_seconds"], whole["reserved_amount"], whole["currency"]) == (
        authorized,
        reserved,
        currency,
    )
    assert ask(api, "c-2").status_code == 402  # nothing left
    api.client.delete(f"/v1/authorizations/{whole['id']}", headers=auth())
    short = ask(api, "c-3", requested_seconds=60).json()
    usage = {**call("cdr-1", seconds=60), "authorization_id": short["id"]}
    assert api.post_usage([usage], token=DIALER).json()["accepted"] == 1
    # a minute's call: 1 yen + 10 steps of 0.3 yen = 4 yen; 0.015 KWD. Nothing held any more.
    assert held(api) == (left, 0, 0)
    assert verify(api.db).ok
