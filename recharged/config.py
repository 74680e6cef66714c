"""config.toml -> frozen, validated settings. Nothing happens at import time.

Precedence: built-in defaults < config.toml < environment variables `RECHARGED_<SECTION>__<KEY>` (nested keys
join with `__`, e.g. `RECHARGED_RECHARGE__THRESHOLD_DAYS=5`). Unknown keys are errors. Secrets never come
from here: see `recharged.secrets`. Every problem is reported at once as `file: key.path = value: what is
allowed`, and the command exits with status 78.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from recharged.balance import AMOUNT_FIELDS, POLICY_FIELDS, Policy, contradictions
from recharged.credentials import SECRET_NAMES, env_name
from recharged.errors import ConfigError
from recharged.money import PLACES, check_currency, parse_amount
from recharged.rating import CountRate, Rate, TimeRate
from recharged.states import WebhookEventType

ENV_PREFIX = "RECHARGED_"
_SECRET_KEY = re.compile(r"(password|passwd|secret|api_key|apikey|token|tokens)$", re.IGNORECASE)
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"


def _money(value: Decimal) -> Decimal:
    if value < 0:
        raise ValueError("must not be negative")
    parse_amount(value)  # raises when more than 5 decimal places
    return value


def _optional_money(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() == "off":
        return None
    return value


Money = Annotated[Decimal, AfterValidator(_money)]
OptionalMoney = Annotated[Money | None, BeforeValidator(_optional_money)]
Currency = Annotated[str, AfterValidator(check_currency)]
KindName = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class DatabaseSettings(_Section):
    url: str = Field(
        "sqlite:///recharged.db",
        description="SQLAlchemy URL: sqlite:///PATH or postgresql://user@host/db (password via environment)",
    )


class UsageSettings(_Section):
    future_tolerance_seconds: int = Field(300, ge=0, le=86_400)
    # Older events are refused: a mistyped year would otherwise move the account's first usage back, and with it
    # the days its average is divided by. The default covers the longest averaging window (366 days).
    max_age_days: int = Field(400, ge=1, le=3_660)
    batch_size: int = Field(50_000, ge=1, le=100_000)


class CurrencyPolicySettings(_Section):
    """The recharge amounts of one currency: the floors, and the caps on what a card is charged (the amount plus
    VAT). "off" lifts a cap."""

    min_threshold: Money
    min_recharge: Money
    max_recharge: OptionalMoney
    max_charged_per_day: OptionalMoney
    max_charged_per_30_days: OptionalMoney


class PlanPolicySettings(_Section):
    """A plan's own recharge settings, in the plan's currency; each one left out comes from [recharge]."""

    window_days: int | None = Field(None, ge=1, le=366)
    threshold_days: int | None = Field(None, ge=1, le=366)
    recharge_days: int | None = Field(None, ge=1, le=366)
    min_threshold: Money | None = None
    min_recharge: Money | None = None
    max_recharge: Money | None = None
    max_charged_per_day: Money | None = None
    max_charged_per_30_days: Money | None = None

    def overrides(self) -> dict[str, int | None]:
        return {
            name: _units(getattr(self, name)) if name in AMOUNT_FIELDS else getattr(self, name)
            for name in POLICY_FIELDS
        }


def _dollars(
    min_threshold: str, min_recharge: str, max_recharge: str, per_day: str, per_30_days: str
) -> dict[str, Decimal]:
    values = (min_threshold, min_recharge, max_recharge, per_day, per_30_days)
    return dict(zip(AMOUNT_FIELDS, map(Decimal, values), strict=True))


# The built-in amounts of the currencies most used; any other currency needs its own [recharge.currencies.XXX].
# A table in config.toml replaces these key by key.
STANDARD_CURRENCY_POLICIES: Mapping[str, Mapping[str, Decimal]] = {
    **{code: _dollars("5", "10", "1000", "2000", "10000") for code in ("USD", "EUR", "GBP", "CAD", "AUD", "CHF")},
    "JPY": _dollars("500", "1000", "100000", "200000", "1000000"),
}


class RechargeSettings(_Section):
    window_days: int = Field(30, ge=1, le=366)
    threshold_days: int = Field(7, ge=1, le=366)
    recharge_days: int = Field(14, ge=1, le=366)
    # Amounts per currency (see STANDARD_CURRENCY_POLICIES for the built-in ones).
    currencies: dict[Currency, CurrencyPolicySettings] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _per_currency(cls, data: Any) -> Any:
        """Amounts are per currency: bare ones are refused with where they go now; the built-in tables are merged
        under the configured ones, key by key."""
        if not isinstance(data, Mapping):
            return data
        bare = [name for name in AMOUNT_FIELDS if name in data]
        if bare:
            raise ValueError(
                f"{', '.join(bare)}: recharge amounts are set per currency now; move them to a "
                "[recharge.currencies.USD] table (one per currency you bill in)"
            )
        configured = data.get("currencies", {})
        if not isinstance(configured, Mapping):
            return data
        merged: dict[str, Any] = {code: dict(values) for code, values in STANDARD_CURRENCY_POLICIES.items()}
        for code, values in configured.items():
            key = code.strip().upper() if isinstance(code, str) else code
            base = merged.get(key, {})
            merged[key] = {**base, **values} if isinstance(values, Mapping) else values
        return {**data, "currencies": merged}

    def policy(self, currency: str, plan: PlanSettings | None = None) -> Policy:
        """The recharge policy of `currency` in Units, with `plan`'s own settings over it; ConfigError when the
        currency has no amounts configured."""
        amounts = self.currencies.get(currency)
        if amounts is None:
            raise ConfigError(
                f"no recharge amounts for {currency}: add a [recharge.currencies.{currency}] table "
                f"({', '.join(AMOUNT_FIELDS)})"
            )
        policy = Policy(
            window_days=self.window_days,
            threshold_days=self.threshold_days,
            recharge_days=self.recharge_days,
            min_threshold=parse_amount(amounts.min_threshold),
            min_recharge=parse_amount(amounts.min_recharge),
            max_recharge=_units(amounts.max_recharge),
            max_charged_per_day=_units(amounts.max_charged_per_day),
            max_charged_per_30_days=_units(amounts.max_charged_per_30_days),
        )
        if plan is not None and plan.recharge is not None:
            policy = policy.overridden(plan.recharge.overrides())
        return policy


def _units(value: Decimal | None) -> int | None:
    return None if value is None else parse_amount(value)


class PaymentsSettings(_Section):
    """The payment processor, retries and the limits that keep declined cards from being hammered."""

    stripe_api_base: str = Field("https://api.stripe.com", pattern=r"^https?://[^\s/]+(:\d+)?/?$")
    timeout_seconds: float = Field(30.0, gt=0, le=300)
    # Transient failures (connection, timeout, 409, 429, 5xx) are retried inline with the same key.
    max_retries: int = Field(4, ge=0, le=20)
    retry_initial_seconds: float = Field(0.5, ge=0, le=60)
    retry_max_seconds: float = Field(8.0, ge=0, le=600)
    # Stripe keeps idempotency keys for 24 hours; recovery re-sends with the same key only within this window,
    # and after it only looks the payment up.
    idempotency_window_hours: float = Field(23.0, gt=0, le=24)
    # When every funding source fails, retry after these hours; after the last step auto-recharge is suspended.
    retry_schedule_hours: list[Annotated[float, Field(gt=0, le=24 * 30)]] = Field(
        default_factory=lambda: [4.0, 24.0, 72.0], min_length=1, max_length=10
    )
    max_declines_per_card_30_days: int = Field(8, ge=1, le=15)
    card_retry_after_decline_hours: float = Field(24.0, ge=0, le=24 * 30)
    # How long one worker may hold a recharge while it talks to the processor before another may take it over.
    lease_seconds: int = Field(300, ge=30, le=3600)
    # Requests per second the whole deployment sends to the processor at most (Stripe allows 100 in live mode): on
    # PostgreSQL every instance takes its turns from one budget in the database; on SQLite the one instance's.
    max_requests_per_second: float = Field(90.0, gt=0, le=10_000)
    # This many integration errors in a row (the processor refusing our own request) stop the cycle's charging.
    max_integration_errors: int = Field(3, ge=1, le=1000)
    # No charge is started while our clock is further than this from the processor's (its `Date` header).
    max_clock_skew_seconds: int = Field(3600, ge=1, le=86_400)

    @property
    def max_clock_skew(self) -> timedelta:
        return timedelta(seconds=self.max_clock_skew_seconds)


class TimeRateSettings(_Section):
    measure: Literal["time"]
    price_per_minute: Money
    increment_seconds: int = Field(60, ge=1, le=3_600)
    minimum_seconds: int = Field(0, ge=0, le=3_600)
    connect_fee: Money = Decimal(0)

    def rate(self) -> TimeRate:
        return TimeRate(
            price_per_minute=parse_amount(self.price_per_minute),
            increment_seconds=self.increment_seconds,
            minimum_seconds=self.minimum_seconds,
            connect_fee=parse_amount(self.connect_fee),
        )


class CountRateSettings(_Section):
    measure: Literal["count"]
    price_per_unit: Money
    unit: KindName = "unit"

    def rate(self) -> CountRate:
        return CountRate(price_per_unit=parse_amount(self.price_per_unit), unit=self.unit)


RateSettings = Annotated[TimeRateSettings | CountRateSettings, Field(discriminator="measure")]


class PlanSettings(_Section):
    currency: Currency
    rates: dict[KindName, RateSettings] = Field(min_length=1)
    # The plan's own recharge settings over [recharge] and [recharge.currencies.<its currency>].
    recharge: PlanPolicySettings | None = None

    def rate_table(self) -> dict[str, Rate]:
        return {kind: settings.rate() for kind, settings in self.rates.items()}


def _standard_plan() -> dict[str, PlanSettings]:
    time = TimeRateSettings.model_validate
    count = CountRateSettings.model_validate
    return {
        "standard": PlanSettings(
            currency="USD",
            rates={
                "dialer": time({"measure": "time", "price_per_minute": Decimal("0.0200")}),
                "outbound": time({"measure": "time", "price_per_minute": Decimal("0.0140")}),
                "inbound": time({"measure": "time", "price_per_minute": Decimal("0.0085")}),
                "recording": time({"measure": "time", "price_per_minute": Decimal("0.0025"), "increment_seconds": 1}),
                "sms_out": count({"measure": "count", "price_per_unit": Decimal("0.0079"), "unit": "segment"}),
                "sms_in": count({"measure": "count", "price_per_unit": Decimal("0.0079"), "unit": "segment"}),
                "mms_out": count({"measure": "count", "price_per_unit": Decimal("0.0200"), "unit": "segment"}),
                "lookup": count({"measure": "count", "price_per_unit": Decimal("0.0100"), "unit": "lookup"}),
                "ai_voice_detection": count({"measure": "count", "price_per_unit": Decimal("0.0075"), "unit": "call"}),
            },
        )
    }


class DaemonSettings(_Section):
    """What `recharged run` schedules, and how hard it works."""

    cycle_interval_hours: float = Field(4.0, gt=0, le=24)
    # Each cycle starts up to this many seconds late, at random, so instances and restarts spread out.
    cycle_jitter_seconds: int = Field(300, ge=0, le=3600)
    # A cycle that could not start on time (the daemon was stopped or busy) still runs if it is this late at most.
    misfire_grace_seconds: int = Field(1800, ge=1, le=86_400)
    # The completer finishes recharges left half-way (a crash, a processor that did not answer) this often.
    completer_interval_seconds: int = Field(300, ge=1, le=3600)
    # Charges sent to the processor at once during a cycle.
    charge_concurrency: int = Field(32, ge=1, le=256)
    # Charge an account at once, without waiting for the next cycle, when its balance lasts less than the time
    # to that cycle plus this margin.
    urgent_margin_hours: float = Field(2.0, ge=0, le=168)
    # On SIGTERM, in-flight charges get this long to finish before the daemon exits anyway (recovery completes
    # whatever is left on the next start).
    shutdown_timeout_seconds: float = Field(60.0, gt=0, le=600)

    @property
    def cycle_interval(self) -> timedelta:
        return timedelta(hours=self.cycle_interval_hours)

    @property
    def cycle_grace(self) -> timedelta:
        """How late a cycle may be before it counts as overdue: its jitter plus its misfire grace."""
        return timedelta(seconds=self.misfire_grace_seconds + self.cycle_jitter_seconds)


class HttpSettings(_Section):
    """The daemon's HTTP server: health, metrics, the usage and account API, Stripe webhooks."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8450, ge=0, le=65_535)
    # Largest request body accepted, and most usage events in one POST /v1/usage.
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    max_events_per_request: int = Field(1000, ge=1, le=50_000)
    # A Stripe webhook signed longer ago than this is refused (replay protection).
    webhook_tolerance_seconds: int = Field(300, ge=1, le=3600)


class ApiSettings(_Section):
    """`recharged api`: the HTTP API in a process of its own (its own systemd unit), so that the daemon's charge
    cycles, statements and jobs never hold up a dialer's authorization. It serves the same endpoints as the daemon's
    [http] server, with the same limits; on PostgreSQL several may run, each on its own port."""

    host: str = "127.0.0.1"
    port: int = Field(8451, ge=0, le=65_535)
    # Database connections it keeps open: one per request served at once (FastAPI runs them in up to 40 threads).
    connections: int = Field(40, ge=1, le=200)


class BusinessSettings(_Section):
    """Who issues receipts and statements: shown on every message (and kept with each receipt as issued)."""

    name: str = Field("recharged", min_length=1, max_length=200)
    # Postal address; lines separated by "\n".
    address: str = Field("", max_length=1000)
    vat_id: str = Field("", max_length=40)
    website: str = Field("", max_length=200)


class ReceiptsSettings(_Section):
    """Credit receipts: numbered per issuer, with no gaps, as ISSUER-000001."""

    issuer: str = Field("R", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,19}$")
    # The usage kind whose price per minute tells the customer how many minutes the new balance buys.
    minutes_kind: KindName = "dialer"


class SmtpSettings(_Section):
    """The mail server; with no host, messages are written as .eml files into [outbox] folder instead.
    The password comes only from RECHARGED_SMTP_PASSWORD or the credential smtp_password."""

    host: str = Field("", max_length=253)
    port: int = Field(587, ge=1, le=65_535)
    # starttls (port 587), tls (implicit TLS, port 465) or none (a local relay only).
    security: Literal["starttls", "tls", "none"] = "starttls"
    user: str = Field("", max_length=254)
    from_address: str = Field("billing@example.com", pattern=r"^[^@\s<>]{1,64}@[^@\s<>]+\.[^@\s<>]{2,}$")
    # Display name of the sender (default: [business] name).
    from_name: str = Field("", max_length=200)
    reply_to: str = Field("", pattern=r"^$|^[^@\s<>]{1,64}@[^@\s<>]+\.[^@\s<>]{2,}$")
    timeout_seconds: float = Field(30.0, gt=0, le=300)


ADMIN_NOTICE_DELAY_MINUTES = 10
ADMIN_NOTICE_DELAY = timedelta(minutes=ADMIN_NOTICE_DELAY_MINUTES)  # the default, for services called without settings


class OutboxSettings(_Section):
    """The transactional outbox: how receipts and notices are delivered, retried and given up on."""

    # Where messages go as .eml files when [smtp] host is empty.
    folder: str = Field("outbox", min_length=1)
    # The sender's journal of messages the server accepted (fsync'ed before the database records it).
    journal: str = Field("outbox.journal", min_length=1)
    # A folder of templates that replace the shipped ones of the same name (empty: the shipped ones).
    templates_dir: str = ""
    # Transient SMTP failures (connection, 4xx) are retried at once this many times with exponential back-off.
    max_retries: int = Field(3, ge=0, le=20)
    retry_initial_seconds: float = Field(1.0, ge=0, le=60)
    retry_max_seconds: float = Field(30.0, ge=0, le=600)
    # After a delivery run fails, wait this long before the next, one step per failed run; failed after the last.
    retry_after_minutes: list[Annotated[float, Field(gt=0, le=24 * 60 * 7)]] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 480.0, 1440.0], min_length=1, max_length=20
    )
    # How long one sender may hold a message while talking to the server before recovery decides its fate.
    lease_seconds: int = Field(300, ge=30, le=3600)
    # How often the daemon delivers what is pending.
    send_interval_seconds: int = Field(60, ge=1, le=3600)
    # A notice of an admin's change to an account is sent this long after the change; the account's further
    # changes until then join that one message (0: each change is told on its own, at once).
    admin_notice_delay_minutes: int = Field(ADMIN_NOTICE_DELAY_MINUTES, ge=0, le=24 * 60)

    @property
    def admin_notice_delay(self) -> timedelta:
        return timedelta(minutes=self.admin_notice_delay_minutes)


ALL_EVENTS = "*"


def _event_type(value: str) -> str:
    if value != ALL_EVENTS and value not in {t.value for t in WebhookEventType}:
        raise ValueError(f'not an event type; one of {", ".join(t.value for t in WebhookEventType)}, or "*" for all')
    return value


def _webhook_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


class WebhookEndpointSettings(_Section):
    """One receiver of signed events (`[[webhooks.endpoints]]`). Its signing secret comes only from
    RECHARGED_WEBHOOK_SECRET_<NAME> or the credential webhook_secret_<name> (`recharged.mail.webhook_sender`)."""

    name: KindName
    url: Annotated[str, Field(max_length=2000), AfterValidator(_webhook_url)]
    # Event types (WebhookEventType) this endpoint receives, or ["*"] for all of them.
    events: list[Annotated[str, AfterValidator(_event_type)]] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if any(isinstance(key, str) and _SECRET_KEY.search(key) for key in data):
            raise ValueError(
                "secrets never go in config.toml: set the endpoint's signing secret in RECHARGED_WEBHOOK_SECRET_<NAME> "
                "or the credential webhook_secret_<name>"
            )
        url = data.get("url")
        if isinstance(url, str) and "@" in urlsplit(url).netloc:  # refused here, so the message never repeats it
            raise ValueError("url: a user or password in the URL is a secret, and secrets never go in config.toml")
        return data

    def wants(self, event_type: str) -> bool:
        return ALL_EVENTS in self.events or event_type in self.events


class WebhooksSettings(_Section):
    """Signed events to the CRM (Standard Webhooks): where they go, how long one request may take, and the retry
    schedule of a delivery that failed."""

    endpoints: list[WebhookEndpointSettings] = Field(default_factory=list, max_length=20)
    timeout_seconds: float = Field(15.0, gt=0, le=60)
    # After a failed attempt, wait this long before the next, one step per attempt; failed after the last step.
    retry_after_seconds: list[Annotated[float, Field(gt=0, le=7 * 86_400)]] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0], min_length=1, max_length=20
    )
    # How often the daemon looks for events and deliveries that are due.
    send_interval_seconds: int = Field(5, ge=1, le=3600)

    @model_validator(mode="after")
    def _unique_names(self) -> WebhooksSettings:
        names = [endpoint.name for endpoint in self.endpoints]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"endpoint names must be unique: {', '.join(twice)} given more than once")
        return self

    @property
    def lease(self) -> timedelta:
        """How long a sender holds a delivery before another may take it over: well past one request's timeout."""
        return timedelta(seconds=max(60.0, 4 * self.timeout_seconds))


class AuthorizationSettings(_Section):
    """Call authorizations (`POST /v1/authorizations`): the longest call authorized when the dialer asks for no
    length, and how long past its authorized length an unsettled reservation is held before it expires."""

    max_seconds: int = Field(7200, ge=1, le=86_400)
    grace_seconds: int = Field(300, ge=0, le=86_400)
    # How often the daemon expires the reservations whose time is up (each account's are also expired as it
    # authorizes its next call).
    expire_interval_seconds: int = Field(30, ge=1, le=3600)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Section):
    """Every setting recharged has; `config.toml` in the repository lists them with their defaults."""

    database: DatabaseSettings = DatabaseSettings()
    usage: UsageSettings = UsageSettings()
    recharge: RechargeSettings = RechargeSettings()
    payments: PaymentsSettings = PaymentsSettings()
    plans: dict[KindName, PlanSettings] = Field(default_factory=_standard_plan, min_length=1)
    daemon: DaemonSettings = DaemonSettings()
    http: HttpSettings = HttpSettings()
    api: ApiSettings = ApiSettings()
    business: BusinessSettings = BusinessSettings()
    receipts: ReceiptsSettings = ReceiptsSettings()
    smtp: SmtpSettings = SmtpSettings()
    outbox: OutboxSettings = OutboxSettings()
    webhooks: WebhooksSettings = WebhooksSettings()
    authorizations: AuthorizationSettings = AuthorizationSettings()
    logging: LoggingSettings = LoggingSettings()
    _path: Path | None = PrivateAttr(default=None)  # the file these were read from (load_settings), not a setting

    @property
    def source(self) -> str:
        """The configuration in use, as messages name it: its file (`--config other.toml`), else "the
        configuration"."""
        return "the configuration" if self._path is None else str(self._path)

    def __eq__(self, other: object) -> bool:
        """The same settings, whichever file they were read from."""
        if not isinstance(other, Settings):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def policy_of(self, plan: str) -> Policy:
        """The recharge policy of a plan: [recharge], its currency's amounts, then the plan's own settings."""
        settings = self.plans[plan]
        return self.recharge.policy(settings.currency, settings)

    def policy_problems(self) -> list[str]:
        """Every plan whose currency has no recharge amounts, and every contradiction in the amounts in force
        (each currency's, each plan's), as `key: problem`."""
        problems = []
        for code in sorted(self.recharge.currencies):
            policy = self.recharge.policy(code)
            problems += [f"recharge.currencies.{code}: {problem}" for problem in contradictions(policy, code)]
        for name, plan in sorted(self.plans.items()):
            if plan.currency not in self.recharge.currencies:
                problems.append(
                    f"plans.{name}: priced in {plan.currency}, which has no recharge amounts: add a "
                    f"[recharge.currencies.{plan.currency}] table ({', '.join(AMOUNT_FIELDS)})"
                )
            elif plan.recharge is not None:
                policy = self.policy_of(name)
                own = f"plans.{name}.recharge (over recharge.currencies.{plan.currency})"
                problems += [f"{own}: {problem}" for problem in contradictions(policy, plan.currency)]
        return problems


def default_config_path(environ: Mapping[str, str]) -> Path | None:
    """`$RECHARGED_CONFIG`, else ./config.toml when it exists, else none (built-in defaults)."""
    if environ.get("RECHARGED_CONFIG"):
        return Path(environ["RECHARGED_CONFIG"])
    local = Path("config.toml")
    return local if local.is_file() else None


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate the configuration; raise ConfigError listing every problem."""
    env = os.environ if environ is None else environ
    source = str(path) if path is not None else "built-in defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle, parse_float=Decimal)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        _refuse_secrets(data, path)

    env_paths = _apply_environment(data, env)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(error, source, env_paths) for error in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    problems = [f"{source}: {p}" for p in settings.policy_problems()]
    url_source = env_paths.get(("database", "url"))
    problems += [
        f"{'environment ' + url_source if url_source else source}: database.url: {p}"
        for p in database_url_problems(settings.database.url, from_environment=url_source is not None)
    ]
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    settings._path = path
    return settings


SQLITE_FORMS = "sqlite:///relative/path.db or sqlite:////absolute/path.db"


def database_url_problems(url: str, *, from_environment: bool) -> list[str]:
    """What is wrong with a database URL, without connecting: only SQLite files and PostgreSQL are supported, and
    a password may be written into the URL only in the environment (config.toml is not a place for secrets)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        if url.startswith("sqlite:"):
            return [f"{url!r} is not a SQLite URL: write {SQLITE_FORMS}"]
        return [f"{url!r} is not a URL: write {SQLITE_FORMS}, or postgresql://user@host/database"]
    kind = scheme.split("+", 1)[0].lower()
    if kind == "sqlite":
        if not rest.startswith("/") or rest.strip("/") == "":
            return [f"{url!r} names no database file: write {SQLITE_FORMS}"]
        return []
    if kind not in ("postgresql", "postgres"):
        return [f"{scheme}:// is not supported: recharged runs on SQLite ({SQLITE_FORMS}) or PostgreSQL"]
    authority = rest.split("/", 1)[0]
    database = rest.split("/", 1)[1].split("?", 1)[0] if "/" in rest else ""
    problems = []
    if not database:
        problems.append("the PostgreSQL URL names no database: write postgresql://user@host/database")
    user_info = authority.rpartition("@")[0] if "@" in authority else ""
    if ":" in user_info and not from_environment:
        problems.append(
            "a password in the URL in a config file: remove it, and give it in the environment "
            "(RECHARGED_DATABASE__URL, PGPASSWORD) or a pgpass file (PGPASSFILE)"
        )
    return problems


def _refuse_secrets(data: Mapping[str, Any], path: Path, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _refuse_secrets(value, path, dotted + ".")
        elif _SECRET_KEY.search(key):
            hint = ", ".join(f"{env_name(name)}" for name in SECRET_NAMES)
            raise ConfigError(
                f"{path}: {dotted}: secrets never go in config.toml; remove it and set it in the environment "
                f"or as a systemd credential ({hint})"
            )


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Merge RECHARGED_<SECTION>__<KEY> variables into `data`; return which key paths they set."""
    applied: dict[tuple[str, ...], str] = {}
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or "__" not in variable:
            continue
        keys = tuple(part.lower() for part in variable[len(ENV_PREFIX) :].split("__"))
        if any(not part for part in keys):
            raise ConfigError(f"environment {variable}: empty key segment")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {variable}: {'.'.join(keys)} is not a table in the config")
            node = child
        node[keys[-1]] = value
        applied[keys] = variable
    return applied


def _describe_error(error: Any, source: str, env_paths: Mapping[tuple[str, ...], str]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    # Drop the discriminator tag pydantic inserts for rate tables (rates.dialer.time.price -> rates.dialer.price).
    loc = tuple(p for i, p in enumerate(loc) if not (i >= 3 and loc[i - 2] == "rates" and p in ("time", "count")))
    # The variable that set this key, or the one key under it that a variable set (a misspelt section).
    setters = [variable for path, variable in env_paths.items() if path[: len(loc)] == loc or loc[: len(path)] == path]
    where = f"environment {', '.join(sorted(setters))}" if setters else source
    key = ".".join(loc) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        message = "unknown setting" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        return f"{where}: {key}: {message}"
    if error["type"] == "missing":
        return f"{where}: {key}: required setting is missing"
    if error["type"] == "union_tag_invalid":
        message = "measure must be 'time' (price per minute) or 'count' (price per unit)"
    if loc and loc[-1] in AMOUNT_FIELDS[2:] and error["type"] == "decimal_parsing":
        message = 'must be an amount such as 1000.00, or "off" for no cap'
    elif loc and loc[-1] in AMOUNT_FIELDS and error["type"] == "decimal_parsing":
        message = "must be an amount such as 10.00"
    value = error.get("input")
    shown = f"{value!r}" if not isinstance(value, dict) else "{...}"
    if isinstance(value, Decimal):
        shown = str(value)
    return f"{where}: {key} = {shown}: {message}"


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    model: Any = Settings
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return []
        if part in fields:
            annotation = fields[part].annotation
            model = annotation
            continue
        return []
    fields = getattr(model, "model_fields", None)
    return sorted(fields) if fields else []


__all__ = ["PLACES", "Settings", "load_settings"]
