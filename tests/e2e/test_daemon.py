"""The real `recharged run` process: it charges through the Stripe-compatible server, answers HTTP, tells
systemd what it does, reloads on SIGHUP and stops cleanly on SIGTERM, even mid-cycle.

The daemon runs on the real clock, so each test seeds 30 days of usage ending yesterday. Waiting is for
observable states (a log line, an HTTP answer, a PaymentIntent), with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from recharged.clock import FixedClock
from recharged.config import load_settings
from recharged.store.engine import Database
from recharged.store.models import Entry, Recharge
from recharged.testing import StripeTestServer
from recharged.verify import verify
from tests.helpers import StripeBackend, add_account, call, card_on_file

TOKEN = "e2e-token-0123456789abcdef"
STRIPE_KEY = "sk_test_e2e"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def stripe() -> Iterator[StripeTestServer]:
    with StripeTestServer() as server:
        yield server


def seed(db_url: str, stripe: StripeTestServer, accounts: dict[str, int], card: str = "pm_card_visa") -> None:
    """Accounts that spent $6.00 a day over the 30 days before today (threshold $42, recharge $84), each
    holding the given balance in cents, auto-recharge on, with a card on file."""
    from recharged.accounts import adjust_balance
    from recharged.funding import add_source
    from recharged.usage import UsageRecorder

    now = datetime.now(UTC)
    clock = FixedClock(now)
    settings = load_settings(None, environ={})
    db = Database(db_url)
    backend = StripeBackend(stripe.url, STRIPE_KEY, stripe)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    created = (today - timedelta(days=40)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for account, cents in accounts.items():
        add_account(db, settings, clock, account, created_at=created, auto_recharge=True, vat_percent="0")
        days = [today - timedelta(days=d) for d in range(1, 31)]
        events = [
            call(f"{account}-{d:%Y%m%d}", account=account, seconds=300 * 60, at=f"{d:%Y-%m-%d}T10:00:00Z") for d in days
        ]
        UsageRecorder(db, settings, clock).record(events)
        adjust_balance(
            db, account, (18_000 + cents) * 1000, reason="opening", actor="Jane Doe", clock=clock, reference=account
        )
        add_source(db, account, card_on_file(backend, card), actor="Jane Doe", clock=clock)
    db.close()


class Daemon:
    """A `recharged run` (or `recharged api`) child process with its config file, log and notify socket."""

    def __init__(
        self, tmp_path: Path, db_url: str, stripe: StripeTestServer, name: str = "daemon", command: str = "run"
    ) -> None:
        self.command = command
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.config = self.dir / "config.toml"
        self.log_path = self.dir / "daemon.log"
        self.notify_path = self.dir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.05)
        self.notices: list[str] = []
        self.db_url, self.stripe = db_url, stripe
        self.process: subprocess.Popen[bytes] | None = None
        self.base = ""

    def write_config(self, text: str) -> None:
        self.config.write_text(text)

    def start(self, **env: str) -> Daemon:
        return self.launch(**env).wait_ready()

    def launch(self, **env: str) -> Daemon:
        environment = {
            **os.environ,
            "RECHARGED_DATABASE__URL": self.db_url,
            "RECHARGED_PAYMENTS__STRIPE_API_BASE": self.stripe.url,
            "RECHARGED_STRIPE_API_KEY": STRIPE_KEY,
            "RECHARGED_API_TOKENS": TOKEN,
            "RECHARGED_LOGGING__FORMAT": "json",
            "NOTIFY_SOCKET": str(self.notify_path),
            **env,
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "recharged", "--config", str(self.config), self.command],
                stdout=log,
                stderr=log,
                env=environment,
                cwd=self.dir,
            )
        return self

    def wait_ready(self) -> Daemon:
        assert self.process is not None
        listening = wait_for("the HTTP server", lambda: self.event("http.listening") or self.exited())
        assert self.process.poll() is None, self.log_text()
        self.base = listening["address"]
        return self

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_text().splitlines():
            line = line.strip()
            start = line.find("{")
            if start < 0:
                continue
            try:
                event = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def event(self, name: str) -> dict[str, Any] | None:
        found = self.events(name)
        return found[-1] if found else None

    def notified(self) -> list[str]:
        while True:
            try:
                self.notices.append(self.notify.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.notices

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10, **kwargs)

    def post_usage(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        response = httpx.post(
            self.base + "/v1/usage",
            json={"events": events},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.notify.close()


@pytest.fixture
def daemons(tmp_path: Path, db_url: str, stripe: StripeTestServer) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(config: str, name: str = "daemon", command: str = "run") -> Daemon:
        daemon = Daemon(tmp_path, db_url, stripe, name, command)
        daemon.write_config(config)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.close()


CONFIG = """
[daemon]
cycle_interval_hours = {interval}
cycle_jitter_seconds = 0
completer_interval_seconds = 1
charge_concurrency = {concurrency}
urgent_margin_hours = 2.0
shutdown_timeout_seconds = 30

[http]
port = 0

[api]
port = 0

[outbox]
send_interval_seconds = 1

[logging]
level = "info"
"""


def config(interval: float = 1.0, concurrency: int = 4) -> str:
    return CONFIG.format(interval=interval, concurrency=concurrency)


def ledger(db_url: str) -> tuple[dict[str, int], dict[str, int]]:
    """Recharge credits and finished recharges per account."""
    db = Database(db_url)
    try:
        with db.transaction() as session:
            credits: dict[str, int] = {}
            for entry in session.query(Entry).filter(Entry.entry_type == "recharge"):
                credits[entry.account_id] = credits.get(entry.account_id, 0) + 1
            finished: dict[str, int] = {}
            for recharge in session.query(Recharge).filter(Recharge.phase == "finished"):
                finished[recharge.account_id] = finished.get(recharge.account_id, 0) + 1
        report = verify(db)
        assert report.ok, report.problems
    finally:
        db.close()
    return credits, finished


def succeeded_by_account(stripe: StripeTestServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for intent in stripe.payment_intents(status="succeeded"):
        account = intent["metadata"]["recharged_account"]
        counts[account] = counts.get(account, 0) + 1
    return counts


def metric(daemon: Daemon, name: str) -> float:
    text = daemon.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_the_daemon_charges_usage_as_it_arrives_reloads_and_stops_cleanly(daemons, db_url, stripe):
    seed(db_url, stripe, {"acme": 5_000, "birch": 5_000})  # $50: above the $42 threshold
    daemon = daemons(config(interval=1.0)).start()

    assert any(n.startswith("READY=1") for n in wait_for("READY=1", daemon.notified))
    wait_for("the first cycle", lambda: daemon.event("cycle.finished"))
    assert daemon.event("cycle.finished")["charged"] == 0
    health = daemon.get("/healthz")
    assert health.headers["content-type"] == "application/health+json"
    assert health.json()["status"] == "pass", health.json()

    # $8.34 of calls takes acme to $41.66: under the threshold, due at the next cycle, an hour away; 6.9 days
    # of runway is plenty, so nothing is charged now.
    answer = daemon.post_usage([call("acme-big-1", account="acme", seconds=25_000, at=_now())])
    assert answer["accepted"] == 1
    view = wait_for("acme marked due", lambda: (v := daemon.get("/v1/accounts/acme").json())["due_since"] and v)
    assert view["balance"] == "41.66000"
    assert view["decision"] == "charge"
    assert view["longest_call_seconds"] == 124_980  # $41.66 at 2 cents a minute: 2,083 minutes
    assert stripe.payment_intents() == []

    # birch spends nearly everything: its runway is under the time to the next cycle, so it is charged now.
    daemon.post_usage([call("birch-big-1", account="birch", seconds=148_000, at=_now())])
    wait_for("birch charged at once", lambda: succeeded_by_account(stripe).get("birch"))
    assert "acme" not in succeeded_by_account(stripe)

    # Reload with a short interval: the next cycle comes at once and charges acme.
    daemon.write_config(config(interval=0.0005))
    daemon.signal(signal.SIGHUP)
    wait_for("the reload", lambda: daemon.event("config.reloaded"))
    wait_for("acme charged by the cycle", lambda: succeeded_by_account(stripe).get("acme"))
    assert any(n.startswith("RELOADING=1") for n in daemon.notified())

    # A broken file is refused and the running configuration kept.
    daemon.write_config(config(interval=0.0005) + "\n[recharge]\nthreshold_days = -1\n")
    daemon.signal(signal.SIGHUP)
    refused = wait_for("the refused reload", lambda: daemon.event("config.reload_refused"))
    assert "recharge.threshold_days" in refused["error"]
    assert daemon.get("/readyz").status_code == 200

    wait_for("a cycle with nothing to do", lambda: daemon.events("cycle.finished")[-1]["charged"] == 0)
    assert metric(daemon, 'recharged_charges_total{outcome="succeeded"}') == 2
    assert metric(daemon, 'recharged_usage_events_total{outcome="accepted"}') == 2
    assert metric(daemon, "recharged_urgent_charges_total") == 1
    assert daemon.get("/v1/accounts/acme").json()["due_since"] is None

    # Each credit is followed by its receipt; with no SMTP server configured they land as .eml files.
    def receipts() -> list[str]:
        mails = [path.read_text() for path in (daemon.dir / "outbox").glob("*.eml")]
        return [mail for mail in mails if "Message-ID: <recharged.receipt." in mail]

    assert len(wait_for("two receipts", lambda: len(receipts()) == 2 and receipts())) == 2
    assert daemon.get("/healthz").json()["checks"]["smtp:lastDelivery"][0]["status"] == "pass"

    assert daemon.stop() == 0
    assert any(n.startswith("STOPPING=1") for n in daemon.notified())
    assert daemon.event("daemon.stopped")["clean"] is True
    assert succeeded_by_account(stripe) == {"acme": 1, "birch": 1}
    credits, finished = ledger(db_url)
    assert credits == finished == {"acme": 1, "birch": 1}


def test_sigterm_mid_cycle_finishes_what_was_claimed_and_the_next_start_the_rest(daemons, db_url, stripe):
    accounts = {f"due-{i:02d}": 100 for i in range(12)}  # $1.00 each: all due
    seed(db_url, stripe, accounts)
    stripe.latency = 0.4  # 12 charges, 2 at a time: about 2.5 seconds of cycle
    daemon = daemons(config(interval=1.0, concurrency=2)).start()
    wait_for("the first charges", lambda: len(stripe.payment_intents()) >= 2)
    assert daemon.stop() == 0
    assert daemon.event("daemon.stopped")["clean"] is True

    charged_before = succeeded_by_account(stripe)
    assert 0 < len(charged_before) < len(accounts), "the stop came mid-cycle"
    credits, finished = ledger(db_url)
    assert credits == finished == charged_before  # every claimed charge was finished, nothing half-way

    stripe.latency = 0
    again = daemons(config(interval=1.0, concurrency=4), name="again").start()
    wait_for("the rest charged", lambda: len(succeeded_by_account(stripe)) == len(accounts))
    wait_for("the cycle's end", lambda: again.event("cycle.finished"))
    assert again.stop() == 0
    assert succeeded_by_account(stripe) == dict.fromkeys(accounts, 1)
    credits, finished = ledger(db_url)
    assert credits == finished == dict.fromkeys(accounts, 1)


def test_a_second_daemon_on_the_same_sqlite_database_refuses_to_start(daemons, db_url, stripe):
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL allows several instances")
    first = daemons(config()).start()
    second = daemons(config(), name="second")
    with second.log_path.open("ab") as log:
        env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_STRIPE_API_KEY": STRIPE_KEY}
        result = subprocess.run(
            [sys.executable, "-m", "recharged", "--config", str(second.config), "run"],
            stdout=log,
            stderr=subprocess.PIPE,
            env=env,
            cwd=second.dir,
            timeout=60,
        )
    assert result.returncode == 75
    assert "another recharged daemon" in result.stderr.decode()
    assert "use PostgreSQL to run several" in result.stderr.decode()
    assert first.get("/livez").status_code == 200
    assert first.stop() == 0


def test_several_daemons_on_postgresql_charge_each_account_once(daemons, db_url, stripe):
    if not db_url.startswith("postgresql"):
        pytest.skip("several instances need PostgreSQL")
    accounts = {f"shared-{i:02d}": 100 for i in range(16)}
    seed(db_url, stripe, accounts)
    stripe.latency = 0.2  # cycles of about 1.6 s, every 1.8 s on each instance: they overlap
    group = [daemons(config(interval=0.0005, concurrency=2), name=f"instance-{n}").launch() for n in range(3)]
    for daemon in group:
        daemon.wait_ready()
    for daemon in group:
        wait_for("each instance's cycle", lambda d=daemon: d.event("cycle.finished"))
    wait_for("every account charged", lambda: len(succeeded_by_account(stripe)) == len(accounts))

    def reported(*keys: str) -> int:
        return sum(e[key] for d in group for e in d.events("cycle.finished") for key in keys)

    # Stripe may have the last payment a moment before its cycle has logged what it did; and a charge the cycle
    # left waiting on the processor is finished by the next cycle's recovery: wait until they are all told.
    try:
        wait_for("every charge reported by a cycle", lambda: reported("charged", "recovered") >= len(accounts))
    except AssertionError:
        keys = ("charged", "waiting", "recovered", "not_claimed", "due", "left_for_next", "errors")
        summaries = [[{k: e.get(k) for k in keys} for e in d.events("cycle.finished")] for d in group]
        raise AssertionError(f"cycles reported: {summaries}") from None
    for daemon in group:
        assert daemon.stop() == 0
    assert succeeded_by_account(stripe) == dict.fromkeys(accounts, 1)
    credits, finished = ledger(db_url)
    assert credits == finished == dict.fromkeys(accounts, 1)
    assert reported("charged") <= len(accounts)  # no charge reported by two cycles


def test_the_api_service_serves_beside_the_daemon_and_charges_what_its_usage_makes_urgent(daemons, db_url, stripe):
    seed(db_url, stripe, {"acme": 5_000, "birch": 5_000})  # $50 each: above the $42 threshold
    daemon = daemons(config(interval=1.0)).start()
    wait_for("the daemon's first cycle", lambda: daemon.event("cycle.finished"))
    api = daemons(config(interval=1.0), name="api", command="api").start()
    assert api.base != daemon.base
    assert any(n.startswith("READY=1") and "serving the API" in n for n in wait_for("READY=1", api.notified))
    assert api.event("api.started") is not None
    assert api.event("cycle.finished") is None  # no scheduled work here
    assert (api.get("/livez").status_code, api.get("/readyz").status_code) == (200, 200)
    checks = api.get("/healthz").json()["checks"]
    assert checks["scheduler:running"][0]["status"] == "pass"  # the last cycle is the daemon's, an hour to the next
    assert checks["cycle:age"][0]["status"] == "pass", checks

    # Usage through the API service: birch will not last until the next cycle, so this process charges it at once.
    answer = api.post_usage([call("birch-big-1", account="birch", seconds=148_000, at=_now())])
    assert answer == {
        "accepted": 1,
        "duplicate": 0,
        "rejected": 0,
        "results": [{"index": 0, "event_id": "birch-big-1", "status": "accepted", "reason": None}],
    }
    wait_for("birch charged at once", lambda: succeeded_by_account(stripe).get("birch"))
    granted = httpx.post(
        api.base + "/v1/authorizations",
        json={"account_id": "acme", "kind": "dialer", "call_id": "c-1", "requested_seconds": 60},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert (granted.status_code, granted.json()["authorized_seconds"]) == (201, 60)
    assert daemon.get("/v1/accounts/acme/balance").json()["reserved"] == "0.02000"  # one database, both see it
    assert metric(api, "recharged_urgent_charges_total") == 1
    assert metric(api, 'recharged_authorizations_total{outcome="granted"}') == 1
    assert metric(daemon, "recharged_urgent_charges_total") == 0

    # SIGHUP re-reads config.toml; where it listens needs a restart, and the running settings stay.
    api.write_config(config(interval=1.0).replace("[api]\nport = 0", "[api]\nport = 1"))
    api.signal(signal.SIGHUP)
    refused = wait_for("the refused reload", lambda: api.event("config.reload_refused"))
    assert "api.port" in refused["error"]
    api.write_config(config(interval=2.0))
    api.signal(signal.SIGHUP)
    wait_for("the reload", lambda: api.event("config.reloaded"))

    assert api.stop() == 0
    assert api.event("api.stopped")["clean"] is True
    assert any(n.startswith("STOPPING=1") for n in api.notified())
    assert daemon.get("/readyz").status_code == 200
    assert daemon.stop() == 0
    assert succeeded_by_account(stripe) == {"birch": 1}
    credits, finished = ledger(db_url)
    assert credits == finished == {"birch": 1}


def test_the_daemon_refuses_to_start_without_its_secrets_or_with_bad_config(tmp_path, db_url):
    base = {**os.environ, "RECHARGED_DATABASE__URL": db_url}
    base.pop("RECHARGED_STRIPE_API_KEY", None)
    run = [sys.executable, "-m", "recharged", "run"]
    no_key = subprocess.run(run, capture_output=True, text=True, env=base, cwd=tmp_path, timeout=60)
    assert no_key.returncode == 78
    assert "RECHARGED_STRIPE_API_KEY" in no_key.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\ncharge_concurrency = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "recharged", "--config", str(bad), "run"],
        capture_output=True,
        text=True,
        env={**base, "RECHARGED_STRIPE_API_KEY": STRIPE_KEY},
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 78
    assert "daemon.charge_concurrency" in result.stderr


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
