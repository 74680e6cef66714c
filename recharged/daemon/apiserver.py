"""`recharged api`: the HTTP API in a process of its own (deploy/recharged-api.service), so that the daemon's charge
cycles, statements, jobs and Python's one-thread-at-a-time interpreter never hold up a dialer's authorization.

It serves the same app as the daemon's [http] server (every /v1/ endpoint, Stripe webhooks, /livez, /readyz,
/healthz and its own /metrics) on [api] host:port, with the daemon's lifecycle: READY=1 once it listens, the
watchdog, SIGHUP to reload config.toml, SIGTERM to finish requests and urgent charges in flight and exit 0. It
runs no scheduled job: those stay with `recharged run`.

What a request sets off runs here, as in the daemon: usage that leaves an account short of the next cycle charges
it at once, and a stored Stripe event is handled at once. The next cycle, which that decision needs, is the last
successful one (whichever instance ran it) plus the cycle interval.

On PostgreSQL several may run beside the daemons, each on its own port (`--port`). On SQLite the daemon's own
server remains the better choice: one database file has one writer at a time, whichever process it is in.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import datetime
from typing import Any

import structlog

from recharged.clock import Clock
from recharged.config import Settings, load_settings
from recharged.daemon.process import Daemon
from recharged.logs import configure
from recharged.states import JobStatus
from recharged.store.runs import last_job_run

log = structlog.get_logger("recharged.api")

NEXT_CYCLE_TTL_SECONDS = 10.0  # how long the estimate is reused: usage asks for it on every batch


class ApiServer(Daemon):
    """The API alone: a Daemon that starts no scheduler and serves on [api] host:port."""

    ROLE = SECTION = "api"
    RESTART_ONLY = (("database", "url"), ("api", "host"), ("api", "port"), ("api", "connections"))

    def __init__(self, *args: Any, port: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._port = port  # --port: several on one host
        self._estimate: tuple[float, datetime | None] | None = None
        self._estimate_lock = threading.Lock()

    def _connections(self, settings: Settings) -> int:
        return settings.api.connections

    def _address(self, settings: Settings) -> tuple[str, int]:
        return settings.api.host, settings.api.port if self._port is None else self._port

    def _scheduler_running(self) -> bool:
        return True  # the scheduler is the daemon's; /healthz here tells the cycle's age from the database

    def alive(self) -> tuple[bool, str]:
        return (True, "stopping") if self._stop.is_set() else (True, "serving")

    def next_cycle(self) -> datetime | None:
        """The last successful cycle (any instance's) plus the interval; None before the first one."""
        now = time.monotonic()
        with self._estimate_lock:
            if self._estimate is not None and now - self._estimate[0] < NEXT_CYCLE_TTL_SECONDS:
                return self._estimate[1]
        with self.db.reading() as session:
            run = last_job_run(session, "cycle", JobStatus.SUCCEEDED)
            finished = None if run is None else run.finished_at
        at = None if finished is None else finished + self.runtime().settings.daemon.cycle_interval
        with self._estimate_lock:
            self._estimate = (now, at)
        return at

    def _exclusive(self) -> contextlib.AbstractContextManager[None]:
        if self.db.dialect == "sqlite":
            log.warning(
                "api.sqlite",
                hint="one SQLite file has one writer at a time: the daemon's own [http] server is faster here",
            )
        return contextlib.nullcontext()

    def _start(self, settings: Settings) -> dict[str, Any]:
        self._start_http(settings)  # its log line tells the address
        return {}

    def _ready_text(self) -> str:
        return "serving the API"


def run_api(config_path: Any, clock: Clock, port: int | None = None) -> int:
    """The `api` command: load and check everything, then serve until stopped."""
    settings = load_settings(config_path)
    configure(settings.logging)
    return ApiServer(config_path, settings, clock, port=port).run()
