"""`recharged demo` as a newcomer runs it: a real process, then its summary, charts, emails and database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HABITS = {
    "steady": "steady",
    "growing": "growing",
    "spiky": "spiky",
    "newcomer": "new",
    "declining": "card declines",
    "needs-auth": "needs authentication",
}
PNG = b"\x89PNG\r\n\x1a\n"


def recharged(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECHARGED_")}  # the demo needs no settings
    return subprocess.run(
        [sys.executable, "-m", "recharged", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


class Demo:
    def __init__(self, out: Path, result: subprocess.CompletedProcess[str]) -> None:
        self.out, self.result = out, result

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def account(self, account_id: str) -> dict:
        return next(a for a in self.summary["accounts"] if a["account"] == account_id)

    def emails(self) -> list[EmailMessage]:
        parser = BytesParser(policy=policy.default)
        return [parser.parsebytes(path.read_bytes()) for path in sorted((self.out / "emails").glob("*.eml"))]

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.out / "recharged.db") as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    cwd = tmp_path_factory.mktemp("demo")
    result = recharged("demo", "--out", str(cwd / "x"), cwd=cwd)
    assert result.returncode == 0, result.stderr + result.stdout
    return Demo(cwd / "x", result)


def test_the_summary_names_every_account_and_its_habit(demo: Demo) -> None:
    lines = demo.result.stdout.splitlines()
    for account_id, habit in HABITS.items():
        assert any(account_id in line and habit in line for line in lines), f"{account_id} ({habit}) not in summary"
    assert {a["account"]: a["habit"] for a in demo.summary["accounts"]} == HABITS
    assert str(demo.out / "recharged.db") in demo.result.stdout
    assert str(demo.out / "emails") in demo.result.stdout


def test_each_account_gets_a_png_chart(demo: Demo) -> None:
    charts = sorted((demo.out / "charts").iterdir())
    assert [c.name for c in charts] == sorted(f"{account_id}.png" for account_id in HABITS)
    for chart in charts:
        assert chart.read_bytes().startswith(PNG)
        assert chart.stat().st_size > 10_000


def test_every_successful_charge_has_one_receipt_email(demo: Demo) -> None:
    charged = {pi for (pi,) in demo.query("SELECT payment_intent FROM recharges WHERE phase = 'finished'")}
    receipts = [m for m in demo.emails() if m["X-Recharged-Kind"] == "receipt"]
    assert len(charged) == len(receipts) == sum(a["charges"] for a in demo.summary["accounts"]) > 0
    mentioned = {pi for m in receipts for pi in charged if pi in m.get_body(("plain",)).get_content()}
    assert mentioned == charged


def test_the_declining_card_is_never_charged_and_the_customer_is_told(demo: Demo) -> None:
    account = demo.account("declining")
    assert account["charges"] == 0
    assert account["declines"] >= 1
    assert account["state"] in ("suspended", "backing_off")
    sent = [m["X-Recharged-Kind"] for m in demo.emails() if m["To"] == "billing@declining.example"]
    assert "payment_declined" in sent
    assert demo.query("SELECT count(*) FROM receipts WHERE account_id = 'declining'") == [(0,)]


def test_the_card_needing_authentication_ends_action_required(demo: Demo) -> None:
    account = demo.account("needs-auth")
    assert account["charges"] == 0
    assert account["state"] == "action_required"
    sent = [m["X-Recharged-Kind"] for m in demo.emails() if m["To"] == "billing@needs-auth.example"]
    assert sent == ["action_required"]


def test_steady_accounts_are_recharged_again_and_again_and_never_run_out(demo: Demo) -> None:
    for account_id in ("steady", "growing", "spiky"):
        account = demo.account(account_id)
        assert account["charges"] > 1, account
        assert float(account["lowest_balance"]) > 0, account
        low, high = (float(days) for days in account["reserve_days"])
        # between about one and three weeks of usage
        assert 5 <= low <= 7.5, account
        assert 19 <= high <= 23, account


def test_the_demo_database_verifies_clean(demo: Demo) -> None:
    assert demo.summary["verify"] == {"ok": True, "violations": []}
    assert "verify: ledger OK" in demo.result.stdout
    result = recharged("--config", str(demo.out / "config.toml"), "verify", cwd=demo.out.parent)
    assert result.returncode == 0, result.stderr + result.stdout


def test_a_second_run_replaces_the_first(demo: Demo) -> None:
    first = demo.summary
    (demo.out / "left-over.txt").write_text("from the first run")
    result = recharged("demo", "--out", str(demo.out), cwd=demo.out.parent)
    assert result.returncode == 0, result.stderr + result.stdout
    assert not (demo.out / "left-over.txt").exists()
    again = demo.summary
    assert [(a["account"], a["charges"], a["charged"]) for a in again["accounts"]] == [
        (a["account"], a["charges"], a["charged"]) for a in first["accounts"]
    ]  # the same seed, the same charges


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_out_that_is_not_a_demo_is_refused_and_left_untouched(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "mine"
    if kind == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    else:
        target.write_text("precious")
    result = recharged("demo", "--out", str(target), cwd=tmp_path)
    assert result.returncode != 0
    assert "error:" in result.stderr
    assert str(target) in result.stderr
    assert "nothing was changed" in result.stderr or "is not a folder" in result.stderr
    if kind == "folder":
        assert [p.name for p in target.iterdir()] == ["notes.txt"]
        assert (target / "notes.txt").read_text() == "precious"
    else:
        assert target.read_text() == "precious"
