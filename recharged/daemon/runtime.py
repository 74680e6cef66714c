"""What the daemon's jobs and HTTP handlers work with, built from one validated configuration.

A reload (SIGHUP) builds a new `Runtime` and swaps the daemon's reference to it in one assignment: work that
started with the old settings finishes with them, new work sees the new ones, and nothing sees a mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from recharged import credentials as secrets
from recharged.clock import Clock
from recharged.config import Settings
from recharged.daemon.health import LastCall
from recharged.daemon.metrics import Metrics
from recharged.errors import ConfigError
from recharged.events import EventService
from recharged.payments import PaymentGateway, RateLimiter, StripeGateway
from recharged.recharge import RechargeService
from recharged.store.budget import shared_budget
from recharged.store.engine import Database
from recharged.tokens import ApiToken, configured_tokens
from recharged.usage import UsageRecorder


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    recharges: RechargeService
    usage: UsageRecorder
    events: EventService
    api_tokens: tuple[ApiToken, ...]
    webhook_secret: str | None


def stripe_gateway(
    settings: Settings, processor: LastCall | None, metrics: Metrics | None, clock: Clock | None = None
) -> PaymentGateway:
    """The Stripe gateway; the key comes only from the environment or systemd credentials. Its clock skew is
    measured against `clock` (the system clock when None)."""
    key = secrets.read_secret("stripe_api_key")
    if key is None:
        raise ConfigError("no Stripe API key: set RECHARGED_STRIPE_API_KEY or the systemd credential stripe_api_key")
    payments = settings.payments

    def on_call(call: str, error: str | None) -> None:
        if processor is not None:
            processor.record(call, error)
        if metrics is not None and error is not None:
            metrics.processor_errors.labels(call).inc()

    def on_skew(skew: timedelta) -> None:
        if processor is not None:
            processor.record_skew(skew)
        if metrics is not None:
            metrics.clock_skew.set(skew.total_seconds())

    def on_retry(call: str) -> None:
        if metrics is not None:
            metrics.retries.labels(call).inc()

    return StripeGateway(
        key.value,
        api_base=payments.stripe_api_base,
        timeout_seconds=payments.timeout_seconds,
        max_retries=payments.max_retries,
        retry_initial_seconds=payments.retry_initial_seconds,
        retry_max_seconds=payments.retry_max_seconds,
        rate_limiter=rate_limiter(settings),
        on_call=on_call,
        on_retry=on_retry,
        on_skew=on_skew,
        now=None if clock is None else clock.now,
    )


def rate_limiter(settings: Settings) -> RateLimiter:
    """`payments.max_requests_per_second` for the whole deployment: on PostgreSQL every instance (and command) takes
    its turn from one budget in the database; on SQLite, where one instance works on a database file, the process
    paces itself."""
    per_second = settings.payments.max_requests_per_second
    budget = shared_budget(settings.database.url)
    if budget is None:
        return RateLimiter(per_second)
    return RateLimiter(per_second, shared=lambda rate: budget.take(rate).wait)


def build_runtime(
    settings: Settings,
    db: Database,
    clock: Clock,
    metrics: Metrics,
    processor: LastCall,
    gateway: Callable[[Settings], PaymentGateway] | None = None,
) -> Runtime:
    """Everything that depends on the configuration, checked before it is used (a missing key fails here)."""
    make_gateway = gateway or (lambda s: stripe_gateway(s, processor, metrics, clock))
    the_gateway = make_gateway(settings)
    recharges = RechargeService(db, settings, lambda: the_gateway, clock, observer=metrics)
    webhook_secret = secrets.read_secret("stripe_webhook_secret")
    return Runtime(
        settings=settings,
        recharges=recharges,
        usage=UsageRecorder(db, settings, clock, on_backdated=recharges.thresholds.forget),
        events=EventService(db, recharges, clock, observer=metrics),
        api_tokens=configured_tokens(),
        webhook_secret=None if webhook_secret is None else webhook_secret.value,
    )
