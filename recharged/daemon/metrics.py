"""Prometheus metrics of one daemon: `recharged_` prefix, base units (seconds, currency units), `_total` counters.

Each daemon builds its own registry (no global state), so tests can run several side by side. `Metrics` is
also the charge flow's `Observer` and the event inbox's: it hears decisions, attempts, credits and events as
they happen. What waits in the database (accounts needing attention, the outbox's backlog) is read when
Prometheus scrapes, by the function given to `watch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from recharged.balance import AccountPlan
from recharged.money import Units, to_decimal
from recharged.states import AttemptStatus
from recharged.status import Backlog

CONTENT_TYPE = CONTENT_TYPE_LATEST
log = structlog.get_logger("recharged.metrics")


class BacklogCollector(Collector):
    """Gauges read from the database at each scrape: one cheap read (two GROUP BY queries). When the database
    cannot be read they are left out of that scrape (/readyz and /healthz say why), never made up."""

    def __init__(self, read: Callable[[], Backlog]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            backlog = self._read()
        except Exception as exc:  # a scrape must answer; the gauges are absent from it instead
            log.warning("metrics.backlog_unread", error=f"{type(exc).__name__}: {exc}"[:300])
            return []
        return self._families(backlog)

    @staticmethod
    def _families(backlog: Backlog | None) -> list[Metric]:
        attention = GaugeMetricFamily(
            "recharged_accounts_attention",
            "Open accounts needing a person, by reason: backing_off, suspended, action_required, disputed, "
            "no_usable_card (automatic recharge on and no card that can be charged); one reason each",
            labels=["reason"],
        )
        outbox = GaugeMetricFamily(
            "recharged_outbox_messages", "Emails not sent yet, by status: pending, sending, failed", labels=["status"]
        )
        oldest = GaugeMetricFamily(
            "recharged_outbox_oldest_pending_seconds", "How long the oldest pending email has waited (0: none waits)"
        )
        if backlog is not None:
            for reason, count in backlog.attention.items():
                attention.add_metric([reason], count)
            for status, count in backlog.outbox.items():
                outbox.add_metric([status], count)
            oldest.add_metric([], backlog.oldest_pending_seconds)
        return [attention, outbox, oldest]


class WebhookCollector(Collector):
    """Deliveries of events to the CRM not delivered yet, by endpoint and status, read at each scrape (left out of
    a scrape when the database cannot be read)."""

    def __init__(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return [self._family({})]

    def collect(self) -> Iterable[Metric]:
        try:
            counts = self._read()
        except Exception as exc:
            log.warning("metrics.webhooks_unread", error=f"{type(exc).__name__}: {exc}"[:300])
            return []
        return [self._family(counts)]

    @staticmethod
    def _family(counts: Mapping[tuple[str, str], int]) -> Metric:
        family = GaugeMetricFamily(
            "recharged_webhook_deliveries",
            "Webhook deliveries not delivered yet, by endpoint and status: pending, sending, failed (for good)",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), count in sorted(counts.items()):
            family.add_metric([endpoint, status], count)
        return family


class ReservationCollector(Collector):
    """Open call authorizations and the money they hold, per currency, read at each scrape (left out of a scrape
    when the database cannot be read)."""

    def __init__(self, read: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        try:
            held = self._read()
        except Exception as exc:
            log.warning("metrics.reservations_unread", error=f"{type(exc).__name__}: {exc}"[:300])
            return []
        return self._families(held)

    @staticmethod
    def _families(held: Mapping[str, tuple[int, int]]) -> list[Metric]:
        count = GaugeMetricFamily(
            "recharged_authorizations_open", "Open call authorizations, per currency", labels=["currency"]
        )
        amount = GaugeMetricFamily(
            "recharged_reserved_amount",
            "Money held for calls in progress, per currency, in currency units",
            labels=["currency"],
        )
        for currency, (open_count, units) in sorted(held.items()):
            count.add_metric([currency], open_count)
            amount.add_metric(
                [currency], float(to_decimal(units))
            )  # samples are floats: the exact sum is in the ledger
        return [count, amount]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cycles = Counter("recharged_cycles", "Recharge cycles run, by outcome", ["outcome"], registry=r)
        self.cycle_duration = Histogram(
            "recharged_cycle_duration_seconds",
            "How long a recharge cycle took",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
            registry=r,
        )
        self.last_success = Gauge(
            "recharged_last_successful_cycle_timestamp_seconds",
            "When the last recharge cycle of this instance finished without error (Unix time)",
            registry=r,
        )
        self.decisions = Counter(
            "recharged_decisions",
            "Recharge decisions taken in cycles, by action and reason",
            ["action", "reason"],
            registry=r,
        )
        self.charges = Counter(
            "recharged_charges",
            "Charge attempts sent to the payment processor, by outcome",
            ["outcome"],
            registry=r,
        )
        self.clock_skew = Gauge(
            "recharged_processor_clock_skew_seconds",
            "Our wall clock minus the payment processor's, from its last answer's Date header",
            registry=r,
        )
        self.recovery_failures = Counter(
            "recharged_recovery_failures", "Recharges whose recovery failed (retried later with backoff)", registry=r
        )
        self.declines = Counter(
            "recharged_declines", "Declined charge attempts by class (hard, soft)", ["decline_class"], registry=r
        )
        self.charged_amount = Counter(
            "recharged_credited_amount",
            "Amounts credited to balances after successful charges, in currency units (net of VAT)",
            ["currency", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "recharged_payment_retries", "Inline retries of transient payment-processor failures", ["call"], registry=r
        )
        self.processor_errors = Counter(
            "recharged_payment_errors", "Processor calls that failed after their retries", ["call"], registry=r
        )
        self.usage_events = Counter(
            "recharged_usage_events", "Usage events received over the API, by outcome", ["outcome"], registry=r
        )
        self.job_runs = Counter(
            "recharged_job_runs", "Scheduled job runs by job and outcome", ["job", "outcome"], registry=r
        )
        self.jobs_missed = Counter(
            "recharged_jobs_missed",
            "Scheduled runs that could not start within their grace time",
            ["job"],
            registry=r,
        )
        self.webhooks = Counter(
            "recharged_webhooks",
            "Stripe webhook deliveries by outcome: stored (to handle), duplicate, ignored, bad_signature, malformed",
            ["outcome"],
            registry=r,
        )
        self.events = Counter(
            "recharged_events",
            "Processor events handled from the inbox, by outcome: handled, not_ours, failed (retried later)",
            ["outcome"],
            registry=r,
        )
        self.urgent_charges = Counter(
            "recharged_urgent_charges",
            "Accounts charged between cycles because their runway was too short",
            registry=r,
        )
        self.authorizations = Counter(
            "recharged_authorizations",
            "Call authorizations asked for, by outcome: granted, repeated (the same call again), refused (402)",
            ["outcome"],
            registry=r,
        )
        self.authorizations_expired = Counter(
            "recharged_authorizations_expired",
            "Reservations that expired unsettled (no usage came for the call in its time plus the grace)",
            registry=r,
        )
        self.http_duration = Histogram(
            "recharged_http_request_duration_seconds",
            "How long the HTTP server took to answer, by method, route (its template: /v1/accounts/{account_id}; "
            "other when none matched) and status code",
            ["method", "route", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    # --- the charge flow's Observer ------------------------------------------------------------------------

    def decided(self, plan: AccountPlan) -> None:
        self.decisions.labels(plan.decision.action, plan.decision.reason).inc()

    def attempted(self, status: str, decline_class: str | None) -> None:
        self.charges.labels(status).inc()
        if status == AttemptStatus.DECLINED:
            self.declines.labels(decline_class or "unknown").inc()

    def recovery_failed(self, recharge_id: int) -> None:
        self.recovery_failures.inc()

    def event_processed(self, outcome: str) -> None:
        self.events.labels(outcome).inc()

    def credited(self, kind: str, amount: Units, currency: str) -> None:
        # Prometheus samples are floats: the exact amount is in the ledger, this one is for graphs and alerts.
        self.charged_amount.labels(currency, kind).inc(float(to_decimal(amount)))

    def watch(self, read: Callable[[], Backlog]) -> None:
        """Show the accounts needing attention and the outbox's backlog, as `read` finds them at each scrape."""
        self.registry.register(BacklogCollector(read))

    def watch_webhooks(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Show the webhook deliveries not delivered yet, as `read` finds them at each scrape."""
        self.registry.register(WebhookCollector(read))

    def watch_reservations(self, read: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Show the open authorizations and the money they hold, as `read` finds them at each scrape."""
        self.registry.register(ReservationCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
