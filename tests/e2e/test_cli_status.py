"""`status`, `accounts history` and `reconcile` as an admin runs them: the real command, a real database, the
Stripe-compatible server, and a real HTTP server answering /healthz as the daemon does."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from recharged.recharge import RechargeService
from recharged.store.engine import Database
from recharged.store.runs import finish_job_run, start_job_run
from tests.e2e.commands import charging_env, command_runner, ok
from tests.helpers import add_account, busy_account


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def run(tmp_path, db_url, stripe_server):
    port = free_port()  # nothing listens there unless a test serves /healthz on it
    run = command_runner(tmp_path, {**charging_env(db_url, stripe_server.url), "RECHARGED_HTTP__PORT": str(port)})
    run.port = port  # type: ignore[attr-defined]
    return run


@pytest.fixture
def healthz(run) -> Iterator[dict]:
    """Serve /healthz on the configured port; the test fills in the report to answer with."""
    answer: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(answer).encode()
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Type", "application/health+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", run.port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield answer
    server.shutdown()
    server.server_close()


@pytest.fixture
def charged(stripe_client, gateway_factory, db_url, settings, clock):
    """acme pays with its card; birch's first card is lost (now unusable) and its backup pays: one cycle, run
    in-process at the test's clock (2026-11-22 12:00 UTC); the commands under test then run as processes."""
    db = Database(db_url)
    try:
        busy_account(db, settings, clock, stripe_client, "pm_card_visa")
        busy_account(
            db, settings, clock, stripe_client, "pm_card_chargeDeclinedLostCard", "pm_card_visa", account="birch"
        )
        report = RechargeService(db, settings, gateway_factory, clock).run_cycle()
        assert sorted(r.phase for r in report.charged) == ["finished", "finished"]
    finally:
        db.close()
    return stripe_client


def test_status_of_a_quiet_install_exits_0_and_estimates_the_next_cycle(run, db_url):
    finished = datetime.now(UTC) - timedelta(hours=1)
    db = Database(db_url)
    try:
        with db.transaction() as s:
            run_id = start_job_run(s, "cycle", "host-a:7", finished - timedelta(seconds=20))
            finish_job_run(s, run_id, "succeeded", finished, {"charged": 3, "failed": 0, "errors": 0}, None)
    finally:
        db.close()
    status = json.loads(ok(run("status", "--json")))
    assert status["needs_attention"] is False
    assert status["last_cycle"]["instance"] == "host-a:7"
    assert status["last_cycle"]["summary"]["charged"] == 3
    assert status["next_cycle"]["source"] == "estimate"
    assert datetime.fromisoformat(status["next_cycle"]["at"]) == finished + timedelta(hours=4)
    assert f"no daemon answered at http://127.0.0.1:{run.port}/healthz" in status["next_cycle"]["note"]
    table = ok(run("status"))
    assert "3 charged" in table
    assert "estimate" in table
    assert "nothing needs attention" in table


def test_status_reads_the_next_cycle_from_the_running_daemon(run, healthz):
    healthz.update(
        {
            "status": "pass",
            "checks": {
                "scheduler:running": [
                    {"observedValue": True, "status": "pass", "output": "next cycle at 2026-11-23T02:00:00Z"}
                ]
            },
        }
    )
    status = json.loads(ok(run("status", "--json")))
    assert status["next_cycle"] == {
        "at": "2026-11-23T02:00:00+00:00",
        "source": "daemon",
        "note": f"as the daemon at http://127.0.0.1:{run.port}/healthz says",
    }
    assert status["daemon"]["health"] == "pass"


def test_status_exits_1_and_lists_what_needs_attention(run, charged):
    result = run("status")
    assert result.returncode == 1, result.stderr
    assert "2 items need attention" in result.stdout
    assert "lost_card" in result.stdout
    status = json.loads(run("status", "--json").stdout)
    assert status["needs_attention"] is True
    # birch's lost card, and the receipts and notices queued at the test's clock (hours ago) that nothing sent
    assert [(a["kind"], a["account"]) for a in status["attention"]] == [
        ("unusable_source", "birch"),
        ("mail_late", None),
    ]
    assert "emails pending for over an hour, the oldest queued 2026-11-22 12:00 UTC" in status["attention"][1]["detail"]
    assert "Exit status: 0 when nothing needs attention, 1 when something does" in ok(run("status", "--help"))


def test_history_as_table_json_and_chart(run, charged, tmp_path):
    period = ("--since", "2026-11-20", "--until", "2026-11-22")
    table = ok(run("accounts", "history", "acme", *period))
    assert "2026-11-22" in table
    assert "finished" in table
    assert "balance at the start of 2026-11-20" in table
    data = json.loads(ok(run("accounts", "history", "acme", *period, "--json")))
    assert [d["usage_total"] for d in data["days"]] == ["6.00000", "6.00000", "0.00000"]
    # 30 days of 6.00 from nothing, then on the 22nd the 181.00 seeded and the 84.00 recharge
    assert [d["balance"] for d in data["days"]] == ["-174.00000", "-180.00000", "85.00000"]
    assert [d["credits_and_adjustments"] for d in data["days"]] == ["0.00000", "0.00000", "265.00000"]
    # 7 x the 30-day average at the start of each day: 28, 29, then 30 days of 6.00 in the window
    assert [d["threshold"] for d in data["days"]] == ["39.20000", "40.60000", "42.00000"]
    [recharge] = data["days"][-1]["recharges"]
    assert (recharge["kind"], recharge["amount"], recharge["charged"]) == ("auto", "84.00000", "100.80000")

    chart = tmp_path / "acme.png"
    assert f"written to {chart}" in ok(run("accounts", "history", "acme", *period, "--chart", str(chart)))
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_refuses_bad_arguments_clearly(run, db_url, settings, clock):
    db = Database(db_url)
    try:
        add_account(db, settings, clock, "acme")
    finally:
        db.close()
    for args, code, message in [
        (("ghost",), 3, "no account 'ghost'"),
        (("acme", "--since", "2026-11-31"), 2, "--since '2026-11-31' is not a date"),
        (("acme", "--since", "2026-11-10", "--until", "2026-11-01"), 2, "is after --until"),
        (("acme", "--chart", "out.jpg"), 2, "name the file *.png"),
    ]:
        result = run("accounts", "history", *args)
        assert result.returncode == code, result.stderr + result.stdout
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_reconcile_exits_0_when_all_match_and_1_on_a_stray_charge(run, charged, stripe_server):
    report = json.loads(ok(run("reconcile", "--since", "2026-11-01", "--json")))
    assert (report["ok"], report["succeeded"], report["matched"]) == (True, 2, 2)

    paid = stripe_server.payment_intents(status="succeeded")[0]
    stray = charged.client.v1.payment_intents.create(
        params={
            "amount": 1234,
            "currency": "usd",
            "customer": paid["customer"],
            "payment_method": paid["payment_method"],
            "confirm": True,
            "off_session": True,
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            "metadata": {"recharged_account": paid["metadata"]["recharged_account"]},
        }
    )
    result = run("reconcile", "--since", "2026-11-01", COLUMNS="200")
    assert result.returncode == 1, result.stderr
    assert "2 matched one to one" in result.stdout
    # $84.00 + 20% VAT twice, and the stray $12.34: in the currency's own form, never in cents
    assert "charged 213.94 USD, credited 168.00 USD" in result.stdout
    assert "charged = credited + VAT" in result.stdout
    assert "charge_without_credit" in result.stdout
    assert stray.id in result.stdout
    assert "12.34 USD charged on" in result.stdout
    assert "minor units" not in result.stdout
    assert "1 problem found" in result.stdout
    bad = run("reconcile", "--since", "last tuesday")
    assert (bad.returncode, "is not a date" in bad.stderr) == (2, True)
    no_key = run("reconcile", RECHARGED_STRIPE_API_KEY="")
    assert (no_key.returncode, "no Stripe API key" in no_key.stderr) == (78, True)
