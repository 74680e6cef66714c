"""Shared fixtures: a fresh, migrated database per test, on SQLite and (when configured) PostgreSQL.

PostgreSQL tests run when RECHARGED_TEST_POSTGRES_URL points at a server (e.g.
postgresql://postgres@127.0.0.1:5432/test); the session creates its own database there, every test gets
its own schema in it, and everything is dropped at the end, so no run sees another's data.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from recharged.clock import FixedClock
from recharged.config import Settings, load_settings
from recharged.store.engine import Database

PG_ENV = "RECHARGED_TEST_POSTGRES_URL"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test session; yields its URL."""
    admin = _admin_url()
    if admin is None and os.environ.get("RECHARGED_TEST_REQUIRE_POSTGRES"):
        pytest.fail(f"RECHARGED_TEST_REQUIRE_POSTGRES is set but {PG_ENV} is not")
    if admin is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    import psycopg

    conninfo = admin.replace("postgresql+psycopg://", "postgresql://")
    name = f"recharged_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        if os.environ.get("RECHARGED_TEST_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL at {PG_ENV} is required (RECHARGED_TEST_REQUIRE_POSTGRES) but unreachable: {exc}")
        pytest.skip(f"PostgreSQL at {PG_ENV} is not reachable: {exc}")
    base = conninfo.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file per session; tests copy it instead of migrating again."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    db.close()
    return path


def _pg_schema_url(database_url: str) -> tuple[str, str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    return schema, f"{database_url}?options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty, migrated database for one test."""
    if request.param == "sqlite":
        path = tmp_path / "recharged.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    database_url = request.getfixturevalue("pg_database")
    schema, url = _pg_schema_url(database_url)
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db = Database(url)
    db.upgrade()
    db.close()
    try:
        yield url
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.close()


@pytest.fixture
def settings() -> Settings:
    """The built-in defaults (the same as the shipped config.toml)."""
    return load_settings(None, environ={})


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


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
    from recharged.accounts import create_accounts, new_account

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
        import stripe

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


@pytest.fixture(params=["local", pytest.param("stripe-test-mode", marks=pytest.mark.stripe)])
def stripe_backend(request: pytest.FixtureRequest, clock: FixedClock):
    """Payment tests run on the local server, and on real Stripe test mode when RECHARGED_TEST_STRIPE_KEY is set."""
    if request.param == "stripe-test-mode":
        key = os.environ.get(STRIPE_KEY_ENV, "")
        if not key.startswith("sk_test_"):
            pytest.skip(f"real Stripe test mode needs {STRIPE_KEY_ENV}=sk_test_...")
        yield StripeBackend("https://api.stripe.com", key)
        return
    from recharged.testing.stripe_server import StripeTestServer

    with StripeTestServer(clock=lambda: clock.now().timestamp()) as server:
        yield StripeBackend(server.url, "sk_test_recharged", server)


@pytest.fixture
def stripe_server(stripe_backend: StripeBackend):
    """The local Stripe-compatible server (tests that use it directly skip on real Stripe)."""
    return stripe_backend.local()


@pytest.fixture
def gateway_factory(stripe_backend: StripeBackend):
    """Build StripeGateways on the backend: the real SDK over HTTP, retries without waiting."""
    from tenacity import wait_none

    from recharged.payments import StripeGateway

    def make(max_retries: int = 2, timeout: float = 20.0) -> StripeGateway:
        return StripeGateway(
            stripe_backend.key,
            api_base=stripe_backend.url,
            timeout_seconds=timeout,
            max_retries=max_retries,
            wait=wait_none(),
        )

    return make


@pytest.fixture
def stripe_client(stripe_backend: StripeBackend):
    return stripe_backend


def card_on_file(backend: StripeBackend, test_card: str = "pm_card_visa", customer: str | None = None):
    """Create (or reuse) a customer, attach one of Stripe's test cards, and return its CardInfo."""
    from recharged.payments import CardInfo

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
    from recharged.accounts import adjust_balance
    from recharged.funding import add_source
    from recharged.usage import UsageRecorder

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


@pytest.fixture
def quiet_logs():
    """Warnings and errors only: every charge logs info lines, which would bury a test's summary under -s."""
    import logging

    import structlog

    configured, old = structlog.is_configured(), structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    if configured:
        structlog.configure(**old)
    else:
        structlog.reset_defaults()


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

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when it has not been recorded yet)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


@pytest.fixture
def make_api(gateway_factory, clock: FixedClock, db_url: str, monkeypatch: pytest.MonkeyPatch):
    """Build daemons and their API clients on the test database; the Stripe SDK talks to the stripe_backend.

    `tokens` / `webhook_secret` of None leave RECHARGED_API_TOKENS / RECHARGED_STRIPE_WEBHOOK_SECRET unset;
    `overrides` are RECHARGED_<SECTION>__<KEY> settings. Small body and batch limits keep the size tests quick.
    The Stripe backend comes first, so a run without real Stripe skips before it creates a database."""
    from fastapi.testclient import TestClient

    from recharged.daemon.http import create_app
    from recharged.daemon.process import Daemon

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    built: list = []

    def make(
        tokens: str | None = API_TOKEN,
        webhook_secret: str | None = WEBHOOK_SECRET,
        daemon_class: type[Daemon] = Daemon,
        **overrides: str,
    ) -> Api:
        for name, value in (("RECHARGED_API_TOKENS", tokens), ("RECHARGED_STRIPE_WEBHOOK_SECRET", webhook_secret)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        environ = {
            "RECHARGED_DATABASE__URL": db_url,
            "RECHARGED_HTTP__MAX_BODY_BYTES": "65536",
            "RECHARGED_HTTP__MAX_EVENTS_PER_REQUEST": "50",
            **{f"RECHARGED_{key.upper()}": value for key, value in overrides.items()},
        }
        settings = load_settings(None, environ=environ)
        daemon = daemon_class(None, settings, clock, gateway=lambda _settings: gateway_factory())
        built.append(daemon)
        daemon.prepare()
        return Api(daemon, TestClient(create_app(daemon)), settings, clock)

    yield make
    for daemon in built:
        daemon.stop()


# --- email (receipts, notices, statements) --------------------------------------------------------------------


@pytest.fixture
def smtp_server():
    """A real SMTP server (aiosmtpd) on a loopback ephemeral port that records what it accepted."""
    from tests.smtp_server import SmtpTestServer

    with SmtpTestServer() as server:
        yield server


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
