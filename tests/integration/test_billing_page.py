"""Seed 001's billing page, end to end, over HTTP only (issue 15): the CRM creates an account, adds two cards,
turns automatic recharge on signed by name, buys minutes once sending the same key three times, the dialer posts
usage, an admin runs a cycle, the CRM reads the receipts and the audit trail, and receives the signed
`recharge.succeeded` webhooks at a real HTTP receiver, verified with the `standardwebhooks` package.

On SQLite and PostgreSQL, with the real Stripe SDK on the local Stripe-compatible server. The clock is the real
time: Standard Webhooks receivers refuse a signature more than five minutes old.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from recharged.clock import FixedClock
from recharged.mail.webhook_sender import WebhookSender, configured_endpoints
from tests.helpers import SECRET, Api, Receiver, card_on_file

CRM = "crm-secret-0123456789abcdef"
DIALER = "dialer-secret-0123456789abcdef"
OPS = "ops-secret-0123456789abcdef"
TOKENS = f"crm:accounts:read+billing:write:{CRM},dialer:usage:write:{DIALER},ops:admin:{OPS}"
SIGNER = "Maria Garcia"  # the customer, signing on the billing page


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(datetime.now(UTC).replace(microsecond=0))


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def test_the_billing_page_over_http(make_api, stripe_backend, clock, monkeypatch):
    monkeypatch.setenv("RECHARGED_WEBHOOK_SECRET_CRM", SECRET)
    with Receiver() as crm_hooks:
        config = f'[[webhooks.endpoints]]\nname = "crm"\nurl = "{crm_hooks.url}"\nevents = ["*"]\n'
        api: Api = make_api(tokens=TOKENS, config=config)
        http = api.client
        now = clock.now()

        # 1. the customer signs up: the CRM creates the account (a customer since six weeks, moved over)
        created = http.post(
            "/v1/accounts",
            json={
                "id": "acme-law",
                "email": "billing@acme-law.example",
                "plan": "standard",
                "vat_percent": "20",
                "created_at": (now - timedelta(days=42)).isoformat(),
                "actor": SIGNER,
            },
            headers=bearer(CRM),
        )
        assert created.status_code == 201, created.text

        # 2. two cards, collected with Stripe Elements: the CRM hands over the customer and payment methods
        visa = card_on_file(stripe_backend, "pm_card_visa")
        master = card_on_file(stripe_backend, "pm_card_mastercard", visa.customer)
        for card in (visa, master):
            added = http.post(
                "/v1/accounts/acme-law/funding-sources",
                json={"customer": card.customer, "payment_method": card.payment_method, "actor": SIGNER},
                headers=bearer(CRM),
            )
            assert added.status_code == 201, added.text
        cards = http.get("/v1/accounts/acme-law/funding-sources", headers=bearer(CRM)).json()["data"]
        assert [(c["card"].split()[0], c["default"]) for c in cards] == [("visa", True), ("mastercard", False)]

        # 3. automatic recharge on, signed by the customer's first and last name
        enabled = http.put(
            "/v1/accounts/acme-law/auto-recharge", json={"enabled": True, "actor": SIGNER}, headers=bearer(CRM)
        )
        assert enabled.status_code == 200
        assert enabled.json()["auto_recharge"] is True

        # 4. minutes bought once; the page's request is sent three times (a double click, two retries)
        bought = [
            http.post(
                "/v1/accounts/acme-law/topups",
                json={"amount": "25.00", "actor": SIGNER},
                headers=bearer(CRM, **{"Idempotency-Key": "order-2026-0001"}),
            )
            for _ in range(3)
        ]
        assert [b.status_code for b in bought] == [201, 201, 201]
        assert len({b.json()["id"] for b in bought}) == 1
        topup = bought[0].json()
        assert (topup["phase"], topup["total"]) == ("finished", "30.00000")
        assert len(stripe_backend.intents("succeeded")) == 1  # one charge at the processor

        # the dialer posts the calls of the last 30 days: 5 hours a day, $6.00 a day at $0.02 a minute
        days = [now.date() - timedelta(days=d) for d in range(30, 0, -1)]
        calls = [
            {
                "event_id": f"call-{day}",
                "account_id": "acme-law",
                "kind": "dialer",
                "started_at": f"{day}T10:00:00Z",
                "duration_seconds": 300 * 60,
            }
            for day in days
        ]
        posted = http.post("/v1/usage", json={"events": calls}, headers=bearer(DIALER))
        assert posted.json()["accepted"] == 30
        view = http.get("/v1/accounts/acme-law", headers=bearer(CRM)).json()
        assert (view["balance"], view["decision"]) == ("-155.00000", "charge")  # 25 bought, 180 used

        # 5. a cycle (an admin asks now; the daemon runs them on its schedule)
        cycle = http.post("/v1/cycles", headers=bearer(OPS))
        assert cycle.status_code == 200, cycle.text
        assert (cycle.json()["charged"], cycle.json()["failed"]) == (1, 0)
        recharges = http.get("/v1/accounts/acme-law/recharges", headers=bearer(CRM)).json()["data"]
        auto = next(r for r in recharges if r["kind"] == "auto")
        assert auto["phase"] == "finished"
        assert auto["decision"]["average_daily"] == 600_000  # $6.00 a day, as the decision kept it

        # 6. receipts and the audit trail
        receipts = http.get("/v1/accounts/acme-law/receipts", headers=bearer(CRM)).json()["data"]
        assert [r["number"] for r in receipts] == [topup["receipt"], auto["receipt"]]
        text = http.get(f"/v1/receipts/{auto['receipt']}", headers=bearer(CRM, Accept="text/plain")).text
        assert auto["receipt"] in text
        trail = http.get("/v1/accounts/acme-law/audit", headers=bearer(CRM)).json()["data"]
        actions = [(r["action"], r["actor"], r["via"]) for r in reversed(trail)]
        assert actions[:4] == [
            ("account.created", SIGNER, "api:crm"),
            ("source.added", SIGNER, "api:crm"),
            ("source.added", SIGNER, "api:crm"),
            ("auto_recharge.changed", SIGNER, "api:crm"),
        ]
        assert ("topup.requested", SIGNER, "api:crm") in actions

        # 7. the CRM's endpoint receives both recharges, signed as Standard Webhooks sign
        sender = WebhookSender(api.db, api.settings, clock, configured_endpoints(api.settings))
        sender.send_due()  # what the daemon's webhooks job (and `recharged webhooks send`) does
        received = crm_hooks.events(SECRET)  # each verified with standardwebhooks.Webhook(secret).verify
        succeeded = [e for e in received if e["type"] == "recharge.succeeded"]
        assert [(e["data"]["kind"], e["data"]["receipt"]) for e in succeeded] == [
            ("topup", topup["receipt"]),
            ("auto", auto["receipt"]),
        ]
        assert succeeded[1]["data"]["total"] == auto["total"]
        headers = crm_hooks.requests[0][0]
        assert headers["webhook-id"] == received[0]["id"]
        assert headers["webhook-signature"].startswith("v1,")
