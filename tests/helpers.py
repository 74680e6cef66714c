"""Test helpers: the shared constants, builders and clients the tests use. Fixtures live in conftest.py and use
these; tests import from here, never from a conftest."""

from __future__ import annotations

import base64
import contextlib
import threading
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import stripe
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from recharged.accounts import adjust_balance, create_accounts, new_account
from recharged.clock import FixedClock
from recharged.config import Settings, load_settings
from recharged.daemon.process import Daemon
from recharged.funding import add_source
from recharged.payments import CardInfo
from recharged.store.engine import Database
from recharged.usage import UsageRecorder

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def with_amounts(settings: Settings, currency: str = "USD", **amounts: str | None) -> Settings:
    """`settings` with some of `currency`'s recharge amounts replaced (a decimal string, or None: off)."""
    table = settings.recharge.currencies[currency]
    changed = table.model_copy(update={k: None if v is None else Decimal(v) for k, v in amounts.items()})
    recharge = settings.recharge.model_copy(update={"currencies": {**settings.recharge.currencies, currency: changed}})
    return settings.model_copy(update={"recharge": recharge})


# --- accounts and usage ---------------------------------------------------------------------------------------


def add_account(
    db: Database,
    settings: Settings,
    clock: FixedClock,
    account_id: str = "acme",
    *,
    created_at: str = "2026-09-01T00:00:00Z",
    opening_balance: str | None = None,
    auto_recharge: bool = False,
    vat_percent: str = "20",
) -> None:
    """Create one account on the standard plan, signed by a test admin."""
    fields = {
        "id": account_id,
        "email": f"billing@{account_id}.example",
        "plan": "standard",
        "vat_percent": vat_percent,
        "created_at": created_at,
        "opening_balance": opening_balance,
        "auto_recharge": "true" if auto_recharge else "false",
    }
    create_accounts(db, [new_account(fields, settings, clock.now())], "Test Admin", clock)


def call(
    event_id: str, account: str = "acme", seconds: int = 70, at: str = "2026-11-20T10:00:00Z", kind: str = "dialer"
) -> dict[str, str]:
    return {
        "event_id": event_id,
        "account_id": account,
        "kind": kind,
        "started_at": at,
        "duration_seconds": str(seconds),
    }


# --- payments -------------------------------------------------------------------------------------------------

STRIPE_KEY_ENV = "RECHARGED_TEST_STRIPE_KEY"


class StripeBackend:
    """Where payment tests charge: the local Stripe-compatible server, or real Stripe test mode."""

    def __init__(self, url: str, key: str, server=None) -> None:
        self.url, self.key, self.server = url, key, server
        self.client = stripe.StripeClient(key, base_addresses={"api": url})
        self.customers: list[str] = []  # created by this test: real test mode keeps everyone else's too

    def local(self):
        """The local server, for tests that inject faults or move its clock; real Stripe skips them."""
        if self.server is None:
            pytest.skip("needs the local Stripe-compatible server (fault injection / clock)")
        return self.server

    def intents(self, status: str | None = None) -> list[dict]:
        """PaymentIntents of this test's customers, as plain dicts, oldest first."""
        found = []
        for customer in self.customers:
            page = self.client.v1.payment_intents.list(params={"customer": customer, "limit": 100})
            found += [pi.to_dict() for pi in page.data]
        found.sort(key=lambda pi: (pi["created"], pi["id"]))
        return [pi for pi in found if status is None or pi["status"] == status]


def card_on_file(backend: StripeBackend, test_card: str = "pm_card_visa", customer: str | None = None):
    """Create (or reuse) a customer, attach one of Stripe's test cards, and return its CardInfo."""
    client = backend.client
    if customer is None:
        customer = client.v1.customers.create(params={"email": "billing@example.com"}).id
        backend.customers.append(customer)
    method = client.v1.payment_methods.attach(test_card, params={"customer": customer})
    card = method.card
    return CardInfo(customer, method.id, card.brand, card.last4, card.exp_month, card.exp_year)


def busy_account(db, settings, clock, backend, *cards: str, account: str = "acme", vat: str = "20") -> str | None:
    """An opted-in account that spent $6.00 a day for 30 days and now holds $1.00: below its $42 threshold.

    Its cards (Stripe test cards, default first) are attached to one new customer, which is returned."""
    add_account(db, settings, clock, account, created_at="2026-09-01T00:00:00Z", auto_recharge=True, vat_percent=vat)
    days = [f"2026-10-{23 + d:02d}" for d in range(9)] + [f"2026-11-{1 + d:02d}" for d in range(21)]
    events = [call(f"{account}-{day}", account=account, seconds=300 * 60, at=f"{day}T10:00:00Z") for day in days]
    UsageRecorder(db, settings, clock).record(events)
    adjust_balance(
        db,
        account,
        18_100_000,
        reason="prepaid before recharged",
        actor="Jane Doe",
        clock=clock,
        reference=f"seed-{account}",
    )
    customer = None
    for card in cards:
        info = card_on_file(backend, card, customer)
        customer = info.customer
        add_source(db, account, info, actor="Jane Doe", clock=clock)
    return customer


# --- the daemon's HTTP API ------------------------------------------------------------------------------------

API_TOKEN = "test-api-token-0123456789abcdef"
WEBHOOK_SECRET = "whsec_test_0123456789abcdef"


def api_auth(token: str = API_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Api:
    """A daemon built as `recharged run` builds it (`prepare()`: no scheduler, no server threads) and a
    TestClient on its FastAPI app."""

    def __init__(self, daemon, client, settings: Settings, clock: FixedClock) -> None:
        self.daemon, self.client, self.settings, self.clock = daemon, client, settings, clock
        self.db: Database = daemon.db

    def post_usage(self, events: list, token: str = API_TOKEN):
        return self.client.post("/v1/usage", json={"events": events}, headers=api_auth(token))

    def deliver(self, server, event: dict | str):
        """POST one of the Stripe-compatible server's events (or its id) to the webhook, signed as Stripe signs."""
        body, header = server.signed_payload(event, secret=WEBHOOK_SECRET)
        headers = {"Content-Type": "application/json", "Stripe-Signature": header}
        return self.client.post("/v1/webhooks/stripe", content=body, headers=headers)

    def settle_events(self) -> list:
        """Let the daemon's wake-up drain of the event inbox finish, then handle whatever is still due, as its
        "events" job would; returns what this last pass handled."""
        assert self.daemon.wait_events_idle(30), "the daemon's event drain did not finish"
        return self.daemon.runtime().events.process_pending().processed

    def event_row(self, event_id: str):
        """The stored event (a ProcessorEvent, detached), or None."""
        from recharged.store.models import ProcessorEvent

        with self.db.reading() as session:
            return session.get(ProcessorEvent, event_id)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when it has not been recorded yet)."""
        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


class AsleepDaemon(Daemon):
    """A daemon whose webhook stores events but does not wake anything to handle them: what a crash right after
    the answer leaves behind, or an inbox drained only by `recharged events process`."""

    def events_stored(self) -> None:
        pass


def open_dispute(server, charge_id: str, reason: str = "fraudulent") -> dict:
    """The cardholder disputes an existing charge now, with its funds withdrawn."""
    return server.open_dispute(charge_id, reason=reason)


# --- email (receipts, notices, statements) --------------------------------------------------------------------


def mail_settings(tmp_path: Path, server=None, **environ: str) -> Settings:
    """The defaults with the outbox's files in `tmp_path`, a business to show, and `server` as the SMTP server
    (no TLS) when given, else the .eml folder; more settings as RECHARGED_* variables."""
    env = {
        "RECHARGED_OUTBOX__JOURNAL": str(tmp_path / "outbox.journal"),
        "RECHARGED_OUTBOX__FOLDER": str(tmp_path / "eml"),
        "RECHARGED_BUSINESS__NAME": "Dialer Co Ltd",
        "RECHARGED_BUSINESS__ADDRESS": "1 Main Street\nSpringfield",
        "RECHARGED_BUSINESS__VAT_ID": "GB123456789",
        "RECHARGED_SMTP__FROM_ADDRESS": "billing@dialer.example",
    }
    if server is not None:
        env |= {
            "RECHARGED_SMTP__HOST": "127.0.0.1",
            "RECHARGED_SMTP__PORT": str(server.port),
            "RECHARGED_SMTP__SECURITY": "none",
            "RECHARGED_SMTP__TIMEOUT_SECONDS": "5",
        }
    return load_settings(None, environ=env | environ)


# --- webhooks to the CRM ---------------------------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()  # a Standard Webhooks signing secret
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()


class Receiver:
    """A real HTTP endpoint on 127.0.0.1: records each request, answers with the next of `answers` (the last one
    repeats), after `hang` seconds when set (released early when the test ends)."""

    def __init__(self, answers: tuple[int, ...] = (200,), hang: float = 0.0) -> None:
        self.answers, self.hang = list(answers), hang
        self.requests: list[tuple[dict[str, str], str]] = []
        self._lock, self._arrived, self._release = threading.Lock(), threading.Condition(), threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                with receiver._arrived:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                    receiver._arrived.notify_all()
                if receiver.hang:
                    receiver._release.wait(receiver.hang)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                with contextlib.suppress(OSError):  # the sender gave up waiting
                    self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def events(self, secret: str = SECRET) -> list[dict]:
        """Every body received, each verified as a Standard Webhooks receiver does (raises on a bad signature)."""
        return [Webhook(secret).verify(body, headers) for headers, body in self.requests]

    def types(self, secret: str = SECRET) -> list[str]:
        return [e["type"] for e in self.events(secret)]


@contextlib.contextmanager
def commit_fails_once(model: type):
    """The database fails the commit of the first transaction that writes a `model` row, as a lost connection
    would; yields a list that holds True once it has."""
    fired: list[bool] = []

    def before_flush(session: Session, *_: object) -> None:
        if any(isinstance(o, model) for o in session.new):
            session.info["fail_commit"] = True

    def before_commit(session: Session) -> None:
        if not fired and session.info.pop("fail_commit", False):
            fired.append(True)
            raise RuntimeError("the database went away at commit")

    event.listen(Session, "before_flush", before_flush)
    event.listen(Session, "before_commit", before_commit)
    try:
        yield fired
    finally:
        event.remove(Session, "before_flush", before_flush)
        event.remove(Session, "before_commit", before_commit)
