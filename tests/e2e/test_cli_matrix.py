"""Every `recharged` command, driven as an admin would: its help works, and each kind of bad argument gets a
clear message, a non-zero exit status and leaves the database exactly as it was.

A new command must add its cases here: `test_every_command_is_in_the_matrix` fails until it does.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text

from recharged.cli import main
from recharged.store.engine import Database

REPO = Path(__file__).resolve().parents[2]
ACTOR = "--actor 'Jane Doe'"

# command -> [(arguments, exit status, words the message must contain)]
MATRIX: dict[str, list[tuple[str, int, str]]] = {
    "accounts close": [
        ("accounts close acme " + ACTOR, 2, "Missing option '--reason'"),
        ("accounts close acme --reason ' ' " + ACTOR, 2, "--reason"),
        ("accounts close acme --reason gone --actor Jane", 2, "first and last name"),
        ("accounts close ghost --reason gone " + ACTOR, 3, "no account 'ghost'"),
    ],
    "accounts create": [
        ("accounts create acme --email x@y.example --plan standard --vat-percent 0", 2, "Missing option '--actor'"),
        ("accounts create new1 --email nope --plan standard --vat-percent 0 " + ACTOR, 2, "email"),
        ("accounts create new1 --email a@b.example --plan gold --vat-percent 0 " + ACTOR, 2, "plan 'gold'"),
        ("accounts create new1 --email a@b.example --plan standard --vat-percent 120 " + ACTOR, 2, "vat"),
    ],
    "accounts export": [
        ("accounts export --out {notdemo}/thesis.txt", 2, "exists already; nothing was written"),
        ("accounts export --out /nonexistent/accounts.csv", 2, "there is no folder"),
    ],
    "accounts history": [
        ("accounts history ghost", 3, "no account 'ghost'"),
        ("accounts history acme --since yesterday", 2, "since"),
        ("accounts history acme --days 0", 2, "days"),
    ],
    "accounts import": [("accounts import /nonexistent.csv " + ACTOR, 2, "does not exist")],
    "accounts list": [
        ("accounts list --status gone", 2, "'gone' is not one of"),
        ("accounts list --currency dollars", 2, "unknown currency 'dollars'"),
    ],
    "accounts reopen": [
        ("accounts reopen acme", 2, "Missing option '--actor'"),
        ("accounts reopen acme " + ACTOR, 4, "account acme is open"),
        ("accounts reopen ghost " + ACTOR, 3, "no account 'ghost'"),
    ],
    "accounts search": [("accounts search", 2, "Missing argument 'TEXT'"), ("accounts search ' '", 2, "search text")],
    "accounts show": [("accounts show ghost", 3, "no account 'ghost'"), ("accounts show acme --at soon", 2, "--at")],
    "accounts update": [
        ("accounts update ghost --email a@b.example " + ACTOR, 3, "no account 'ghost'"),
        ("accounts update acme --vat-percent abc " + ACTOR, 2, "vat"),
    ],
    "adjust": [
        ("adjust acme --credit 1.00 " + ACTOR, 2, "Missing option '--reason'"),
        ("adjust acme --credit -1 --reason x " + ACTOR, 2, "must be positive"),
        ("adjust acme --credit 1 --debit 1 --reason x " + ACTOR, 2, "exactly one of --credit"),
        ("adjust ghost --credit 1 --reason x " + ACTOR, 3, "no account 'ghost'"),
    ],
    "audit": [("audit --limit 0", 2, "limit")],
    "auto-recharge": [
        ("auto-recharge acme --enable --actor Jane", 2, "first and last name"),
        ("auto-recharge acme --threshold-days -2 " + ACTOR, 2, "threshold_days"),
        ("auto-recharge acme --threshold-days 0 " + ACTOR, 2, "threshold_days = '0'"),
        ("auto-recharge acme --min-recharge 500 --max-recharge 100 " + ACTOR, 2, "above max_recharge 100.00 USD"),
    ],
    "check-config": [("check-config --config /nonexistent.toml", 78, "no such config file")],
    "cycle": [("cycle --at someday", 2, "--at"), ("cycle --once --at someday", 2, "--at")],
    "db status": [("db status --verbose", 2, "No such option")],
    "db upgrade": [("db upgrade now", 2, "unexpected extra argument")],
    "demo": [("demo --out {notdemo}", 2, "is not the output of an earlier `recharged demo`")],
    "events fetch": [("events fetch", 2, "Missing option '--since'"), ("events fetch --since someday", 2, "since")],
    "events list": [("events list --status lost", 2, "lost"), ("events list --limit 0", 2, "limit")],
    "events process": [("events process --all", 2, "No such option")],
    "issue-statements": [("issue-statements --at someday", 2, "--at")],
    "outbox cancel": [
        ("outbox cancel 1 --reason wrong", 2, "Missing option '--actor'"),
        ("outbox cancel 1 --actor 'Jane Doe'", 2, "Missing option '--reason'"),
        ("outbox cancel 999 --reason wrong " + ACTOR, 3, "no outbox message 999"),
        ("outbox cancel one --reason wrong " + ACTOR, 2, "'one' is not a valid integer"),
        ("outbox cancel 999 --reason ' ' " + ACTOR, 2, "--reason"),
    ],
    "outbox list": [("outbox list --status lost", 2, "lost")],
    "outbox send": [("outbox send --now", 2, "No such option")],
    "plan": [("plan --at tomorrow", 2, "Invalid value for '--at'")],
    "receipts list": [("receipts list ghost", 3, "ghost")],
    "receipts show": [("receipts show R-999999", 3, "R-999999")],
    "reconcile": [("reconcile --since someday", 2, "since")],
    "recover": [("recover --all", 2, "No such option"), ("recover --recharge 0", 2, "--recharge")],
    "run": [("run --once", 2, "No such option")],
    "api": [("api --port 70000", 2, "--port")],
    "sources add": [("sources add ghost --customer cus_1 --payment-method pm_1 " + ACTOR, 3, "no account 'ghost'")],
    "sources default": [("sources default acme 999 " + ACTOR, 3, "999")],
    "sources list": [("sources list ghost", 3, "no account 'ghost'")],
    "sources reactivate": [("sources reactivate acme 999 " + ACTOR, 3, "999")],
    "sources remove": [("sources remove acme abc " + ACTOR, 2, "abc")],
    "statement": [
        ("statement acme --month 2026-11 --json --csv", 2, "give one output format, not csv and json"),
        ("statement acme --month 2026-13", 2, "month"),
        ("statement ghost --month 2026-10", 3, "ghost"),
    ],
    "status": [("status --yaml", 2, "No such option")],
    "testserver": [
        ("testserver --port -1", 2, "Invalid value for '--port'"),
        ("testserver --port 70000", 2, "Invalid value for '--port'"),
        ("testserver --tls", 2, "No such option"),
    ],
    "topup": [
        ("topup acme 0 " + ACTOR, 2, "must be positive"),
        ("topup ghost 10 " + ACTOR, 3, "no account 'ghost'"),
        ("topup acme ten " + ACTOR, 2, "ten"),
    ],
    "usage import": [("usage import /nonexistent.csv", 2, "does not exist")],
    "usage record": [
        ("usage record --event-id e1 --account acme --kind dialer --started-at 2026-11-20T10:00:00", 2, "UTC"),
        ("usage record --event-id e1 --account ghost --kind dialer --started-at 2026-11-20T10:00:00Z", 2, "ghost"),
        ("usage record ghost --event-id e1 --kind dialer --started-at 2026-11-20T10:00:00Z", 2, "ghost"),
        ("usage record acme --account bolt --event-id e1 --kind dialer --started-at 2026-11-20T10:00:00Z", 2, "two"),
        ("usage record --event-id e1 --kind dialer --started-at 2026-11-20T10:00:00Z", 2, "which account"),
    ],
    "authorizations list": [
        ("authorizations list ghost", 3, "no account 'ghost'"),
        ("authorizations list", 2, "Missing"),
    ],
    "verify": [("verify --fix", 2, "No such option")],
    "webhooks list": [("webhooks list --status lost", 2, "lost"), ("webhooks list --limit 0", 2, "limit")],
    "webhooks replay": [("webhooks replay", 2, "Missing argument"), ("webhooks replay evt_nope", 3, "evt_nope")],
    "webhooks send": [("webhooks send --all", 2, "No such option")],
}


def commands(group: click.Group = main, prefix: str = "") -> list[str]:
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the top-level group imports a command's module when asked for it
        command = group.get_command(ctx, name)
        assert command is not None, name
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            found += commands(command, path + " ")
        else:
            found.append(path)
    return found


def test_every_command_is_in_the_matrix():
    assert sorted(commands()) == sorted(MATRIX), "add the new command's bad-argument cases to MATRIX"


@pytest.fixture
def invoke(db_url, tmp_path, monkeypatch):
    """The command in-process, with one account `acme` in a fresh database and no processor reachable."""
    monkeypatch.setenv("RECHARGED_DATABASE__URL", db_url)
    monkeypatch.setenv("RECHARGED_STRIPE_API_KEY", "sk_test_matrix")
    monkeypatch.setenv("RECHARGED_PAYMENTS__STRIPE_API_BASE", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("RECHARGED_PAYMENTS__MAX_RETRIES", "0")
    monkeypatch.setenv("RECHARGED_OUTBOX__FOLDER", str(tmp_path / "outbox"))
    monkeypatch.setenv("RECHARGED_OUTBOX__JOURNAL", str(tmp_path / "outbox.journal"))
    monkeypatch.delenv("RECHARGED_ACTOR", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(args: str):
        argv = shlex.split(args.format(notdemo=tmp_path / "precious"))
        return runner.invoke(main, ["--config", str(REPO / "config.toml"), *argv], catch_exceptions=False)

    created = run(
        "accounts create acme --email billing@acme.example --plan standard --vat-percent 20 --opening-balance 10 "
        + ACTOR
    )
    assert created.exit_code == 0, created.output
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("do not delete")
    return run


def snapshot(db_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, to prove a refused command wrote nothing."""
    db = Database(db_url)
    try:
        with db.engine.connect() as connection:
            tables = [t for t in inspect(connection).get_table_names() if t != "alembic_version"]
            return {
                table: sorted(
                    (tuple(str(v) for v in row) for row in connection.execute(text(f'SELECT * FROM "{table}"'))),
                )
                for table in tables
            }
    finally:
        db.close()


CASES = [(command, *case) for command, cases in sorted(MATRIX.items()) for case in cases]


@pytest.mark.parametrize(("command", "args", "code", "message"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_a_bad_argument_is_refused_clearly_and_changes_nothing(invoke, db_url, tmp_path, command, args, code, message):
    before = snapshot(db_url)
    result = invoke(args)
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, output
    assert message.lower() in output.lower(), output
    assert "Traceback" not in output
    assert snapshot(db_url) == before
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "do not delete"


@pytest.mark.parametrize("command", sorted(MATRIX))
def test_every_command_explains_itself(command):
    result = CliRunner().invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {command}" in result.output or f"Usage: recharged {command}" in result.output
    summary = result.output.split("\n\n")[1].strip()
    assert len(summary) > 15, f"{command} --help has no real description"
