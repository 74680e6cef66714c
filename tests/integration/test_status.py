"""`status`: the last and next cycle, what was charged, and what needs attention; the next cycle from a real
HTTP server serving the daemon's own health report, or estimated when none answers. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from recharged.config import load_settings
from recharged.daemon.health import Health, LastCall
from recharged.status import DaemonAnswer, ask_daemon, status_report
from recharged.store.models import Account, FundingSource, OutboxMessage, Recharge
from recharged.store.runs import finish_job_run, start_job_run
from tests.helpers import NOW, add_account

HOUR = timedelta(hours=1)
NO_DAEMON = DaemonAnswer("http://127.0.0.1:9/healthz", False, error="could not connect")


def cycle(db, status="succeeded", *, started=NOW - HOUR, summary=None, error=None, instance="host-a:41"):
    with db.transaction() as s:
        run_id = start_job_run(s, "cycle", instance, started)
        if status != "running":
            finish_job_run(s, run_id, status, started + timedelta(seconds=30), summary, error)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeDaemon:
    """A real HTTP server on a free port answering /healthz with the daemon's own health report."""

    def __init__(self, health: Health) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                report = owner.health.report()
                body = json.dumps(report).encode()
                self.send_response(503 if report["status"] == "fail" else 200)
                self.send_header("Content-Type", "application/health+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.health = health
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self) -> FakeDaemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def daemon(db, clock) -> Iterator[tuple[FakeDaemon, dict]]:
    """A daemon's /healthz whose scheduler runs the next cycle at NOW + 2 h (change `state` to stop it)."""
    state = {"running": True}
    health = Health(
        db=db,
        clock=clock,
        started_at=NOW - HOUR,
        cycle_interval=lambda: 4 * HOUR,
        cycle_grace=lambda: timedelta(minutes=35),
        max_clock_skew=lambda: HOUR,
        scheduler_running=lambda: state["running"],
        next_cycle=lambda: NOW + 2 * HOUR,
        processor=LastCall(clock),
    )
    with FakeDaemon(health) as server:
        yield server, state


def http_settings(port: int):
    return load_settings(None, environ={"RECHARGED_HTTP__PORT": str(port)})


def test_next_cycle_is_what_the_running_daemon_says(db, settings, clock, daemon):
    server, _ = daemon
    cycle(db)
    answer = ask_daemon(http_settings(server.port))
    assert (answer.answered, answer.health, answer.scheduler_running) == (True, "pass", True)
    report = status_report(db, settings, clock.now(), answer)
    assert (report.next_cycle.at, report.next_cycle.source) == (NOW + 2 * HOUR, "daemon")
    assert not report.needs_attention


def test_a_daemon_whose_scheduler_stopped_needs_attention(db, settings, clock, daemon):
    server, state = daemon
    cycle(db)
    state["running"] = False
    report = status_report(db, settings, clock.now(), ask_daemon(http_settings(server.port)))
    assert report.next_cycle.source == "unknown"
    assert [a.kind for a in report.attention] == ["scheduler_stopped"]


def test_without_a_daemon_the_next_cycle_is_estimated_from_the_last_success(db, settings, clock):
    cycle(db, started=NOW - 3 * HOUR, summary={"charged": 2, "failed": 0, "errors": 0})
    cycle(db, "failed", started=NOW - HOUR, error="database went away")
    answer = ask_daemon(http_settings(free_port()), timeout=1.0)
    assert (answer.answered, answer.error) == (False, "could not connect")

    report = status_report(db, settings, clock.now(), answer)
    assert report.next_cycle.source == "estimate"
    assert report.next_cycle.at == NOW - 3 * HOUR + timedelta(seconds=30) + 4 * HOUR
    assert "no daemon answered" in report.next_cycle.note
    assert "estimate" in report.next_cycle.note
    assert (report.last_cycle.status, report.last_success.summary["charged"]) == ("failed", 2)
    assert [(a.kind, a.detail) for a in report.attention] == [("cycle_failed", "database went away")]


def test_with_the_http_server_disabled_nothing_is_asked(db, clock):
    settings = load_settings(None, environ={"RECHARGED_HTTP__ENABLED": "false"})
    answer = ask_daemon(settings)
    assert (answer.url, answer.answered) == (None, False)
    assert status_report(db, settings, clock.now(), answer).next_cycle.source == "unknown"


def test_a_cycle_overdue_needs_attention(db, settings, clock):
    cycle(db, started=NOW - 5 * HOUR)  # 4 h interval + 35 min grace
    report = status_report(db, settings, clock.now(), NO_DAEMON)
    assert [a.kind for a in report.attention] == ["cycle_overdue"]
    assert "already past" in report.next_cycle.note


def recharge(account, phase, *, at, total=2_400_000, currency="USD"):
    return Recharge(
        account_id=account,
        kind="auto",
        phase=phase,
        currency=currency,
        amount=2_000_000,
        vat=total - 2_000_000,
        total=total,
        vat_percent=Decimal(20),
        balance_before=0,
        created_at=at,
        updated_at=at,
    )


def test_charged_in_the_last_24_hours_per_currency(db, settings, clock):
    add_account(db, settings, clock, "a")
    add_account(db, settings, clock, "b")
    with db.transaction() as s:
        s.add_all(
            [
                recharge("a", "finished", at=NOW - 2 * HOUR),
                recharge("a", "finished", at=NOW - 23 * HOUR, total=3_600_000),
                recharge("b", "finished", at=NOW - 25 * HOUR),  # too old
                recharge("b", "failed", at=NOW - HOUR),
            ]
        )
    report = status_report(db, settings, clock.now(), NO_DAEMON)
    [usd] = report.charged
    assert (usd.currency, usd.count, usd.credited, usd.charged) == ("USD", 2, 4_000_000, 6_000_000)
    assert report.as_json()["charged_last_24h"] == {
        "recharges": 2,
        "by_currency": {"USD": {"count": 2, "credited": "40.00000", "charged": "60.00000"}},
    }
    assert not report.needs_attention


def test_everything_needing_attention_is_listed(db, settings, clock):
    for account in ("auth", "broke", "later", "cards", "fine"):
        add_account(db, settings, clock, account)
    with db.transaction() as s:
        states = {
            "auth": ("action_required", "visa ...3155 needs the customer to authenticate", None),
            "broke": ("suspended", "suspended after 4 failed recharge cycles", None),
            "later": ("backing_off", "1 failed recharge cycle", NOW + 3 * HOUR),
        }
        for account_id, (state, reason, retry) in states.items():
            row = s.get(Account, account_id)
            row.recharge_state, row.state_reason, row.retry_at = state, reason, retry
        card = {"customer": "cus_1", "brand": "visa", "last4": "0002", "exp_month": 12, "exp_year": 2030}
        s.add(
            FundingSource(account_id="cards", payment_method="pm_1", unusable_reason="lost_card", added_at=NOW, **card)
        )
        s.add(FundingSource(account_id="fine", payment_method="pm_2", added_at=NOW, **card))
        s.add(recharge("cards", "charging", at=NOW - HOUR))  # the lease is 5 minutes
        s.add(recharge("fine", "charging", at=NOW - timedelta(minutes=2)))  # still within its lease

        def mail(key, status, at, error=None):
            return OutboxMessage(
                key=key,
                kind="receipt",
                to_address="x@example.com",
                context={},
                created_at=at,
                status=status,
                next_attempt_at=at,
                last_attempt_at=at,
                last_error=error,
            )

        s.add_all(
            [
                mail("m1", "failed", NOW - 3 * HOUR, "550 mailbox unavailable"),
                mail("m2", "pending", NOW - 2 * HOUR, "connection refused"),
                mail("m3", "pending", NOW - timedelta(minutes=10)),  # recent: not late yet
                mail("m4", "sent", NOW - 5 * HOUR),
            ]
        )
    cycle(db)

    report = status_report(db, settings, clock.now(), NO_DAEMON)
    assert report.needs_attention
    listed = [(a.kind, a.account) for a in report.attention]
    assert listed == [
        ("action_required", "auth"),
        ("suspended", "broke"),
        ("backing_off", "later"),
        ("unusable_source", "cards"),
        ("mail_failed", None),
        ("mail_late", None),
        ("recharge_stuck", "cards"),
    ]
    by_kind = {a.kind: a for a in report.attention}
    assert by_kind["backing_off"].at == NOW + 3 * HOUR
    assert "visa ...0002" in by_kind["unusable_source"].detail
    assert "lost_card" in by_kind["unusable_source"].detail
    assert "1 email failed for good" in by_kind["mail_failed"].detail
    assert "550" in by_kind["mail_failed"].detail
    assert "1 email pending" in by_kind["mail_late"].detail
    assert "connection refused" in by_kind["mail_late"].detail
    assert "still charging" in by_kind["recharge_stuck"].detail
    assert report.as_json()["attention"][0] == {
        "kind": "action_required",
        "subject": "account auth",
        "account": "auth",
        "detail": "visa ...3155 needs the customer to authenticate",
        "at": None,
    }
