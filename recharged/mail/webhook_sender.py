"""Delivering events to the CRM's webhook endpoints, signed per the Standard Webhooks specification.

Each endpoint (`[[webhooks.endpoints]]`) has its own signing secret, `whsec_` and the base64 of 24 to 64 random
bytes, from RECHARGED_WEBHOOK_SECRET_<NAME> or the systemd credential webhook_secret_<name>, never from config.toml.
A delivery is a POST of the event's body (`webhooks.py`) with

    webhook-id: the event's id: the same for every retry and every endpoint (the receiver's idempotency key)
    webhook-timestamp: when this attempt was made, in Unix seconds
    webhook-signature: v1,<base64 of HMAC-SHA256 of "{id}.{timestamp}.{body}", keyed with the decoded secret>

A 2xx answer delivers it. Anything else (another status, a redirect, a timeout, a refused connection) is tried
again after the next step of `[webhooks] retry_after_seconds`; after the last step the delivery has failed, and
`recharged status`, /healthz and /metrics show it until `recharged webhooks replay` queues it again.

At least once: a delivery is claimed under a lease (one conditional UPDATE, which one sender alone wins, on one
PostgreSQL or several instances of the daemon), posted with no transaction open, then recorded. A sender that dies
in between leaves it `sending` until its lease runs out; the next sender posts it again, with the same id.

Isolation: each endpoint's queue has its own worker, which posts one delivery at a time, so a slow or dead
endpoint holds up nothing but its own queue; and the charge flow only ever writes events, never waits for one. A
request that times out or cannot connect ends that endpoint's run: the rest of its queue waits for the next run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import requests
import structlog
from sqlalchemy import or_, select, update

from recharged import __version__
from recharged.clock import Clock
from recharged.config import Settings
from recharged.credentials import describe, env_name, read_secret
from recharged.errors import ConfigError
from recharged.mail.webhook_deliveries import route_events
from recharged.states import WebhookStatus
from recharged.store.engine import Database
from recharged.store.models import WebhookDelivery, WebhookEvent
from recharged.store.runs import instance_name

log = structlog.get_logger("recharged.webhooks")

WHSEC = "whsec_"
KEY_BYTES = (24, 64)  # the specification's bounds on a symmetric secret
KEY_FORM = "whsec_ and the base64 of 24 to 64 random bytes"


# --- endpoints and their secrets ----------------------------------------------------------------------------------


def secret_name(endpoint: str) -> str:
    """The credential (and, upper-cased, the RECHARGED_ variable) that holds an endpoint's signing secret."""
    return f"webhook_secret_{endpoint}"


@dataclass(frozen=True)
class Endpoint:
    """A configured endpoint with its signing key; the key never shows in repr, str or logs."""

    name: str
    url: str
    events: tuple[str, ...]
    key: bytes = field(repr=False)

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


def signing_key(secret: str) -> bytes | None:
    """The HMAC key of a `whsec_<base64>` secret, or None when it is not one (of 24 to 64 bytes)."""
    if not secret.startswith(WHSEC):
        return None
    encoded = secret[len(WHSEC) :].strip()
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if KEY_BYTES[0] <= len(key) <= KEY_BYTES[1] else None


def configured_endpoints(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[Endpoint, ...]:
    """Every configured endpoint with its signing key. ConfigError naming the variable of every endpoint whose
    secret is missing or not a Standard Webhooks secret (the value itself is never shown)."""
    endpoints, problems = [], []
    for configured in settings.webhooks.endpoints:
        name = secret_name(configured.name)
        where = f"webhooks.endpoints {configured.name!r}"
        secret = read_secret(name, environ)
        key = None if secret is None else signing_key(secret.value)
        if secret is None:
            problems.append(f"{where}: no signing secret: set {env_name(name)} or the credential {name} ({KEY_FORM})")
        elif key is None:
            problems.append(f"{where}: the signing secret in {secret.source} is not {KEY_FORM}")
        else:
            endpoints.append(Endpoint(configured.name, configured.url, tuple(configured.events), key))
    if problems:
        raise ConfigError("webhook endpoints without a valid signing secret:\n  " + "\n  ".join(problems))
    return tuple(endpoints)


def describe_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where each endpoint's secret comes from, masked, for `check-config` (ConfigError when one is missing)."""
    configured_endpoints(settings, environ)
    return {secret_name(e.name): describe(secret_name(e.name), environ) for e in settings.webhooks.endpoints}


def sign(key: bytes, event_id: str, timestamp: int, body: str) -> str:
    """The webhook-signature header: `v1,` and the base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"."""
    digest = hmac.new(key, f"{event_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


# --- the sender ---------------------------------------------------------------------------------------------------


@dataclass
class EndpointRun:
    """What one run of one endpoint's queue did (delivery ids)."""

    endpoint: str
    delivered: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    error: str | None = None  # the endpoint did not answer: the run stopped there

    def summary(self) -> dict[str, Any]:
        return {
            "delivered": len(self.delivered),
            "retrying": len(self.retrying),
            "failed": len(self.failed),
            "error": self.error,
        }


@dataclass
class WebhookReport:
    routed: int  # deliveries made for new events
    runs: list[EndpointRun]

    @property
    def ok(self) -> bool:
        return all(not run.retrying and not run.failed for run in self.runs)


def _claimable(now: Any) -> Any:
    """Deliveries a sender may take at `now`: pending and due, or left `sending` by a sender whose lease ran out."""
    d = WebhookDelivery
    return or_(
        (d.status == WebhookStatus.PENDING) & (d.next_attempt_at <= now),
        (d.status == WebhookStatus.SENDING) & (d.lease_until < now),
    )


class WebhookSender:
    """Routes new events and delivers what is due: `send_due()` once (the CLI), or `start()` from a scheduled job,
    which starts a worker for each endpoint that has none running and returns at once (the daemon)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        clock: Clock,
        endpoints: Sequence[Endpoint],
        *,
        instance: str | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._db, self._clock, self._settings = db, clock, settings.webhooks
        self.endpoints = tuple(endpoints)
        self._instance = instance or instance_name()
        self._stop = stop or threading.Event()  # the daemon's: it is shutting down
        self._closed = threading.Event()  # this sender's: replaced by another (a reload)
        self._busy: set[str] = set()
        self._idle = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None

    def route(self) -> int:
        return route_events(self._db, self.endpoints, self._clock.now())

    def send_due(self) -> WebhookReport:
        """Route new events, then deliver every endpoint's due deliveries, each endpoint in a thread of its own,
        and wait for all of them."""
        routed = self.route()
        if not self.endpoints:
            return WebhookReport(routed, [])
        with ThreadPoolExecutor(max_workers=len(self.endpoints), thread_name_prefix="webhooks") as pool:
            return WebhookReport(routed, list(pool.map(self.run_endpoint, self.endpoints)))

    def start(self) -> list[str]:
        """Route new events, then start a worker for every endpoint whose last one has finished; returns the
        endpoints started, at once (a worker still busy with a slow endpoint is left to it)."""
        self.route()
        started = []
        with self._idle:
            if self._pool is None and self.endpoints:
                self._pool = ThreadPoolExecutor(max_workers=len(self.endpoints), thread_name_prefix="webhooks")
            for endpoint in self.endpoints:
                if self._pool is None or self._stopping or endpoint.name in self._busy:
                    continue
                self._busy.add(endpoint.name)
                self._pool.submit(self._work, endpoint)
                started.append(endpoint.name)
        return started

    def _work(self, endpoint: Endpoint) -> None:
        try:
            run = self.run_endpoint(endpoint)
            if run.delivered or run.retrying or run.failed:
                log.info("webhooks.run", endpoint=endpoint.name, **run.summary())
        except Exception as exc:  # the next run tries again; a claimed delivery is taken back when its lease ends
            log.exception("webhooks.run_failed", endpoint=endpoint.name, error=str(exc))
        finally:
            with self._idle:
                self._busy.discard(endpoint.name)
                self._idle.notify_all()

    @property
    def _stopping(self) -> bool:
        return self._stop.is_set() or self._closed.is_set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker runs (tests); False when `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout)

    def close(self) -> None:
        """Start no more workers; those running finish the delivery in hand and stop."""
        self._closed.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def run_endpoint(self, endpoint: Endpoint) -> EndpointRun:
        """Deliver the endpoint's due deliveries, one at a time, oldest first, until none is left or the endpoint
        does not answer."""
        run = EndpointRun(endpoint.name)
        with requests.Session() as http:
            http.trust_env = False  # no credentials from ~/.netrc; proxies are taken from the environment below
            for delivery_id in self._due(endpoint):
                if self._stopping:
                    break
                outcome = self._deliver(http, endpoint, delivery_id)
                if outcome is None:
                    continue  # another sender took it
                status, answered, error = outcome
                getattr(run, status).append(delivery_id)
                if not answered:
                    run.error = error
                    break
        return run

    def _due(self, endpoint: Endpoint) -> Iterator[int]:
        """The endpoint's deliveries that may be taken now, in id order, 100 at a time after the last one seen."""
        last_id = 0
        while True:
            with self._db.reading() as session:
                batch = list(
                    session.scalars(
                        select(WebhookDelivery.id)
                        .where(
                            WebhookDelivery.endpoint == endpoint.name,
                            WebhookDelivery.id > last_id,
                            _claimable(self._clock.now()),
                        )
                        .order_by(WebhookDelivery.id)
                        .limit(100)
                    )
                )
            if not batch:
                return
            yield from batch
            last_id = batch[-1]

    def _claim(self, delivery_id: int) -> tuple[str, str, int] | None:
        """pending (or a lease run out) -> sending under our lease: the event's id, its body and this attempt's
        number; None when another sender has it."""
        now = self._clock.now()
        d = WebhookDelivery
        with self._db.transaction() as session:
            claimed = session.execute(
                update(d)
                .where(d.id == delivery_id, _claimable(now))
                .values(
                    status=WebhookStatus.SENDING,
                    lease_until=now + self._settings.lease,
                    claimed_by=self._instance,
                    attempts=d.attempts + 1,
                    last_attempt_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if not claimed.rowcount:  # type: ignore[attr-defined]
                return None
            row = session.execute(
                select(d.event_id, WebhookEvent.body, d.attempts)
                .join(WebhookEvent, WebhookEvent.id == d.event_id)
                .where(d.id == delivery_id)
            ).one()
            return row.event_id, row.body, row.attempts

    def _deliver(self, http: requests.Session, endpoint: Endpoint, delivery_id: int) -> tuple[str, bool, str] | None:
        """Claim, post and record one delivery: (delivered | retrying | failed, whether the endpoint answered, the
        error), or None when another sender had it."""
        claimed = self._claim(delivery_id)
        if claimed is None:
            return None
        event_id, body, attempts = claimed
        code, error = self._post(http, endpoint, event_id, body)
        schedule = self._settings.retry_after_seconds
        now = self._clock.now()
        values: dict[str, Any] = {"last_status_code": code, "last_error": None if error is None else error[:500]}
        if error is None:
            status, values["delivered_at"] = WebhookStatus.DELIVERED, now
        elif attempts > len(schedule):
            status = WebhookStatus.FAILED
        else:
            status = WebhookStatus.PENDING
            values["next_attempt_at"] = now + timedelta(seconds=schedule[attempts - 1])
        d = WebhookDelivery
        with self._db.transaction() as session:
            changed = session.execute(
                update(d)
                .where(d.id == delivery_id, d.status == WebhookStatus.SENDING, d.claimed_by == self._instance)
                .values(status=status, lease_until=None, claimed_by=None, **values)
                .execution_options(synchronize_session=False)
            )
        if not changed.rowcount:  # type: ignore[attr-defined]
            log.warning("webhook.lease_lost", delivery=delivery_id, event_id=event_id, endpoint=endpoint.name)
        fields = {"delivery": delivery_id, "event_id": event_id, "endpoint": endpoint.name, "attempt": attempts}
        if status == WebhookStatus.DELIVERED:
            log.info("webhook.delivered", status_code=code, **fields)
            return "delivered", True, ""
        if status == WebhookStatus.FAILED:
            log.error("webhook.failed", error=error, **fields)
        else:
            log.warning("webhook.retry", error=error, next_attempt_at=str(values["next_attempt_at"]), **fields)
        return ("failed" if status == WebhookStatus.FAILED else "retrying"), code is not None, error or ""

    def _post(
        self, http: requests.Session, endpoint: Endpoint, event_id: str, body: str
    ) -> tuple[int | None, str | None]:
        """POST the signed body: (the status code or None, None when it was delivered or else what went wrong)."""
        timestamp = int(self._clock.now().timestamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"recharged/{__version__}",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(endpoint.key, event_id, timestamp, body),
        }
        timeout = self._settings.timeout_seconds
        try:
            response = http.post(
                endpoint.url,
                data=body.encode(),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,  # a redirect is a failure: the URL in config.toml needs updating
                proxies=requests.utils.get_environ_proxies(endpoint.url),
            )
        except requests.Timeout:
            return None, f"no answer within {timeout:g} s"
        except requests.ConnectionError as exc:
            return None, f"could not connect: {type(exc).__name__}"
        except requests.RequestException as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}: {' '.join(response.text[:200].split())}"
