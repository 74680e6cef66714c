"""`recharged run`: the long-running service. It wires the scheduler, the HTTP server, systemd notification and
signals around the services, and owns the process's lifecycle:

- start: validate config and secrets, check the schema, refuse a second instance on SQLite, finish whatever a
  previous process left half-way, start the scheduler and the HTTP server, then READY=1;
- SIGHUP: re-read and validate config.toml, swap it in atomically; on error keep the old one and log why;
- SIGTERM / SIGINT: stop taking work (HTTP and new claims), let charges in flight finish within
  `daemon.shutdown_timeout_seconds`, exit 0. Whatever is still open is completed on the next start.

Signals are taken by the main thread alone with `sigwait` (every other thread has them blocked), so uvicorn,
APScheduler and the charge workers never see them; uvicorn runs in its own thread and is told to exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import structlog
import uvicorn

from recharged import __version__
from recharged.authorizations import expire_due, held_per_currency
from recharged.balance import AccountPlan
from recharged.clock import Clock
from recharged.config import Settings, load_settings
from recharged.daemon import sdnotify
from recharged.daemon.health import Health, LastCall
from recharged.daemon.http import create_app
from recharged.daemon.jobs import JobRecorder, close_interrupted_runs
from recharged.daemon.metrics import Metrics
from recharged.daemon.runtime import Runtime, build_runtime
from recharged.daemon.scheduler import JobSpec, Scheduler, job_specs
from recharged.datacheck import data_problems
from recharged.errors import ConfigError, DatabaseError, InstanceError, RechargedError
from recharged.events import disputes_check, inbox_check
from recharged.logs import configure
from recharged.mail.admin import last_delivery_check
from recharged.mail.notices import notify_from_plans
from recharged.mail.outbox import OutboxSender
from recharged.mail.statements import issue_monthly_statements
from recharged.mail.webhook_deliveries import delivery_backlog, webhooks_check
from recharged.mail.webhook_sender import WebhookSender, configured_endpoints
from recharged.money import format_ledger
from recharged.payments import PaymentGateway
from recharged.states import JobStatus
from recharged.status import backlog
from recharged.store.engine import Database, masked_url, sqlite_file
from recharged.store.runs import instance_name, last_job_run
from recharged.tokens import LEGACY_NAME
from recharged.words import plural

log = structlog.get_logger("recharged.daemon")
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Settings a reload cannot change in a running process: they need a restart.
RESTART_ONLY = (("database", "url"), ("http", "enabled"), ("http", "host"), ("http", "port"))


@contextlib.contextmanager
def single_instance(url: str) -> Iterator[None]:
    """On SQLite only one daemon may run: hold an exclusive lock on `<database>.daemon.lock` while running.
    The kernel releases it when the process dies, even by kill -9. PostgreSQL allows several instances."""
    database = sqlite_file(url)
    if database is None:
        yield
        return
    path = Path(f"{database}.daemon.lock")
    handle: IO[str] = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise InstanceError(
                f"another recharged daemon ({holder}) is running on {masked_url(url)}; SQLite allows one "
                "instance: stop it first, or use PostgreSQL to run several"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


@dataclass
class _Work:
    """Counts work in flight (jobs, urgent charges) so shutdown can wait for it."""

    count: int = 0

    def __post_init__(self) -> None:
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._changed:
            self.count += 1
        try:
            yield
        finally:
            with self._changed:
                self.count -= 1
                self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count == 0, timeout)


class Daemon:
    """One running instance. `gateway` replaces Stripe (tests); `clock` is the daemon's notion of now."""

    def __init__(
        self,
        config_path: Path | None,
        settings: Settings,
        clock: Clock,
        gateway: Callable[[Settings], PaymentGateway] | None = None,
    ) -> None:
        self._config_path = config_path
        self._clock = clock
        self._gateway = gateway
        self.instance = instance_name()
        self.metrics = Metrics()
        self._processor = LastCall(clock)
        self._stop = threading.Event()
        self._work = _Work()
        self._settings = settings
        self.db = Database(settings.database.url, connections=self._connections(settings))
        self.metrics.watch(lambda: backlog(self.db, clock.now()))
        self.metrics.watch_reservations(lambda: held_per_currency(self.db))
        self._runtime: Runtime | None = None
        self._scheduler = Scheduler(on_missed=lambda job: self.metrics.jobs_missed.labels(job).inc())
        self._urgent = ThreadPoolExecutor(max_workers=4, thread_name_prefix="urgent")
        self._urgent_pending: set[str] = set()
        self._urgent_lock = threading.Lock()
        # Processor events: one drain at a time, woken when a webhook stores one (and on the "events" schedule).
        self._events_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
        self._events_lock = threading.Lock()
        self._events_draining = False
        self._events_again = False
        self._events_idle = threading.Event()
        self._events_idle.set()
        self._jobs = JobRecorder(self.db, clock, self.metrics, self.instance)
        self._sender = OutboxSender(self.db, settings, clock)
        self._webhooks: WebhookSender | None = None  # built with the secrets by prepare() and reload()
        self.metrics.watch_webhooks(
            lambda: delivery_backlog(self.db, [e.name for e in self._webhooks.endpoints] if self._webhooks else [])
        )
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self._last_status = "starting"
        self.health = Health(
            db=self.db,
            clock=clock,
            started_at=clock.now(),
            cycle_interval=lambda: self.runtime().settings.daemon.cycle_interval,
            cycle_grace=lambda: self.runtime().settings.daemon.cycle_grace,
            max_clock_skew=lambda: self.runtime().settings.payments.max_clock_skew,
            scheduler_running=self._scheduler_running,
            next_cycle=self.next_cycle,
            processor=self._processor,
            mail=lambda: last_delivery_check(self.db),
            events=lambda: inbox_check(self.db, clock.now()),
            disputes=lambda: disputes_check(self.db),
            webhooks=lambda: webhooks_check(self.db, clock.now()),
            service_id=self.instance,
            version=__version__,
        )

    # --- what the HTTP API asks ------------------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        return self._clock

    def runtime(self) -> Runtime:
        assert self._runtime is not None, "the daemon has not started"
        return self._runtime

    def _connections(self, settings: Settings) -> int:
        """Database connections held at once at most: the charge workers, the HTTP server's threads and jobs."""
        return settings.daemon.charge_concurrency + 24

    def _scheduler_running(self) -> bool:
        return self._scheduler.running

    def alive(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return True, "stopping"
        return (True, "running") if self._scheduler.running else (False, "the scheduler is not running")

    def ready(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "stopping"
        try:
            self.db.require_current()
        except DatabaseError as exc:  # the details (address, schema) go to the log, never to an open endpoint
            log.warning("readyz.not_ready", error=str(exc))
            schema = "upgrade" in str(exc)
            return False, "the database schema is not current: run `recharged db upgrade`" if schema else (
                "the database cannot be reached"
            )
        return True, "ready"

    def next_cycle(self) -> datetime | None:
        return self._scheduler.next_run("cycle")

    def usage_recorded(self, account_ids: set[str]) -> None:
        """Mark accounts that fell under their threshold as due; charge at once those whose balance will not
        last until the next cycle (plus the margin). Runs after the usage was committed, off the request."""
        if self._stop.is_set():
            return
        with self._urgent_lock:
            fresh = account_ids - self._urgent_pending
            self._urgent_pending |= fresh
        if fresh:
            self._urgent.submit(self._after_usage, fresh)

    def _after_usage(self, account_ids: set[str]) -> None:
        with self._work.held():
            try:
                runtime = self.runtime()
                margin = timedelta(hours=runtime.settings.daemon.urgent_margin_hours)
                for account_id in runtime.recharges.mark_due(account_ids, self.next_cycle(), margin):
                    if self._stop.is_set():
                        return
                    report = runtime.recharges.charge_now(account_id)
                    if report is not None:
                        self.metrics.urgent_charges.inc()
                        log.info(
                            "charge.urgent", account=account_id, phase=report.phase, total=format_ledger(report.total)
                        )
            except Exception as exc:  # the next cycle charges them anyway
                log.exception("usage.after_failed", error=str(exc))
            finally:
                with self._urgent_lock:
                    self._urgent_pending -= account_ids

    def events_stored(self) -> None:
        """A webhook stored a processor event: handle it now, off the request (the "events" job would in a while).
        Wakes during a drain make it go round once more, so an event stored as it ends is not left waiting."""
        if self._stop.is_set():
            return
        with self._events_lock:
            if self._events_draining:
                self._events_again = True
                return
            self._events_draining, self._events_again = True, False
            self._events_idle.clear()
        self._events_pool.submit(self._drain_events)

    def _drain_events(self) -> None:
        try:
            while True:
                self._events()
                with self._events_lock:
                    if not self._events_again or self._stop.is_set():
                        self._events_draining = False
                        return
                    self._events_again = False
        finally:
            with self._events_lock:
                self._events_draining = False
                self._events_idle.set()

    def wait_events_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no wake-up drain of the inbox runs (tests, shutdown); False if `timeout` passed."""
        return self._events_idle.wait(timeout)

    def wait_webhooks_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no webhook worker runs (tests); False if `timeout` passed."""
        return self._webhooks is None or self._webhooks.wait_idle(timeout)

    # --- jobs -------------------------------------------------------------------------------------------------

    def _job(
        self,
        name: str,
        body: Callable[[], Mapping[str, Any]],
        *,
        record: bool = False,
        stopped: Callable[[Mapping[str, Any]], bool] = lambda _summary: False,
    ) -> Mapping[str, Any] | None:
        """Run one scheduled job unless the daemon is stopping, counted as work in flight. The recorder logs,
        counts and records its errors; none reaches the scheduler. None when it did not run or failed."""
        if self._stop.is_set():
            return None
        with self._work.held():
            try:
                return self._jobs.run(name, body, record=record, stopped=stopped)
            except Exception:
                return None

    def _cycle(self) -> None:
        started = time.perf_counter()
        runtime = self.runtime()

        def body() -> Mapping[str, Any]:
            notices = 0

            def notify(plans: Sequence[AccountPlan]) -> None:
                nonlocal notices
                notices = notify_from_plans(self.db, self._clock.now(), plans)

            report = runtime.recharges.run_cycle(
                concurrency=runtime.settings.daemon.charge_concurrency, stop=self._stop, plans_seen=notify
            )
            return {**report.summary(), "notices": notices}

        summary = self._job(
            "cycle",
            body,
            record=True,
            # Left work for the next run because of a shutdown (not because the circuit breaker opened).
            stopped=lambda summary: bool(summary["left_for_next"]) and not summary["halted"],
        )
        if summary is None:
            if not self._stop.is_set():
                self.metrics.cycles.labels("failed").inc()
                self._status("last cycle failed; see the log")
            return
        self.metrics.cycles.labels("halted" if summary["halted"] else "succeeded").inc()
        self.metrics.cycle_duration.observe(time.perf_counter() - started)
        self.metrics.last_success.set(self._clock.now().timestamp())
        self._status(
            f"last cycle {self._clock.now():%Y-%m-%d %H:%M} UTC: {summary['charged']} charged, "
            f"{summary['failed']} failed, {plural(summary['errors'], 'error')}; next {self._next_text()}"
        )

    def _complete(self) -> None:
        runtime = self.runtime()
        idle = timedelta(seconds=runtime.settings.daemon.completer_interval_seconds)

        def body() -> Mapping[str, Any]:
            reports = runtime.recharges.recover(idle_for=idle)
            return {"completed": len(reports), "phases": sorted({r.phase for r in reports})}

        self._job("completer", body)

    def _events(self) -> None:
        """Handle the processor events that are due, one at a time (`recharged.events`)."""
        runtime = self.runtime()
        self._job("events", lambda: runtime.events.process_pending(stop=self._stop).summary())

    def _expire_authorizations(self) -> None:
        def body() -> Mapping[str, Any]:
            expired = expire_due(self.db, self._clock)
            self.metrics.authorizations_expired.inc(expired)
            return {"expired": expired}

        self._job("authorizations", body)

    def _maintain(self) -> None:
        """Fresh planner statistics for the plan's queries (`Database.optimize`). Only SQLite needs them asked
        for: on other databases the job does not run at all, so it is neither logged nor counted."""
        if self.db.dialect != "sqlite":
            return

        def body() -> Mapping[str, Any]:
            self.db.optimize()
            return {"sqlite": "optimized"}

        self._job("maintenance", body)

    def _send_mail(self) -> None:
        sender = self._sender

        def body() -> Mapping[str, Any]:
            report = sender.send_pending()
            return {
                "sent": len(report.sent),
                "recovered": len(report.recovered),
                "retrying": len(report.retrying),
                "failed": len(report.failed),
                "error": report.error,
            }

        self._job("mail", body)

    def _send_webhooks(self) -> None:
        """Route new events and start a worker for each endpoint that has none running: returns at once, so a slow
        endpoint holds up neither this job nor another endpoint's queue (`recharged.mail.webhook_sender`)."""
        sender = self._webhooks
        if sender is not None:
            self._job("webhooks", lambda: {"started": sender.start()})

    def _webhook_sender(self, settings: Settings) -> WebhookSender:
        """The sender of the configured endpoints; ConfigError when one has no valid signing secret."""
        return WebhookSender(self.db, settings, self._clock, configured_endpoints(settings), stop=self._stop)

    def _statements(self) -> None:
        settings = self.runtime().settings
        self._job(
            "statements", lambda: {"statements": issue_monthly_statements(self.db, settings, self._clock)}, record=True
        )
        self._send_mail()

    def _jobs_table(self) -> dict[str, Callable[[], object]]:
        return {
            "cycle": self._cycle,
            "completer": self._complete,
            "events": self._events,
            "maintenance": self._maintain,
            "mail": self._send_mail,
            "statements": self._statements,
            "webhooks": self._send_webhooks,
            "authorizations": self._expire_authorizations,
        }

    # --- lifecycle --------------------------------------------------------------------------------------------

    def _status(self, text: str) -> None:
        self._last_status = text
        sdnotify.status(text)

    def _next_text(self) -> str:
        upcoming = self.next_cycle()
        return "not scheduled" if upcoming is None else f"{upcoming:%Y-%m-%d %H:%M} UTC"

    def _specs(self, settings: Settings) -> dict[str, JobSpec]:
        with self.db.transaction() as session:
            last = last_job_run(session, "cycle", JobStatus.SUCCEEDED)
        return job_specs(
            settings.daemon,
            self._clock.now(),
            None if last is None else last.finished_at,
            mail_interval_seconds=settings.outbox.send_interval_seconds,
            webhook_interval_seconds=settings.webhooks.send_interval_seconds,
            expire_interval_seconds=settings.authorizations.expire_interval_seconds,
        )

    def _address(self, settings: Settings) -> tuple[str, int]:
        return settings.http.host, settings.http.port

    def _bind(self, settings: Settings) -> socket.socket:
        host, port = self._address(settings)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            return socket.create_server((host, port), family=family, backlog=512, reuse_port=False)
        except OSError as exc:
            raise ConfigError(f"{self.SECTION}: cannot listen on {host}:{port}: {exc.strerror}") from None

    def _start_http(self, settings: Settings) -> None:
        listener = self._bind(settings)
        address = listener.getsockname()
        config = uvicorn.Config(
            create_app(self),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(settings.daemon.shutdown_timeout_seconds),
            limit_concurrency=1000,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        server = self._server
        self._server_thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="http")
        self._server_thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._server_thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"http: the server did not start on {address[0]}:{address[1]}")
            time.sleep(0.01)
        log.info("http.listening", address=f"http://{address[0]}:{address[1]}")

    def prepare(self) -> Runtime:
        """Check the schema and the configuration against the data, and build the runtime (the processor key and
        API tokens are read here)."""
        self.db.require_current()
        _refuse_lacking(data_problems(self.db, self._settings, self._clock.now().date()))
        self._runtime = build_runtime(
            self._settings, self.db, self._clock, self.metrics, self._processor, self._gateway
        )
        self._webhooks = self._webhook_sender(self._settings)
        if not self._runtime.api_tokens:
            log.warning("http.no_tokens", hint="set RECHARGED_API_TOKENS: /v1/ answers 503 until then")
        if any(token.legacy for token in self._runtime.api_tokens):
            log.warning(
                "http.legacy_token",
                name=LEGACY_NAME,
                hint="a bare secret in api_tokens has every scope; give it a name and scopes: NAME:SCOPES:SECRET",
            )
        return self._runtime

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit status."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # every thread started from here on inherits this
        settings = self._settings
        with self._exclusive():
            self.prepare()
            started = self._start(settings)
            log.info(
                f"{self.ROLE}.started",
                instance=self.instance,
                version=__version__,
                database=masked_url(self.db.url),
                **started,
            )
            sdnotify.ready(self._ready_text())
            watchdog = sdnotify.Watchdog.from_environment(lambda: self.alive()[0])
            if watchdog is not None:
                watchdog.start()
            try:
                while True:
                    received = signal.sigwait(SIGNALS)
                    if received == signal.SIGHUP:
                        self.reload()
                        continue
                    log.info(f"{self.ROLE}.stopping", signal=signal.Signals(received).name)
                    break
            finally:
                if watchdog is not None:
                    watchdog.stop()
                clean = self.stop()
            log.info(f"{self.ROLE}.stopped", clean=clean)
        return 0

    ROLE = "daemon"  # the service's name in its log events: daemon.started, api.started
    SECTION = "http"  # the section of config.toml that says where it listens

    def _exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held while running: on SQLite one daemon per database."""
        return single_instance(self.db.url)

    def _start(self, settings: Settings) -> dict[str, Any]:
        """Start the work (after `prepare`); returns what the start's log line tells."""
        closed = close_interrupted_runs(self.db, self._clock)
        self._scheduler.start(self._jobs_table(), self._specs(settings))
        if settings.http.enabled:
            try:
                self._start_http(settings)
            except RechargedError:
                self._scheduler.shutdown()
                raise
        return {"interrupted_runs": closed, "next_cycle": str(self.next_cycle())}

    def _ready_text(self) -> str:
        return f"running; next cycle {self._next_text()}"

    def stop(self) -> bool:
        """Stop taking work, wait for work in flight (bounded), stop the threads. True when nothing was cut."""
        sdnotify.stopping("stopping: finishing charges in flight")
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        self._scheduler.pause()
        timeout = self.runtime().settings.daemon.shutdown_timeout_seconds if self._runtime else 10.0
        clean = self._work.wait_idle(timeout)
        if not clean:
            log.warning(
                "daemon.stop_timeout",
                seconds=timeout,
                hint="charges still in flight are completed by the next start (recover)",
            )
        self._scheduler.shutdown()
        self._urgent.shutdown(wait=False, cancel_futures=True)
        self._events_pool.shutdown(wait=False, cancel_futures=True)
        if self._webhooks is not None:
            self._webhooks.close()
        if self._server_thread is not None:
            self._server_thread.join(timeout=max(1.0, timeout))
        self.db.close()
        return clean

    RESTART_ONLY = RESTART_ONLY

    def reload(self) -> bool:
        """SIGHUP: validate the file again and swap it in whole, or keep the running configuration."""
        sdnotify.reloading("reloading configuration")
        try:
            fresh = load_settings(self._config_path)
            changed = [".".join(key) for key in self.RESTART_ONLY if _get(fresh, key) != _get(self._settings, key)]
            if changed:
                raise ConfigError(f"{', '.join(changed)} cannot change while running; restart the service instead")
            _refuse_lacking(data_problems(self.db, fresh, self._clock.now().date()))
            runtime = build_runtime(fresh, self.db, self._clock, self.metrics, self._processor, self._gateway)
            webhooks = self._webhook_sender(fresh)
        except RechargedError as exc:
            log.error("config.reload_refused", error=str(exc), kept="the running configuration")
            sdnotify.ready(f"reload refused, running with the previous configuration: {exc}"[:200])
            return False
        old = self._settings
        self._settings, self._runtime = fresh, runtime  # one assignment each; readers take `runtime()` once
        configure(fresh.logging)
        self._sender = OutboxSender(self.db, fresh, self._clock)
        previous, self._webhooks = self._webhooks, webhooks
        if previous is not None:
            previous.close()  # its workers finish the delivery in hand; the new sender's take the rest
        if (fresh.daemon, fresh.outbox, fresh.webhooks, fresh.authorizations) != (
            old.daemon,
            old.outbox,
            old.webhooks,
            old.authorizations,
        ):
            self._scheduler.reschedule(self._specs(fresh), ("cycle", "completer", "mail", "webhooks", "authorizations"))
        log.info("config.reloaded", path=str(self._config_path), next_cycle=str(self.next_cycle()))
        sdnotify.ready(f"configuration reloaded; {self._last_status}"[:200])
        return True


def _refuse_lacking(problems: list[str]) -> None:
    if problems:
        raise ConfigError("the database's accounts need what the configuration lacks:\n  " + "\n  ".join(problems))


def _get(settings: Settings, key: tuple[str, str]) -> object:
    return getattr(getattr(settings, key[0]), key[1])


def run_daemon(config_path: Path | None, clock: Clock) -> int:
    """The `run` command: load and check everything, then run until stopped."""
    settings = load_settings(config_path)
    configure(settings.logging)
    return Daemon(config_path, settings, clock).run()
