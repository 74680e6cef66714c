"""Shared fixtures: a fresh, migrated database per test, on SQLite and (when configured) PostgreSQL.

PostgreSQL tests run when RECHARGED_TEST_POSTGRES_URL points at a server (e.g.
postgresql://postgres@127.0.0.1:5432/test); the session creates its own database there, every test gets
its own schema in it, and everything is dropped at the end, so no run sees another's data.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import structlog
from fastapi.testclient import TestClient
from structlog._config import BoundLoggerLazyProxy
from tenacity import wait_none

from recharged.clock import FixedClock
from recharged.config import Settings, load_settings
from recharged.daemon.http import create_app
from recharged.daemon.process import Daemon
from recharged.payments import StripeGateway
from recharged.store.engine import Database
from recharged.testing import StripeTestServer
from tests.helpers import API_TOKEN, NOW, STRIPE_KEY_ENV, WEBHOOK_SECRET, Api, StripeBackend
from tests.smtp_server import SmtpTestServer

PG_ENV = "RECHARGED_TEST_POSTGRES_URL"


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


# --- payments -------------------------------------------------------------------------------------------------


@pytest.fixture
def processor_clock(clock: FixedClock) -> Callable[[], float]:
    """The local server's clock (its `created` stamps, idempotency expiry and `Date` header): the test's clock, so
    the two agree as our clock and Stripe's do (e2e tests, whose commands run on the real clock, use that)."""
    return lambda: clock.now().timestamp()


@pytest.fixture(params=["local", pytest.param("stripe-test-mode", marks=pytest.mark.stripe)])
def stripe_backend(request: pytest.FixtureRequest, processor_clock: Callable[[], float]):
    """Payment tests run on the local server, and on real Stripe test mode when RECHARGED_TEST_STRIPE_KEY is set."""
    if request.param == "stripe-test-mode":
        key = os.environ.get(STRIPE_KEY_ENV, "")
        if not key.startswith("sk_test_"):
            pytest.skip(f"real Stripe test mode needs {STRIPE_KEY_ENV}=sk_test_...")
        yield StripeBackend("https://api.stripe.com", key)
        return

    with StripeTestServer(clock=processor_clock) as server:
        yield StripeBackend(server.url, "sk_test_recharged", server)


@pytest.fixture
def stripe_server(stripe_backend: StripeBackend):
    """The local Stripe-compatible server (tests that use it directly skip on real Stripe)."""
    return stripe_backend.local()


@pytest.fixture
def gateway_factory(stripe_backend: StripeBackend, clock: FixedClock):
    """Build StripeGateways on the backend: the real SDK over HTTP, retries without waiting."""

    def make(max_retries: int = 2, timeout: float = 20.0) -> StripeGateway:
        return StripeGateway(
            stripe_backend.key,
            api_base=stripe_backend.url,
            timeout_seconds=timeout,
            max_retries=max_retries,
            wait=wait_none(),
            now=clock.now if stripe_backend.server is not None else None,  # real Stripe: the real clock
        )

    return make


@pytest.fixture
def stripe_client(stripe_backend: StripeBackend):
    return stripe_backend


@pytest.fixture(autouse=True)
def _logging_left_as_found():
    """A test that configures logging as `recharged run` does (a daemon's reload, a command run in-process) must
    not leave it so for the tests after it in the same worker: structlog's configuration, the root logger's handlers
    and levels, and the module loggers structlog cached meanwhile (`cache_logger_on_first_use`) are put back."""
    configured, config = structlog.is_configured(), structlog.get_config()
    root, ours = logging.getLogger(), logging.getLogger("recharged")
    handlers, levels = root.handlers[:], (root.level, ours.level)
    yield
    if structlog.is_configured() == configured and structlog.get_config() == config:
        return
    if configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    for name, module in list(sys.modules.items()):
        if name.startswith("recharged"):
            for value in list(vars(module).values()):
                if isinstance(value, BoundLoggerLazyProxy):
                    vars(value).pop("bind", None)  # cached under the configuration the test set


@pytest.fixture
def quiet_logs():
    """Warnings and errors only: every charge logs info lines, which would bury a test's summary under -s."""

    configured, old = structlog.is_configured(), structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    if configured:
        structlog.configure(**old)
    else:
        structlog.reset_defaults()


# --- the daemon's HTTP API ------------------------------------------------------------------------------------


@pytest.fixture
def make_api(gateway_factory, clock: FixedClock, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Build daemons and their API clients on the test database; the Stripe SDK talks to the stripe_backend.

    `tokens` / `webhook_secret` of None leave RECHARGED_API_TOKENS / RECHARGED_STRIPE_WEBHOOK_SECRET unset;
    `overrides` are RECHARGED_<SECTION>__<KEY> settings, `config` the text of a config.toml. Small body and batch
    limits keep the size tests quick. The Stripe backend comes first, so a run without real Stripe skips before it
    creates a database."""

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    built: list = []

    def make(
        tokens: str | None = API_TOKEN,
        webhook_secret: str | None = WEBHOOK_SECRET,
        daemon_class: type[Daemon] = Daemon,
        config: str | None = None,
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
        path = None
        if config is not None:  # a config.toml of the test's own (e.g. [[webhooks.endpoints]])
            path = tmp_path / f"config-{len(built)}.toml"
            path.write_text(config, encoding="utf-8")
        settings = load_settings(path, environ=environ)
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
    with SmtpTestServer() as server:
        yield server
