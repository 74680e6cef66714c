"""The billing page's HTTP API (issue 15): accounts, automatic recharge, one-time purchases with idempotency keys,
recharges, funding sources, receipts, statements, the ledger, daily usage, the audit trail and adjustments, with
scoped tokens. Through FastAPI's TestClient on the daemon as `recharged run` builds it, on SQLite and PostgreSQL,
with the real Stripe SDK talking to the local Stripe-compatible server.

Every refused request (401, 403, 404, 409, 413, 415, 422) is checked to leave the database as it was.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import structlog.testing
from sqlalchemy import func, select

from recharged.errors import ConfigError
from recharged.logs import redact
from recharged.states import RechargeKind
from recharged.store.models import (
    Account,
    ApiIdempotency,
    AuditRecord,
    Entry,
    FundingSource,
    OutboxMessage,
    Receipt,
    Recharge,
)
from recharged.tokens import configured_tokens, find_token, parse_tokens
from tests.helpers import Api, add_account, busy_account, card_on_file

ADMIN = "admin-token-0123456789abcdef"
BILLING = "billing-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
DIALER = "dialer-token-0123456789abcdef"
TOKENS = ",".join(
    [
        f"ops:admin:{ADMIN}",
        f"crm:billing:write+accounts:read:{BILLING}",
        f"viewer:accounts:read:{READER}",
        f"dialer:usage:write:{DIALER}",
    ]
)
ACTOR = "Jane Doe"


def auth(token: str = BILLING, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def snapshot(api: Api) -> dict[str, Any]:
    """Everything a refused request must leave alone: rows of every table money or settings live in."""
    with api.db.reading() as s:
        counts = {
            model.__tablename__: s.scalar(select(func.count()).select_from(model))
            for model in (Entry, Recharge, FundingSource, AuditRecord, OutboxMessage, Receipt, ApiIdempotency)
        }
        accounts = [
            (a.id, a.email, a.plan, str(a.vat_percent), a.balance, a.auto_recharge, a.closed_at, a.min_recharge)
            for a in s.scalars(select(Account).order_by(Account.id))
        ]
    return {"counts": counts, "accounts": accounts}


@pytest.fixture
def api(make_api) -> Api:
    return make_api(tokens=TOKENS)


@pytest.fixture
def acme(api: Api) -> Api:
    add_account(api.db, api.settings, api.clock, "acme", opening_balance="10")
    return api


def new_card(stripe_backend, test_card: str = "pm_card_visa", customer: str | None = None) -> dict[str, str]:
    info = card_on_file(stripe_backend, test_card, customer)
    return {"customer": info.customer, "payment_method": info.payment_method}


# --- tokens -----------------------------------------------------------------------------------------------------


def test_tokens_have_names_and_scopes_and_a_bare_secret_is_a_full_access_default():
    tokens = parse_tokens(
        f"dialer:usage:write+accounts:read:{DIALER}\n{ADMIN}, {READER}", "environment RECHARGED_API_TOKENS"
    )
    assert [(t.name, sorted(t.scopes), t.legacy) for t in tokens] == [
        ("dialer", ["accounts:read", "usage:write"], False),
        ("default", ["admin"], True),
        ("default-2", ["admin"], True),
    ]
    assert find_token(tokens, DIALER) is tokens[0]
    assert find_token(tokens, READER) is tokens[2]
    assert find_token(tokens, "nope-nope-nope-nope") is None
    assert tokens[0].allows("usage:write")
    assert not tokens[0].allows("billing:write")
    assert tokens[1].allows("billing:write")  # admin is everything
    assert DIALER not in repr(tokens)
    assert DIALER.encode() not in b"".join(t.digest for t in tokens)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"crm:billing:wrte:{BILLING}", "unknown scope 'billing:wrte'"),
        (f"crm:billing:write:{BILLING},crm:admin:{ADMIN}", "the name 'crm' is given to more than one token"),
        ("crm:admin:short", "at least 16 characters"),
        (f"crm:{BILLING}", "NAME:SCOPES:SECRET"),
        (f"cr m:admin:{BILLING}", "the name must be"),
        (f"a:admin:{BILLING},b:admin:{BILLING}", "two tokens have the same secret"),
    ],
)
def test_a_malformed_token_list_is_refused_without_showing_a_secret(value, message):
    with pytest.raises(ConfigError) as refused:
        parse_tokens(value, "environment RECHARGED_API_TOKENS")
    assert message in str(refused.value)
    assert BILLING not in str(refused.value)
    assert ADMIN not in str(refused.value)


def test_tokens_come_from_the_environment_or_the_credential(tmp_path):
    (tmp_path / "api_tokens").write_text(f"crm:accounts:read:{READER}\n")
    assert [t.name for t in configured_tokens({"CREDENTIALS_DIRECTORY": str(tmp_path)})] == ["crm"]
    assert configured_tokens({}) == ()


# --- 401 and 403, with nothing changed ----------------------------------------------------------------------------

CARD = {"customer": "cus_x", "payment_method": "pm_x", "actor": ACTOR}
WRITES = [
    (
        "post",
        "/v1/accounts",
        {"id": "newco", "email": "a@newco.example", "plan": "standard", "vat_percent": "20", "actor": ACTOR},
    ),
    ("patch", "/v1/accounts/acme", {"email": "new@acme.example", "actor": ACTOR}),
    ("put", "/v1/accounts/acme/auto-recharge", {"enabled": True, "actor": ACTOR}),
    ("post", "/v1/accounts/acme/topups", {"amount": "25", "actor": ACTOR}),
    ("post", "/v1/accounts/acme/funding-sources", CARD),
    ("post", "/v1/accounts/acme/funding-sources/1/default", {"actor": ACTOR}),
    ("post", "/v1/accounts/acme/funding-sources/1/reactivate", {"actor": ACTOR}),
    ("delete", "/v1/accounts/acme/funding-sources/1?actor=Jane%20Doe", None),
    ("post", "/v1/accounts/acme/close?reason=gone", {"actor": ACTOR}),
    ("post", "/v1/accounts/acme/adjustments", {"credit": "5", "reason": "goodwill", "actor": ACTOR}),
    ("post", "/v1/cycles", None),
]
ADMIN_ONLY = ("/adjustments", "/v1/cycles")
READS = [
    "/v1/accounts",
    "/v1/accounts/acme",
    "/v1/accounts/acme/recharges",
    "/v1/recharges/1",
    "/v1/accounts/acme/funding-sources",
    "/v1/accounts/acme/receipts",
    "/v1/receipts/R-000001",
    "/v1/accounts/acme/statements/2026-11",
    "/v1/accounts/acme/entries",
    "/v1/accounts/acme/usage",
    "/v1/accounts/acme/audit",
]


def _send(api: Api, method: str, path: str, body: Any, headers: dict[str, str]):
    return api.client.request(method.upper(), path, json=body, headers={**headers, "Idempotency-Key": "k-1"})


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[f"{m} {p}" for m, p, _ in WRITES])
def test_every_change_needs_a_token_with_its_scope_and_a_refusal_changes_nothing(acme: Api, method, path, body):
    before = snapshot(acme)
    missing = _send(acme, method, path, body, {})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert _send(acme, method, path, body, auth("unknown-token-0123456789")).status_code == 401
    for weak in (READER, DIALER) + ((BILLING,) if path.endswith(ADMIN_ONLY) else ()):
        refused = _send(acme, method, path, body, auth(weak))
        assert refused.status_code == 403, (weak, refused.text)
        assert "scope" in refused.json()["error"]["message"]
    if body is not None:
        token = ADMIN if path.endswith("/adjustments") else BILLING
        huge = _send(acme, method, path, {**body, "padding": "x" * 70_000}, auth(token))
        assert huge.status_code == 413, huge.text
        form = acme.client.request(
            method.upper(), path, content=b"actor=Jane", headers=auth(token, **{"Idempotency-Key": "k-1"})
        )
        assert form.status_code == 415
        unknown = _send(acme, method, path, {**body, "padding": "x"}, auth(token))
        assert unknown.status_code == 422
        assert "padding" in unknown.json()["error"]["message"]
    assert snapshot(acme) == before


@pytest.mark.parametrize("path", READS)
def test_every_read_needs_accounts_read(acme: Api, path):
    assert acme.client.get(path).status_code == 401
    refused = acme.client.get(path, headers=auth(DIALER))
    assert refused.status_code == 403
    assert "accounts:read" in refused.json()["error"]["message"]
    assert acme.client.get(path, headers=auth(READER)).status_code in (200, 404)


def test_changes_are_logged_with_the_tokens_name_never_the_token(acme: Api):
    with structlog.testing.capture_logs() as logged:
        acme.client.patch("/v1/accounts/acme", json={"email": "new@acme.example", "actor": ACTOR}, headers=auth())
        acme.client.patch("/v1/accounts/acme", json={"email": "x@acme.example", "actor": ACTOR}, headers=auth(READER))
    lines = [redact(None, "info", line) for line in logged if line["event"] == "http.request"]  # as logged
    assert [(line["caller"], line["status"]) for line in lines] == [("crm", 200), ("viewer", 403)]
    assert BILLING not in repr(logged)
    assert READER not in repr(logged)


def test_a_bare_secret_keeps_working_with_every_scope(make_api):
    api = make_api(tokens=ADMIN)
    add_account(api.db, api.settings, api.clock, "acme", opening_balance="10")
    response = api.client.post(
        "/v1/accounts/acme/adjustments",
        json={"credit": "1", "reason": "goodwill", "actor": ACTOR},
        headers=auth(ADMIN),
    )
    assert response.status_code == 201, response.text
    with api.db.reading() as s:
        assert s.scalars(select(AuditRecord.via).where(AuditRecord.action == "balance.adjusted")).one() == "api:default"


# --- accounts ---------------------------------------------------------------------------------------------------


def test_create_read_list_and_change_an_account(api: Api):
    body = {"id": "newco", "email": "billing@newco.example", "plan": "standard", "vat_percent": "20", "actor": ACTOR}
    created = api.client.post("/v1/accounts", json=body, headers=auth())
    assert created.status_code == 201, created.text
    view = created.json()
    assert (view["account_id"], view["currency"], view["balance"], view["status"]) == (
        "newco",
        "USD",
        "0.00000",
        "open",
    )
    assert view["auto_recharge"] is False
    assert view["overrides"]["min_recharge"] is None
    again = api.client.post("/v1/accounts", json=body, headers=auth())
    assert again.status_code == 200  # the same account again: nothing changed
    api.client.put("/v1/accounts/newco/auto-recharge", json={"enabled": True, "actor": ACTOR}, headers=auth())
    retried = api.client.post("/v1/accounts", json=body, headers=auth())
    assert retried.status_code == 200  # the body says nothing of automatic recharge, turned on since
    assert retried.json()["auto_recharge"] is True
    other = api.client.post("/v1/accounts", json={**body, "email": "other@newco.example"}, headers=auth())
    assert other.status_code == 409
    assert "newco" in other.json()["error"]["message"]

    changed = api.client.patch(
        "/v1/accounts/newco", json={"email": "new@newco.example", "actor": ACTOR}, headers=auth()
    )
    assert changed.status_code == 200
    assert changed.json()["email"] == "new@newco.example"
    assert api.client.get("/v1/accounts/newco", headers=auth(READER)).json()["email"] == "new@newco.example"

    for name in ("b-co", "c-co", "d-co"):
        add_account(api.db, api.settings, api.clock, name, opening_balance="100")
    first = api.client.get("/v1/accounts?limit=2", headers=auth(READER)).json()
    assert [a["id"] for a in first["data"]] == ["b-co", "c-co"]
    assert first["has_more"] is True
    rest = api.client.get("/v1/accounts?limit=2&starting_after=c-co", headers=auth(READER)).json()
    assert [a["id"] for a in rest["data"]] == ["d-co", "newco"]
    assert rest["has_more"] is False
    below = api.client.get("/v1/accounts?below_threshold=true", headers=auth(READER)).json()
    assert [a["id"] for a in below["data"]] == ["newco"]  # no balance; the others hold $100 with no usage
    assert below["data"][0]["below_threshold"] is True
    assert api.client.get("/v1/accounts?state=closed", headers=auth(READER)).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (
            {"id": "bad id", "email": "a@b.example", "plan": "standard", "vat_percent": "20"},
            422,
            "not a valid account id",
        ),
        ({"id": "x", "email": "nope", "plan": "standard", "vat_percent": "20"}, 422, "not an email address"),
        ({"id": "x", "email": "a@b.example", "plan": "gold", "vat_percent": "20"}, 422, "plan 'gold'"),
        ({"id": "x", "email": "a@b.example", "plan": "standard", "vat_percent": "120"}, 422, "vat_percent"),
        ({"id": "x", "email": "a@b.example", "plan": "standard", "vat_percent": "20", "colour": "red"}, 422, "colour"),
        ({"id": "x", "email": "a@b.example", "plan": "standard"}, 422, "vat_percent"),
    ],
)
def test_a_bad_account_is_refused_naming_the_field(api: Api, body, status, words):
    before = snapshot(api)
    response = api.client.post("/v1/accounts", json={**body, "actor": ACTOR}, headers=auth())
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    assert snapshot(api) == before


def test_changes_must_be_signed_by_a_first_and_last_name(acme: Api):
    before = snapshot(acme)
    for actor in ("", "Jane", "j4ne doe"):
        response = acme.client.put(
            "/v1/accounts/acme/auto-recharge", json={"enabled": True, "actor": actor}, headers=auth()
        )
        assert response.status_code == 422
        assert "first and last name" in response.json()["error"]["message"]
    assert snapshot(acme) == before


def test_auto_recharge_is_signed_audited_with_the_token_and_told_to_the_customer(acme: Api):
    response = acme.client.put(
        "/v1/accounts/acme/auto-recharge",
        json={"enabled": True, "min_recharge": "30", "window_days": 14, "actor": ACTOR},
        headers=auth(),
    )
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["auto_recharge"] is True
    assert view["overrides"]["min_recharge"] == "30.00000"
    assert view["overrides"]["window_days"] == 14
    # null puts a setting back to config.toml's; a contradiction changes nothing
    back = acme.client.put(
        "/v1/accounts/acme/auto-recharge", json={"enabled": True, "min_recharge": None, "actor": ACTOR}, headers=auth()
    )
    assert back.json()["overrides"]["min_recharge"] is None
    assert back.json()["overrides"]["window_days"] == 14
    before = snapshot(acme)
    bad = acme.client.put(
        "/v1/accounts/acme/auto-recharge",
        json={"enabled": True, "min_recharge": "500", "max_recharge": "100", "actor": ACTOR},
        headers=auth(),
    )
    assert bad.status_code == 422
    assert "min_recharge" in bad.json()["error"]["message"]
    assert snapshot(acme) == before

    trail = acme.client.get("/v1/accounts/acme/audit", headers=auth(READER)).json()["data"]
    assert trail[0]["actor"] == ACTOR
    assert trail[0]["via"] == "api:crm"
    assert trail[0]["action"] == "auto_recharge.changed"
    assert any(r["after"].get("auto_recharge") is True for r in trail)
    with acme.db.reading() as s:
        kinds = set(s.scalars(select(OutboxMessage.kind).where(OutboxMessage.account_id == "acme")))
    assert kinds  # the same customer notice as the CLI's


def test_close_and_reopen(acme: Api):
    closed = acme.client.post("/v1/accounts/acme/close?reason=left%20us", json={"actor": ACTOR}, headers=auth())
    assert closed.status_code == 200
    assert closed.json()["status"] == "closed"
    assert closed.json()["balance"] == "10.00000"
    before = snapshot(acme)
    again = acme.client.post("/v1/accounts/acme/close?reason=again", json={"actor": ACTOR}, headers=auth())
    assert again.status_code == 409
    bought = acme.client.post(
        "/v1/accounts/acme/topups", json={"amount": "10", "actor": ACTOR}, headers=auth(**{"Idempotency-Key": "a"})
    )
    assert bought.status_code == 409
    assert "closed" in bought.json()["error"]["message"]
    assert snapshot(acme) == before
    assert (
        acme.client.post("/v1/accounts/acme/reopen", json={"actor": ACTOR}, headers=auth()).json()["status"] == "open"
    )


def test_unknown_accounts_and_resources_are_404_and_change_nothing(acme: Api):
    before = snapshot(acme)
    for method, path, body in [
        ("get", "/v1/accounts/nobody", None),
        ("patch", "/v1/accounts/nobody", {"email": "a@b.example", "actor": ACTOR}),
        ("put", "/v1/accounts/nobody/auto-recharge", {"enabled": True, "actor": ACTOR}),
        ("post", "/v1/accounts/nobody/funding-sources", CARD),
        ("post", "/v1/accounts/acme/funding-sources/999/default", {"actor": ACTOR}),
        ("delete", "/v1/accounts/acme/funding-sources/999?actor=Jane%20Doe", None),
        ("get", "/v1/recharges/999", None),
        ("get", "/v1/receipts/R-999999", None),
        ("get", "/v1/accounts/nobody/entries", None),
        ("get", "/v1/accounts/nobody/audit", None),
        ("get", "/v1/accounts/nobody/receipts", None),
        ("get", "/v1/accounts/nobody/statements/2026-11", None),
        ("get", "/v1/accounts/nobody/usage", None),
        ("post", "/v1/accounts/nobody/adjustments", {"credit": "1", "reason": "r", "actor": ACTOR}),
        ("post", "/v1/accounts/nobody/topups", {"amount": "10", "actor": ACTOR}),
    ]:
        response = _send(acme, method, path, body, auth(ADMIN))
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["status"] == 404
    assert snapshot(acme) == before


def test_bodies_are_json_objects_within_the_size_limit(acme: Api):
    before = snapshot(acme)
    url = "/v1/accounts/acme/adjustments"
    not_json = acme.client.post(url, content=b"credit=5", headers=auth(ADMIN, **{"Content-Type": "text/plain"}))
    assert not_json.status_code == 415
    broken = acme.client.post(url, content=b'{"credit": ', headers=auth(ADMIN, **{"Content-Type": "application/json"}))
    assert broken.status_code == 400
    twice = b'{"credit": "1", "credit": "100", "reason": "r", "actor": "Jane Doe"}'
    assert (
        acme.client.post(url, content=twice, headers=auth(ADMIN, **{"Content-Type": "application/json"})).status_code
        == 400
    )
    assert acme.client.post(url, json=["credit"], headers=auth(ADMIN)).status_code == 422
    huge = {"credit": "1", "reason": "x" * 70_000, "actor": ACTOR}
    assert acme.client.post(url, json=huge, headers=auth(ADMIN)).status_code == 413
    assert snapshot(acme) == before


# --- adjustments ------------------------------------------------------------------------------------------------


def test_adjustments_are_admin_only_once_per_reference(acme: Api):
    url = "/v1/accounts/acme/adjustments"
    body = {"credit": "5", "reason": "goodwill", "reference": "T-1", "actor": ACTOR}
    first = acme.client.post(url, json=body, headers=auth(ADMIN))
    assert first.status_code == 201
    assert first.json() == {
        "account_id": "acme",
        "currency": "USD",
        "amount": "5.00000",
        "reference": "T-1",
        "recorded": True,
        "balance": "15.00000",
    }
    again = acme.client.post(url, json=body, headers=auth(ADMIN))
    assert again.status_code == 200
    assert again.json()["recorded"] is False
    assert again.json()["balance"] == "15.00000"
    before = snapshot(acme)
    other = acme.client.post(url, json={**body, "credit": "6"}, headers=auth(ADMIN))
    assert other.status_code == 409
    assert "T-1" in other.json()["error"]["message"]
    for bad in (
        {"reason": "r", "actor": ACTOR},
        {"credit": "1", "debit": "1", "reason": "r", "actor": ACTOR},
        {"credit": "-1", "reason": "r", "actor": ACTOR},
        {"debit": "-1", "reason": "r", "actor": ACTOR},
        {"credit": "1.000001", "reason": "r", "actor": ACTOR},
        {"credit": "NaN", "reason": "r", "actor": ACTOR},
    ):
        assert acme.client.post(url, json=bad, headers=auth(ADMIN)).status_code == 422, bad
    assert snapshot(acme) == before
    debit = acme.client.post(url, json={"debit": "2.5", "reason": "correction", "actor": ACTOR}, headers=auth(ADMIN))
    assert debit.status_code == 201
    assert debit.json()["balance"] == "12.50000"
    entries = acme.client.get("/v1/accounts/acme/entries?limit=2", headers=auth(READER)).json()
    assert entries["currency"] == "USD"
    assert [e["amount"] for e in entries["data"]] == ["-2.50000", "5.00000"]
    assert entries["has_more"] is True
    last = entries["data"][-1]["id"]
    rest = acme.client.get(f"/v1/accounts/acme/entries?starting_after={last}", headers=auth(READER)).json()
    assert [e["type"] for e in rest["data"]] == ["opening"]
    assert rest["has_more"] is False


# --- funding sources --------------------------------------------------------------------------------------------


def test_cards_are_checked_with_stripe_added_ordered_and_removed(acme: Api, stripe_backend):
    url = "/v1/accounts/acme/funding-sources"
    visa = new_card(stripe_backend)
    first = acme.client.post(url, json={**visa, "actor": ACTOR}, headers=auth())
    assert first.status_code == 201, first.text
    assert first.json()["default"] is True
    assert first.json()["card"].startswith("visa")
    master = new_card(stripe_backend, "pm_card_mastercard", visa["customer"])
    second = acme.client.post(url, json={**master, "actor": ACTOR}, headers=auth()).json()
    assert second["default"] is False
    before = snapshot(acme)
    twice = acme.client.post(url, json={**master, "actor": ACTOR}, headers=auth())
    assert twice.status_code == 409
    stranger = new_card(stripe_backend)  # another customer's card
    wrong = acme.client.post(url, json={**stranger, "customer": visa["customer"], "actor": ACTOR}, headers=auth())
    assert wrong.status_code == 422, wrong.text
    usable = acme.client.post(f"{url}/{second['source']}/reactivate", json={"actor": ACTOR}, headers=auth())
    assert usable.status_code == 422
    assert "usable already" in usable.json()["error"]["message"]
    assert snapshot(acme) == before

    made = acme.client.post(f"{url}/{second['source']}/default", json={"actor": ACTOR}, headers=auth())
    assert [(c["source"], c["default"]) for c in made.json()["data"]] == [
        (second["source"], True),  # charging order: the default first
        (first.json()["source"], False),
    ]
    removed = acme.client.delete(f"{url}/{second['source']}?actor=Jane%20Doe", headers=auth())
    assert removed.status_code == 200
    assert [(c["source"], c["default"]) for c in removed.json()["data"]] == [(first.json()["source"], True)]
    unsigned = acme.client.delete(f"{url}/{first.json()['source']}", headers=auth())
    assert unsigned.status_code == 422
    listed = acme.client.get(url, headers=auth(READER)).json()
    assert listed["has_more"] is False
    assert len(listed["data"]) == 1
    trail = acme.client.get("/v1/accounts/acme/audit", headers=auth(READER)).json()["data"]
    assert [r["action"] for r in trail][:3] == ["source.removed", "source.default", "source.added"]
    assert {r["via"] for r in trail[:4]} == {"api:crm"}


# --- one-time purchases -----------------------------------------------------------------------------------------


def _buy(api: Api, key: str, amount: str = "25", account: str = "acme", actor: str = ACTOR, token: str = BILLING):
    return api.client.post(
        f"/v1/accounts/{account}/topups",
        json={"amount": amount, "actor": actor},
        headers=auth(token, **{"Idempotency-Key": key}),
    )


def test_a_purchase_sent_three_times_with_one_key_is_charged_once(acme: Api, stripe_backend):
    card = new_card(stripe_backend)
    acme.client.post("/v1/accounts/acme/funding-sources", json={**card, "actor": ACTOR}, headers=auth())
    answers = [_buy(acme, "order-77") for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 201]
    first = answers[0].json()
    assert first["phase"] == "finished"
    assert first["kind"] == "topup"
    assert (first["amount"], first["vat"], first["total"]) == ("25.00000", "5.00000", "30.00000")
    assert first["receipt"] is not None
    assert first["card"].startswith("visa")
    assert [a.json() for a in answers[1:]] == [first, first]
    assert "idempotent-replayed" not in answers[0].headers
    assert answers[1].headers["idempotent-replayed"] == "true"
    assert len(stripe_backend.intents("succeeded")) == 1
    assert acme.client.get("/v1/accounts/acme", headers=auth()).json()["balance"] == "35.00000"

    before = snapshot(acme)
    other = _buy(acme, "order-77", amount="26")
    assert other.status_code == 422
    assert "another request" in other.json()["error"]["message"]
    assert _buy(acme, "order-77", account="acme", actor="John Smith").status_code == 422
    assert snapshot(acme) == before
    # keys belong to their token: the admin's order-77 is a purchase of its own
    assert _buy(acme, "order-77", token=ADMIN).json()["id"] != first["id"]
    assert len(stripe_backend.intents("succeeded")) == 2

    seen = acme.client.get(f"/v1/recharges/{first['id']}", headers=auth(READER)).json()
    assert seen["phase"] == "finished"
    assert seen["receipt"] == first["receipt"]
    listed = acme.client.get("/v1/accounts/acme/recharges", headers=auth(READER)).json()
    assert [r["kind"] for r in listed["data"]] == ["topup", "topup"]
    assert listed["has_more"] is False


def test_a_purchase_needs_an_idempotency_key_and_a_valid_amount(acme: Api, stripe_backend):
    card = new_card(stripe_backend)
    acme.client.post("/v1/accounts/acme/funding-sources", json={**card, "actor": ACTOR}, headers=auth())
    before = snapshot(acme)
    no_key = acme.client.post("/v1/accounts/acme/topups", json={"amount": "25", "actor": ACTOR}, headers=auth())
    assert no_key.status_code == 400
    assert "Idempotency-Key" in no_key.json()["error"]["message"]
    for amount in ("0", "-5", "abc", "25.001", "1e30"):
        assert _buy(acme, f"k-{amount}", amount=amount).status_code == 422, amount
    assert snapshot(acme) == before
    assert stripe_backend.intents() == []


def test_a_purchase_still_in_flight_answers_409_then_its_result(acme: Api, stripe_backend):
    card = new_card(stripe_backend)
    acme.client.post("/v1/accounts/acme/funding-sources", json={**card, "actor": ACTOR}, headers=auth())
    service = acme.daemon.runtime().recharges
    # the first request claimed its recharge (with its key, in one transaction) and has not charged yet
    from recharged.topups import fingerprint

    def remember(session, recharge_id):
        session.add(
            ApiIdempotency(
                token="crm",
                key="slow-1",
                fingerprint=fingerprint("acme", 2_500_000, ACTOR),
                account_id="acme",
                recharge_id=recharge_id,
                created_at=acme.clock.now(),
            )
        )

    recharge_id = service.claim("acme", 2_500_000, kind=RechargeKind.TOPUP, actor=ACTOR, on_claim=remember)
    busy = _buy(acme, "slow-1")
    assert busy.status_code == 409
    assert busy.headers["retry-after"] == "5"
    assert "still being charged" in busy.json()["error"]["message"]
    assert stripe_backend.intents() == []
    service.process(recharge_id)  # the first request (or recovery) finishes it
    done = _buy(acme, "slow-1")
    assert done.status_code == 201
    assert done.json()["id"] == recharge_id
    assert done.json()["phase"] == "finished"
    assert len(stripe_backend.intents("succeeded")) == 1


def test_concurrent_requests_with_one_key_charge_once(acme: Api, stripe_backend):
    card = new_card(stripe_backend)
    acme.client.post("/v1/accounts/acme/funding-sources", json={**card, "actor": ACTOR}, headers=auth())
    statuses: list[int] = []
    barrier = threading.Barrier(4)

    def buy() -> None:
        barrier.wait()
        statuses.append(_buy(acme, "race-1").status_code)

    threads = [threading.Thread(target=buy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses)[0] == 201
    assert set(statuses) <= {201, 409}
    assert len(stripe_backend.intents("succeeded")) == 1
    with acme.db.reading() as s:
        assert s.scalar(select(func.count()).select_from(Recharge)) == 1


def test_a_declined_purchase_says_why_and_a_card_needing_authentication_gives_stripe_js_its_secret(
    acme: Api, stripe_backend
):
    declined = new_card(stripe_backend, "pm_card_chargeDeclinedInsufficientFunds")
    acme.client.post("/v1/accounts/acme/funding-sources", json={**declined, "actor": ACTOR}, headers=auth())
    failed = _buy(acme, "d-1").json()
    assert failed["phase"] == "failed"
    assert failed["requires_action"] is False
    assert failed["receipt"] is None
    assert "declined" in failed["outcome"]

    three_d = new_card(stripe_backend, "pm_card_authenticationRequired", declined["customer"])
    added = acme.client.post("/v1/accounts/acme/funding-sources", json={**three_d, "actor": ACTOR}, headers=auth())
    acme.client.post(
        f"/v1/accounts/acme/funding-sources/{added.json()['source']}/default", json={"actor": ACTOR}, headers=auth()
    )
    waiting = _buy(acme, "3ds-1").json()
    assert waiting["requires_action"] is True
    assert waiting["phase"] == "failed"
    assert waiting["client_secret"].startswith(waiting["payment_intent"] + "_secret_")
    # off-session, Stripe fails it with authentication_required: Stripe.js confirms it with the secret, no next action
    assert waiting["next_action"] is None
    again = acme.client.get(f"/v1/recharges/{waiting['id']}", headers=auth(READER)).json()
    assert again["client_secret"] == waiting["client_secret"]
    replay = _buy(acme, "3ds-1").json()
    assert replay["client_secret"] == waiting["client_secret"]  # never stored; asked of Stripe again
    with acme.db.reading() as s:
        kept = s.scalars(select(ApiIdempotency.response).where(ApiIdempotency.key == "3ds-1")).one()
    assert kept is not None
    assert kept["client_secret"] is None


# --- receipts, statements, usage --------------------------------------------------------------------------------


def test_receipts_statements_and_daily_usage(acme: Api, stripe_backend):
    card = new_card(stripe_backend)
    acme.client.post("/v1/accounts/acme/funding-sources", json={**card, "actor": ACTOR}, headers=auth())
    number = _buy(acme, "r-1").json()["receipt"]
    listed = acme.client.get("/v1/accounts/acme/receipts", headers=auth(READER)).json()
    assert [r["number"] for r in listed["data"]] == [number]
    assert listed["data"][0]["total"] == "30.00000"
    as_json = acme.client.get(f"/v1/receipts/{number}", headers=auth(READER))
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["amount"] == "25.00000"
    assert as_json.json()["content"]
    text = acme.client.get(f"/v1/receipts/{number}", headers=auth(READER, Accept="text/plain"))
    assert text.headers["content-type"].startswith("text/plain")
    assert number in text.text
    html = acme.client.get(f"/v1/receipts/{number}", headers=auth(READER, Accept="text/html;q=0.9, */*;q=0.1"))
    assert html.headers["content-type"].startswith("text/html")
    assert "<" in html.text

    month = acme.clock.now().strftime("%Y-%m")
    statement = acme.client.get(f"/v1/accounts/acme/statements/{month}", headers=auth(READER))
    assert statement.status_code == 200
    assert statement.json()["currency"] == "USD"
    csv_text = acme.client.get(f"/v1/accounts/acme/statements/{month}", headers=auth(READER, Accept="text/csv"))
    assert csv_text.headers["content-type"].startswith("text/csv")
    assert "," in csv_text.text
    for bad in ("2026-13", "November", "2099-01"):
        assert acme.client.get(f"/v1/accounts/acme/statements/{bad}", headers=auth(READER)).status_code == 422

    day = acme.clock.now().date().isoformat()
    usage = acme.client.get(f"/v1/accounts/acme/usage?from={day}&to={day}", headers=auth(READER)).json()
    assert [d["day"] for d in usage["days"]] == [day]
    assert usage["days"][0]["recharges"][0]["kind"] == "topup"
    assert (
        acme.client.get("/v1/accounts/acme/usage?from=2026-11-30&to=2026-11-01", headers=auth(READER)).status_code
        == 422
    )
    assert (
        acme.client.get("/v1/accounts/acme/usage?from=2020-01-01&to=2026-11-01", headers=auth(READER)).status_code
        == 422
    )


def test_an_automatic_recharge_shows_its_decision(make_api, stripe_backend):
    api = make_api(tokens=TOKENS)
    busy_account(api.db, api.settings, api.clock, stripe_backend, "pm_card_visa")
    api.daemon.runtime().recharges.run_cycle()
    recharge = api.client.get("/v1/accounts/acme/recharges", headers=auth(READER)).json()["data"][0]
    assert recharge["kind"] == "auto"
    assert recharge["phase"] == "finished"
    assert recharge["decision"]["average_daily"]
    assert recharge["decision"]["threshold"]


def test_a_purchase_whose_answer_was_lost_is_settled_by_recovery_and_charged_once(acme: Api, stripe_backend):
    server = stripe_backend.local()
    card = new_card(stripe_backend)
    acme.client.post("/v1/accounts/acme/funding-sources", json={**card, "actor": ACTOR}, headers=auth())
    server.inject("drop_after_commit", times=None)  # Stripe charges, and every answer is lost on the way
    first = _buy(acme, "lost-1")
    assert first.status_code in (201, 503), first.text
    if first.status_code == 201:
        assert first.json()["phase"] not in ("finished", "failed")  # not known yet: never called a failure
    server.clear_faults()
    waiting = _buy(acme, "lost-1")
    assert waiting.status_code == 409
    assert "still being charged" in waiting.json()["error"]["message"]
    acme.daemon.runtime().recharges.recover()  # what the daemon's recovery job does
    done = _buy(acme, "lost-1")
    assert done.status_code == 201, done.text
    assert done.json()["phase"] == "finished"
    assert len(stripe_backend.intents("succeeded")) == 1
    assert acme.client.get("/v1/accounts/acme", headers=auth()).json()["balance"] == "35.00000"


def test_a_payment_the_customer_authenticates_later_is_credited_once_by_its_webhook(acme: Api, stripe_backend):
    server = stripe_backend.local()
    card = new_card(stripe_backend, "pm_card_authenticationRequired")
    acme.client.post("/v1/accounts/acme/funding-sources", json={**card, "actor": ACTOR}, headers=auth())
    waiting = _buy(acme, "3ds-later").json()
    assert waiting["phase"] == "failed"
    assert waiting["requires_action"] is True
    # The CRM hands client_secret to Stripe.js; the customer confirms on-session and passes the challenge.
    stripe_backend.client.v1.payment_intents.confirm(
        waiting["payment_intent"],
        params={"payment_method": card["payment_method"], "return_url": "https://crm.example"},
    )
    server.authenticate(waiting["payment_intent"])
    succeeded = server.events("payment_intent.succeeded")[-1]
    for _ in range(2):  # Stripe may deliver an event twice
        assert acme.deliver(server, succeeded).status_code == 200
        acme.settle_events()
    paid = acme.client.get(f"/v1/recharges/{waiting['id']}", headers=auth(READER)).json()
    assert paid["phase"] == "finished"
    assert paid["receipt"] is not None
    assert paid["requires_action"] is False
    assert paid["payment_intent"] == waiting["payment_intent"]
    assert paid["client_secret"] is None
    assert acme.client.get("/v1/accounts/acme", headers=auth()).json()["balance"] == "35.00000"
    with acme.db.reading() as s:
        credits = s.scalar(
            select(func.count()).select_from(Entry).where(Entry.external_id == waiting["payment_intent"])
        )
    assert credits == 1
    # and the key's answer is now the credited recharge
    assert _buy(acme, "3ds-later").json()["phase"] == "finished"


def test_an_automatic_recharge_the_customer_authenticates_later_resumes_automatic_recharge(make_api, stripe_backend):
    api = make_api(tokens=TOKENS)
    server = stripe_backend.local()
    busy_account(api.db, api.settings, api.clock, stripe_backend, "pm_card_authenticationRequired")
    api.daemon.runtime().recharges.run_cycle()
    view = api.client.get("/v1/accounts/acme", headers=auth()).json()
    assert view["recharge_state"] == "action_required"
    recharge = api.client.get("/v1/accounts/acme/recharges", headers=auth()).json()["data"][0]
    assert recharge["requires_action"] is True
    assert recharge["client_secret"]
    method = stripe_backend.client.v1.payment_intents.retrieve(recharge["payment_intent"]).last_payment_error
    stripe_backend.client.v1.payment_intents.confirm(
        recharge["payment_intent"],
        params={"payment_method": method.payment_method.id, "return_url": "https://crm.example"},
    )
    server.authenticate(recharge["payment_intent"])
    assert api.deliver(server, server.events("payment_intent.succeeded")[-1]).status_code == 200
    api.settle_events()
    view = api.client.get("/v1/accounts/acme", headers=auth()).json()
    assert view["recharge_state"] == "ok"
    assert view["state_reason"] is None
    assert api.client.get(f"/v1/recharges/{recharge['id']}", headers=auth()).json()["phase"] == "finished"
