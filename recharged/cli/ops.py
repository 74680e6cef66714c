"""Operations: the configuration, the database schema, the daemon and its status, and the ledger's invariants."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from recharged import credentials as secrets
from recharged.cli.app import App, main, out, pass_app
from recharged.cli.render import utc
from recharged.datacheck import data_problems
from recharged.errors import ConfigError, RechargedError
from recharged.mail.webhook_sender import describe_secrets
from recharged.money import format_customer
from recharged.status import StatusReport, ask_daemon, status_report
from recharged.store.engine import masked_url, sqlite_file
from recharged.tokens import configured_tokens
from recharged.verify import verify as verify_ledger
from recharged.words import plural


@main.command("check-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="config.toml to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the effective settings as JSON.")
@pass_app
def check_config(app: App, config_path: Path | None, as_json: bool) -> None:
    """Validate the configuration and print the effective settings (secrets masked)."""
    if config_path is not None:
        app.config_path = config_path
    settings = app.settings
    effective = settings.model_dump(mode="json")
    effective["database"]["url"] = masked_url(settings.database.url)
    effective["secrets"] = {name: secrets.describe(name) for name in secrets.SECRET_NAMES}
    effective["secrets"] |= describe_secrets(settings)  # each webhook endpoint's; ConfigError when one lacks it
    effective["api_tokens"] = {token.name: "+".join(sorted(token.scopes)) for token in configured_tokens()}
    if as_json:
        problems, _ = _data_problems(app)
        if problems:
            raise ConfigError("the database's accounts need what the configuration lacks:\n  " + "\n  ".join(problems))
        out.print_json(json.dumps(effective))
        return
    source = str(app.config_path) if app.config_path else "built-in defaults (no config.toml found)"
    problems, checked = _data_problems(app)
    if problems:
        raise ConfigError(
            f"{source}: the database's accounts need what the configuration lacks:\n  " + "\n  ".join(problems)
        )
    out.print(f"configuration OK: {source}")
    out.print(f"  {checked}", markup=False)
    _print_tree(effective)


def _data_problems(app: App) -> tuple[list[str], str]:
    """The configuration against the database's accounts, when the database can be read; and what was checked."""
    url = masked_url(app.settings.database.url)
    file = sqlite_file(app.settings.database.url)
    if file is not None and not Path(file).exists():  # checking must not create an empty database
        return [], f"not checked against a database: {file} does not exist yet"
    try:
        db = app.database()
        problems = data_problems(db, app.settings, app.clock.now().date())
    except RechargedError as exc:
        return [], f"not checked against the database ({exc})"
    return problems, f"checked against the accounts in {url}"


def _print_tree(values: dict[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _print_tree(value, f"{prefix}{key}.")
        else:
            out.print(f"  {prefix}{key} = {json.dumps(value)}")


# --- database -----------------------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database schema: upgrade and status."""


@db_group.command("upgrade")
@pass_app
def db_upgrade(app: App) -> None:
    """Bring the database to the newest schema (creates it when empty)."""
    db = app.database(migrated=False)
    before, after = db.upgrade()
    if before == after:
        out.print(f"database {masked_url(db.url)} is already at schema {after}")
    else:
        out.print(f"database {masked_url(db.url)} upgraded from {before or 'empty'} to {after}")


@db_group.command("status")
@pass_app
def db_status(app: App) -> None:
    """Show the database's schema version and the newest one."""
    db = app.database(migrated=False)
    current, head = db.current_revision(), db.head_revision()
    state = "up to date" if current == head else "needs `recharged db upgrade`"
    out.print(f"database {masked_url(db.url)}: schema {current or 'none'}, newest {head}: {state}")
    if current != head:
        sys.exit(1)


@main.command("run")
@pass_app
def run(app: App) -> None:
    """Run the daemon: recharge cycles on schedule, the HTTP API, health and metrics, until SIGTERM.

    Meant for systemd (Type=notify; see deploy/recharged.service). SIGHUP reloads config.toml."""
    from recharged.daemon.process import run_daemon  # lazy: uvicorn, FastAPI and APScheduler, for this command only

    sys.exit(run_daemon(app.config_path, app.clock))


@main.command("api")
@click.option("--port", type=click.IntRange(0, 65_535), help="Listen here instead of [api] port (several on one host).")
@pass_app
def api(app: App, port: int | None) -> None:
    """Serve the HTTP API in a process of its own, on [api] host:port: the endpoints of `run`'s server, without
    its scheduled work, so a charge cycle never slows a dialer's authorization down. For PostgreSQL; on SQLite the
    daemon's own server is faster.

    Meant for systemd beside `run` (Type=notify; see deploy/recharged-api.service). SIGHUP reloads config.toml."""
    from recharged.daemon.apiserver import run_api  # lazy, as `run`

    sys.exit(run_api(app.config_path, app.clock, port))


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts, amounts as decimal strings.")
@pass_app
def status_command(app: App, as_json: bool) -> None:
    """The daemon's last and next cycle, what it charged in the last 24 hours, and what needs attention:
    accounts waiting on the customer (action_required), suspended, paused by a dispute or backing off, unusable
    cards, email not delivered, recharges open longer than a lease, processor events that fail or wait. The
    next cycle is asked of the running daemon (/healthz at [http] host:port); when none answers it is estimated
    from the last successful cycle.

    \b
    Exit status: 0 when nothing needs attention, 1 when something does (it is listed), 69 when the database
    cannot be used, 78 when the configuration is invalid. For scripts: `recharged status --json || alert`.
    """
    db = app.database()
    report = status_report(db, app.settings, app.clock.now(), ask_daemon(app.settings))
    if as_json:
        out.print_json(json.dumps(report.as_json()))
    else:
        _status_tables(report)
    if report.needs_attention:
        sys.exit(1)


def _status_tables(report: StatusReport) -> None:
    table = Table(title=f"recharged status at {utc(report.at)}", show_header=False)
    last = report.last_cycle
    if last is None:
        table.add_row("last cycle", "none recorded yet")
    else:
        table.add_row("last cycle", f"{utc(last.started_at)} on {escape(last.instance)}: {last.status}")
        s = last.summary
        if s:
            totals = ", ".join(f"{amount} {currency}" for currency, amount in (s.get("charged_total") or {}).items())
            table.add_row(
                "  result",
                f"{s.get('charged', 0)} charged{f' ({totals})' if totals else ''}, {s.get('failed', 0)} failed, "
                f"{plural(s.get('errors', 0), 'error')}, {s.get('waiting', 0)} waiting on the processor",
            )
        if last.error:
            table.add_row("  error", escape(last.error))
    if report.last_success is not None and report.last_success is not last:
        table.add_row("last successful", f"{utc(report.last_success.finished_at)} on {report.last_success.instance}")
    upcoming = report.next_cycle
    shown = utc(upcoming.at) if upcoming.at else "unknown"
    table.add_row("next cycle", f"{shown} ({escape(upcoming.note)})")
    daemon = report.daemon
    if daemon.answered:
        failing = [c for c in daemon.checks if c.status != "pass"]
        lines = [f"{c.name} {c.status}" + (f": {c.output}" if c.output else "") for c in failing]
        if failing and not daemon.detailed:
            lines.append("(the details are shown to an API token: set RECHARGED_API_TOKENS, or see the log)")
        table.add_row("daemon health", escape("\n".join([str(daemon.health), *lines])))
    charged = "; ".join(
        f"{plural(c.count, 'recharge')}, {format_customer(c.charged, c.currency)} charged "
        f"({format_customer(c.credited, c.currency)} credited)"
        for c in report.charged
    )
    table.add_row("charged, last 24 h", charged or "nothing")
    held = "; ".join(
        f"{plural(count, 'call')} authorized, {format_customer(units, currency)} held"
        for currency, (count, units) in report.held.items()
    )
    expired = f"; {plural(report.expired_last_24h, 'reservation')} expired unsettled in 24 h"
    refused = ", ".join(f"{count:,} {reason.replace('_', ' ')}" for reason, count in report.refused_last_24h.items())
    table.add_row(
        "calls in progress",
        (held or "none")
        + (expired if report.expired_last_24h else "")
        + (f"; refused in 24 h (402): {refused}" if refused else ""),
    )
    out.print(table)
    if not report.attention:
        out.print("nothing needs attention")
        return
    attention = Table("kind", "what", "detail", "since / retry at", title="needs attention")
    for a in report.attention:
        attention.add_row(a.kind, escape(a.subject), escape(a.detail), utc(a.at) if a.at else "-")
    out.print(attention)
    count = len(report.attention)
    out.print(f"{count} {'item needs' if count == 1 else 'items need'} attention")


@main.command("verify")
@pass_app
def verify(app: App) -> None:
    """Prove the ledger's invariants: balances, rating, daily totals, first usage. Exits 1 on any violation."""
    report = verify_ledger(app.database())
    for line in report.violations:
        out.print(f"VIOLATION {line}")
    if not report.ok:
        sys.exit(1)
    checked = plural(report.checked_entries, "usage entry", "usage entries")
    out.print(f"ledger OK: {checked} checked, every invariant holds")
