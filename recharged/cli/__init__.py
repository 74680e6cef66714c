"""The `recharged` command: the composition root that wires settings, database, clock and services."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from recharged import accounts as accounts_service
from recharged import credentials as secrets
from recharged import funding as sources_service
from recharged.clock import Clock, FixedClock, SystemClock, parse_instant
from recharged.config import Settings, default_config_path, load_settings
from recharged.daemon.runtime import stripe_gateway
from recharged.errors import InputError, RechargedError
from recharged.logs import configure
from recharged.money import format_ledger, parse_amount
from recharged.payments import PaymentGateway, card_label
from recharged.planning import AccountPlan, plan_accounts
from recharged.recharge import RechargeReport, RechargeService
from recharged.store.engine import Database, masked_url
from recharged.usage import FIELDS, Outcome, UsageRecorder, summarize
from recharged.verify import verify as verify_ledger

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class App:
    """What every command may need, built on first use."""

    config_path: Path | None
    clock: Clock = field(default_factory=SystemClock)
    _settings: Settings | None = None
    _db: Database | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
            configure(self._settings.logging)
        return self._settings

    def database(self, *, migrated: bool = True) -> Database:
        if self._db is None:
            self._db = Database(self.settings.database.url)
        if migrated:
            self._db.require_current()
        return self._db

    def gateway(self) -> PaymentGateway:
        """The Stripe gateway; the key comes only from the environment or systemd credentials."""
        return stripe_gateway(self.settings, None, None)

    def recharges(self) -> RechargeService:
        gateway = self.gateway()  # fail before doing anything when the key is missing
        return RechargeService(self.database(), self.settings, lambda: gateway, self.clock)


pass_app = click.make_pass_decorator(App)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", markup=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns recharged's own errors into a clear message and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RechargedError as exc:
            _fail(str(exc).replace("[", r"\["), exc.exit_code)


def _parse_at(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


actor_option = click.option(
    "--actor",
    envvar="RECHARGED_ACTOR",
    required=True,
    help='First and last name of the admin signing this billing change (or $RECHARGED_ACTOR), e.g. "Jane Doe".',
)
at_option = click.option(
    "--at",
    "at",
    metavar="ISO",
    callback=_parse_at,
    help="Decide as of this instant (default: now), e.g. 2026-11-20T12:00Z.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="config.toml to use (default: $RECHARGED_CONFIG, else ./config.toml, else built-in defaults).",
)
@click.version_option(package_name="recharged")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """recharged: prepaid dialer balances, usage rating and automatic recharge."""
    ctx.obj = App(config_path if config_path is not None else default_config_path(os.environ))


# --- configuration ------------------------------------------------------------------------------------------


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
    if as_json:
        out.print_json(json.dumps(effective))
        return
    source = str(app.config_path) if app.config_path else "built-in defaults (no config.toml found)"
    out.print(f"configuration OK: {source}")
    _print_tree(effective)


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


# --- accounts -----------------------------------------------------------------------------------------------


@main.group("accounts")
def accounts_group() -> None:
    """Create, import, change and show accounts."""


@accounts_group.command("create")
@click.argument("account_id")
@click.option("--email", required=True, help="Where receipts and notices go.")
@click.option("--plan", required=True, help="A rate plan defined in config.toml.")
@click.option("--currency", help="ISO currency code (default: the plan's currency).")
@click.option("--vat-percent", required=True, help="VAT rate in percent, e.g. 20 or 0.")
@click.option(
    "--created-at", metavar="ISO", help="When the customer started, if before recharged (history counts from it)."
)
@click.option("--opening-balance", metavar="AMOUNT", help="Balance brought over from the old system, e.g. 42.50.")
@actor_option
@pass_app
def accounts_create(app: App, /, account_id: str, actor: str, **fields: str | None) -> None:
    """Create one account (auto-recharge stays off until the customer opts in)."""
    accounts_service.parse_actor(actor)
    try:
        new = accounts_service.new_account({"id": account_id, **fields}, app.settings, app.clock.now())
    except ValueError as exc:
        raise InputError(str(exc)) from None
    result = accounts_service.create_accounts(app.database(), [new], actor, app.clock)
    if result.created:
        out.print(f"created account {account_id} ({new.plan}, {new.currency}, VAT {new.vat_percent}%)")
    else:
        out.print(f"account {account_id} already exists with these settings; nothing changed")


ACCOUNT_COLUMNS = (
    "id",
    "email",
    "plan",
    "currency",
    "vat_percent",
    "created_at",
    "opening_balance",
    "auto_recharge",
    *accounts_service.CARD_COLUMNS,
)


@accounts_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--created-at", metavar="ISO", help="created_at for rows that do not give one.")
@actor_option
@pass_app
def accounts_import(app: App, file: Path, created_at: str | None, actor: str) -> None:
    """Import accounts from CSV, all or nothing.

    Columns: id,email,plan,vat_percent and optionally currency,created_at,opening_balance,auto_recharge, and
    for a card already on file at Stripe: stripe_customer,payment_method,card_brand,card_last4,card_exp (MM/YYYY).
    Re-importing the same file changes nothing.
    """
    accounts_service.parse_actor(actor)
    now = app.clock.now()
    new, problems = [], []
    with _open_csv(file) as (reader, rows, _):
        _check_header(file, reader.fieldnames, required=("id", "email", "plan", "vat_percent"), known=ACCOUNT_COLUMNS)
        for line, row in rows:
            shape = _shape_problem(row)
            if shape:
                problems.append(f"{file}:{line}: {shape}")
                continue
            if created_at and not (row.get("created_at") or "").strip():
                row["created_at"] = created_at
            try:
                new.append(accounts_service.new_account(row, app.settings, now))
            except ValueError as exc:
                problems.append(f"{file}:{line}: {exc}")
    if problems:
        listing = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise InputError(f"{len(problems)} bad rows, nothing imported:\n  {listing}")
    result = accounts_service.create_accounts(app.database(), new, actor, app.clock)
    out.print(f"{file}: {len(result.created)} accounts created, {len(result.unchanged)} already present and unchanged")


@accounts_group.command("update")
@click.argument("account_id")
@click.option("--email")
@click.option("--plan")
@click.option("--vat-percent")
@actor_option
@pass_app
def accounts_update(
    app: App, account_id: str, email: str | None, plan: str | None, vat_percent: str | None, actor: str
) -> None:
    """Change an account's email, plan or VAT rate (signed and audited)."""
    if email is None and plan is None and vat_percent is None:
        raise InputError("nothing to change: give --email, --plan or --vat-percent")
    before, after = accounts_service.change_account(
        app.database(),
        account_id,
        actor=actor,
        clock=app.clock,
        settings=app.settings,
        email=email,
        plan=plan,
        vat_percent=vat_percent,
    )
    _print_change(account_id, before, after)


def _print_change(account_id: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    changed = [k for k in after if after[k] != before[k]]
    if not changed:
        out.print(f"account {account_id}: nothing changed")
    for key in changed:
        out.print(f"account {account_id}: {key} {before[key]} -> {after[key]}")


@main.command("auto-recharge")
@click.argument("account_id")
@click.option("--enable/--disable", default=None, help="Turn automatic recharge on (the customer opted in) or off.")
@click.option("--window-days", help="Days of usage the average covers (or 'default').")
@click.option("--threshold-days", help="Days of average usage kept as the minimum reserve (or 'default').")
@click.option("--recharge-days", help="Days of average usage added by a recharge (or 'default').")
@click.option("--min-threshold", help="Floor of the threshold, an amount (or 'default').")
@click.option("--min-recharge", help="Floor of a recharge, an amount (or 'default').")
@click.option("--max-recharge", help="Ceiling of one charge, an amount (or 'default').")
@click.option("--max-charged-per-day", help="Spend cap over 24 hours (or 'default').")
@click.option("--max-charged-per-30-days", help="Spend cap over 30 days (or 'default').")
@actor_option
@pass_app
def auto_recharge(app: App, /, account_id: str, enable: bool | None, actor: str, **overrides: str | None) -> None:
    """Turn automatic recharge on or off, and set this account's own policy (signed and audited)."""
    if enable is None and all(v is None for v in overrides.values()):
        raise InputError("nothing to change: give --enable, --disable or a policy setting")
    before, after = accounts_service.change_account(
        app.database(),
        account_id,
        actor=actor,
        clock=app.clock,
        settings=app.settings,
        auto_recharge=enable,
        overrides=overrides,
    )
    _print_change(account_id, before, after)


@accounts_group.command("show")
@click.argument("account_id")
@at_option
@click.option("--json", "as_json", is_flag=True)
@pass_app
def accounts_show(app: App, account_id: str, at: datetime | None, as_json: bool) -> None:
    """One account: its settings, balance and the decision the next cycle would take."""
    when = at or app.clock.now()
    db = app.database()
    account = accounts_service.get_account(db, account_id)
    plans = list(plan_accounts(db, app.settings, when, [account_id]))
    settings = accounts_service.settings_of(account)
    settings["created_at"] = account.created_at.isoformat()
    settings["first_usage_at"] = account.first_usage_at.isoformat() if account.first_usage_at else None
    if as_json:
        out.print_json(json.dumps({"account": account_id, "settings": settings, **_plan_json(plans[0])}))
        return
    table = Table(title=f"account {account_id}", show_header=False)
    for key, value in settings.items():
        table.add_row(key, "(config)" if value is None else str(value))
    out.print(table)
    _plan_table(plans, when)


# --- audit --------------------------------------------------------------------------------------------------


@main.command("audit")
@click.argument("account_id", required=False)
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def audit(app: App, account_id: str | None, limit: int, as_json: bool) -> None:
    """Who changed billing settings, when, and the values before and after (newest first)."""
    records = accounts_service.audit_trail(app.database(), account_id, limit)
    if as_json:
        rows = [
            {
                "at": r.at.isoformat(),
                "account": r.account_id,
                "actor": r.actor,
                "action": r.action,
                "before": r.before,
                "after": r.after,
            }
            for r in records
        ]
        out.print_json(json.dumps(rows))
        return
    table = Table("at (UTC)", "account", "actor", "action", "before", "after")
    for r in records:
        table.add_row(r.at.isoformat(), r.account_id, r.actor, r.action, _kv(r.before), _kv(r.after))
    out.print(table if records else "no audit records")


def _kv(values: dict[str, Any] | None) -> str:
    shown = {k: v for k, v in (values or {}).items() if v is not None}
    return "\n".join(f"{k}={v}" for k, v in shown.items()) or "-"


# --- usage --------------------------------------------------------------------------------------------------


@main.group("usage")
def usage_group() -> None:
    """Record usage: one event, or a CSV of call-detail records."""


@usage_group.command("record")
@click.option("--event-id", required=True)
@click.option("--account", "account_id", required=True)
@click.option("--kind", required=True, help="A usage kind of the account's plan, e.g. dialer or sms_out.")
@click.option("--started-at", required=True, metavar="ISO", help="When the call was dialed or the message sent.")
@click.option("--duration", "duration_seconds", help="Seconds of the whole leg (time-based kinds).")
@click.option("--quantity", help="Units (count-based kinds).")
@click.option("--text", help="The SMS text; its segments are counted.")
@click.option("--cost", help="A pre-rated cost, used as given.")
@pass_app
def usage_record(app: App, /, **event: str | None) -> None:
    """Record one usage event."""
    recorder = UsageRecorder(app.database(), app.settings, app.clock)
    outcome = recorder.record([event])[0]
    if outcome.status == "rejected":
        raise InputError(f"event {event['event_id']} rejected: {outcome.reason}")
    out.print(f"event {event['event_id']}: {outcome.status}")


@usage_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--rejects",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write rejected rows (default: FILE with .rejected.csv), only if there are any.",
)
@pass_app
def usage_import(app: App, file: Path, rejects: Path | None) -> None:
    """Import call-detail records from CSV; duplicates are skipped, bad rows rejected one by one.

    Header: event_id,account_id,kind,started_at,duration_seconds,quantity,text,cost
    """
    recorder = UsageRecorder(app.database(), app.settings, app.clock)
    batch_size = app.settings.usage.batch_size
    rejects = rejects or file.with_name(file.stem + ".rejected.csv")
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    reject_writer: Any = None
    reject_handle: IO[str] | None = None
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    try:
        with _open_csv(file) as (reader, rows, handle), progress:
            _check_header(file, reader.fieldnames, required=FIELDS, known=FIELDS)
            task = progress.add_task(f"importing {file.name}", total=file.stat().st_size)
            for batch in _batches(rows, batch_size):
                ragged = [(line, row, _shape_problem(row)) for line, row in batch]
                fitting = [(line, row) for line, row, problem in ragged if problem is None]
                outcomes = recorder.record([row for _, row in fitting], [line for line, _ in fitting])
                outcomes += [Outcome(line, row.get("event_id"), "rejected", p) for line, row, p in ragged if p]
                for key, value in summarize(outcomes).items():
                    counts[key] += value
                rows_at = {line: row for line, row in batch}
                bad = [(o, rows_at[o.position]) for o in outcomes if o.status == "rejected"]
                if bad and reject_writer is None:
                    reject_handle = rejects.open("w", newline="", encoding="utf-8")
                    reject_writer = csv.writer(reject_handle)
                    reject_writer.writerow(["line", "reason", *FIELDS])
                for outcome, row in bad:
                    reject_writer.writerow([outcome.position, outcome.reason, *(row.get(f) or "" for f in FIELDS)])
                progress.update(task, completed=handle.tell())
    finally:
        if reject_handle is not None:
            reject_handle.close()
    elapsed = time.perf_counter() - started
    total = sum(counts.values())
    rate = f", {total / elapsed:,.0f} events/s" if elapsed > 0 and total else ""
    out.print(
        f"{file}: {counts['accepted']} accepted, {counts['duplicate']} duplicates, {counts['rejected']} rejected "
        f"in {elapsed:.1f}s{rate}"
    )
    if counts["rejected"]:
        out.print(f"rejected rows with their line numbers and reasons: {rejects}")


def _batches(rows: Iterator[tuple[int, dict[str, str]]], size: int) -> Iterator[list[tuple[int, dict[str, str]]]]:
    batch: list[tuple[int, dict[str, str]]] = []
    for item in rows:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


EXTRA = "\x00extra"


@contextmanager
def _open_csv(path: Path) -> Iterator[tuple[csv.DictReader[str], Iterator[tuple[int, dict[str, str]]], IO[str]]]:
    """Open a UTF-8 CSV (BOM allowed): its reader, its (line number, row) pairs, and the file (for progress).
    See `_shape_problem` for ragged rows."""
    with path.open("r", newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, restkey=EXTRA)

        def rows() -> Iterator[tuple[int, dict[str, str]]]:
            try:
                for row in reader:
                    yield reader.line_num, row
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: not UTF-8 text after line {reader.line_num} (byte {exc.start}); "
                    "rows before it were processed, re-running after fixing the file is safe"
                ) from None
            except csv.Error as exc:
                raise InputError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None

        yield reader, rows(), handle


def _shape_problem(row: dict[str, Any]) -> str | None:
    """Why a CSV row does not fit its header, if it does not."""
    if EXTRA in row:
        return f"row has {len(row[EXTRA])} more fields than the header (quote fields that contain commas)"
    if None in row.values():
        return "row has fewer fields than the header"
    return None


def _check_header(path: Path, header: Any, *, required: tuple[str, ...], known: tuple[str, ...]) -> None:
    columns = [c.strip() for c in header or []]
    missing = [c for c in required if c not in columns]
    unknown = [c for c in columns if c not in known]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing columns {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown columns {', '.join(unknown)}")
        raise InputError(f"{path}:1: bad header ({'; '.join(parts)}); expected {','.join(known)}")


# --- plan ---------------------------------------------------------------------------------------------------


@main.command("plan")
@at_option
@click.option("--json", "as_json", is_flag=True, help="JSON with amounts as decimal strings.")
@click.option("--charges-only", is_flag=True, help="Only the accounts the cycle would charge.")
@pass_app
def plan(app: App, at: datetime | None, as_json: bool, charges_only: bool) -> None:
    """What the next recharge cycle would charge, for every account, and why."""
    when = at or app.clock.now()
    plans: Iterator[AccountPlan] = plan_accounts(app.database(), app.settings, when)
    if charges_only:
        plans = (p for p in plans if p.decision.action == "charge")
    if as_json:
        _stream_json(plans, when, sys.stdout.write)
        return
    _plan_table(list(plans), when)


def _plan_json(p: AccountPlan) -> dict[str, Any]:
    d = p.decision
    return {
        "account": p.account_id,
        "currency": p.currency,
        "balance": format_ledger(d.balance),
        "window": {"start": p.window.start.isoformat(), "end": p.window.end.isoformat(), "days": d.history_days},
        "average_daily_usage": format_ledger(d.average_daily),
        "threshold": format_ledger(d.threshold),
        "recharge_amount": format_ledger(d.recharge_amount),
        "runway_days": None if d.runway_days is None else str(d.runway_days),
        "auto_recharge": p.auto_recharge,
        "decision": d.action,
        "reason": d.reason,
        "charge_amount": format_ledger(d.charge_amount),
        "limited_by": d.limited_by,
    }


def _stream_json(plans: Iterator[AccountPlan], when: datetime, write: Callable[[str], Any]) -> None:
    write('{"at": ' + json.dumps(when.isoformat()) + ', "accounts": [')
    for i, p in enumerate(plans):
        write(("," if i else "") + "\n  " + json.dumps(_plan_json(p)))
    write("\n]}\n")


def _plan_table(plans: list[AccountPlan], when: datetime) -> None:
    table = Table(title=f"recharge plan at {when.isoformat()}")
    for column in ("account", "cur", "balance", "avg/day", "days", "threshold", "recharge", "runway d", "decision"):
        table.add_column(column, justify="right" if column not in ("account", "cur", "decision") else "left")
    charges = 0
    for p in plans:
        d = p.decision
        verdict = f"[bold]charge {format_ledger(d.charge_amount)}[/]" if d.action == "charge" else "skip"
        why = d.reason + (f" ({d.limited_by})" if d.limited_by else "")
        charges += d.action == "charge"
        table.add_row(
            p.account_id,
            p.currency,
            format_ledger(d.balance),
            format_ledger(d.average_daily),
            str(d.history_days),
            format_ledger(d.threshold),
            format_ledger(d.recharge_amount),
            "-" if d.runway_days is None else str(d.runway_days),
            f"{verdict}: {why}",
        )
    out.print(table)
    out.print(f"{len(plans)} accounts, {charges} to charge")


# --- funding sources, charges and adjustments ---------------------------------------------------------------


@main.group("sources")
def sources_group() -> None:
    """Cards on file: the default is charged first, then the backups in the order added."""


@sources_group.command("add")
@click.argument("account_id")
@click.option("--customer", required=True, help="The Stripe customer id (cus_...).")
@click.option("--payment-method", required=True, help="A card attached to that customer (pm_...).")
@click.option("--default", "make_default", is_flag=True, help="Make it the default (the first card always is).")
@actor_option
@pass_app
def sources_add(app: App, account_id: str, customer: str, payment_method: str, make_default: bool, actor: str) -> None:
    """Add a card, checking with Stripe that it belongs to the customer (brand, last4, expiry come from there)."""
    accounts_service.parse_actor(actor)
    db = app.database()
    accounts_service.get_account(db, account_id)  # an unknown account is refused before asking Stripe
    card = app.gateway().card(customer, payment_method)
    source = sources_service.add_source(db, account_id, card, actor=actor, clock=app.clock, make_default=make_default)
    role = "default" if source.is_default else "backup"
    out.print(f"account {account_id}: added {card_label(card, expiry=False)} as {role} funding source {source.id}")


@sources_group.command("list")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def sources_list(app: App, account_id: str, as_json: bool) -> None:
    """The account's cards in charging order."""
    rows = sources_service.list_sources(app.database(), account_id)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("source", "card", "customer", "payment method", "role", "state")
    for row in rows:
        role = "default" if row["default"] else "backup"
        state = f"unusable: {row['unusable']}" if row["unusable"] else "usable"
        table.add_row(str(row["source"]), row["card"], row["customer"], row["payment_method"], role, state)
    out.print(table if rows else f"account {account_id} has no funding source")


@sources_group.command("default")
@click.argument("account_id")
@click.argument("source_id", type=int)
@actor_option
@pass_app
def sources_default(app: App, account_id: str, source_id: int, actor: str) -> None:
    """Make a card the default."""
    sources_service.make_default(app.database(), account_id, source_id, actor=actor, clock=app.clock)
    out.print(f"account {account_id}: funding source {source_id} is the default")


@sources_group.command("remove")
@click.argument("account_id")
@click.argument("source_id", type=int)
@actor_option
@pass_app
def sources_remove(app: App, account_id: str, source_id: int, actor: str) -> None:
    """Remove a card (the first backup becomes the default if it was)."""
    promoted = sources_service.remove_source(app.database(), account_id, source_id, actor=actor, clock=app.clock)
    out.print(f"account {account_id}: removed funding source {source_id}")
    if promoted is not None:
        out.print(f"account {account_id}: funding source {promoted.id} is now the default")


@sources_group.command("reactivate")
@click.argument("account_id")
@click.argument("source_id", type=int)
@actor_option
@pass_app
def sources_reactivate(app: App, account_id: str, source_id: int, actor: str) -> None:
    """Allow charging a card again after a hard decline, once the customer or bank has fixed it."""
    sources_service.reactivate_source(app.database(), account_id, source_id, actor=actor, clock=app.clock)
    out.print(f"account {account_id}: funding source {source_id} can be charged again")


@main.command("topup")
@click.argument("account_id")
@click.argument("amount")
@actor_option
@pass_app
def topup(app: App, account_id: str, amount: str, actor: str) -> None:
    """Charge a one-time purchase of AMOUNT (plus VAT) now and credit the balance."""
    signed = accounts_service.parse_actor(actor)
    try:
        units = parse_amount(amount)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    report = app.recharges().topup(account_id, units, signed)
    _print_reports([report], "top-up")
    if report.phase != "finished":
        sys.exit(1)


@main.command("adjust")
@click.argument("account_id")
@click.option("--credit", help="Add this amount to the balance.")
@click.option("--debit", help="Take this amount from the balance.")
@click.option("--reason", required=True, help="Why, in words the next admin will understand.")
@click.option("--reference", help="Your own id for this adjustment; recording it again changes nothing.")
@actor_option
@pass_app
def adjust(
    app: App, account_id: str, credit: str | None, debit: str | None, reason: str, reference: str | None, actor: str
) -> None:
    """Record a manual credit or debit on the balance, audited."""
    if (credit is None) == (debit is None):
        raise InputError("give exactly one of --credit AMOUNT or --debit AMOUNT")
    try:
        units = parse_amount(credit or debit or "", what="--credit" if credit else "--debit")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if units <= 0:
        raise InputError("the amount must be positive; use --debit to take money off the balance")
    units = units if credit else -units
    done = accounts_service.adjust_balance(
        app.database(), account_id, units, reason=reason, actor=actor, clock=app.clock, reference=reference
    )
    if done:
        out.print(f"account {account_id}: adjusted by {format_ledger(units)} ({reason})")
    else:
        out.print(f"account {account_id}: adjustment {reference} was already recorded; nothing changed")


@main.command("cycle")
@click.option("--once", is_flag=True, required=True, help="Run one whole recharge cycle now and exit.")
@at_option
@pass_app
def cycle(app: App, once: bool, at: datetime | None) -> None:
    """Run one recharge cycle now: recover unfinished recharges, decide, charge, credit; print what it did."""
    if at is not None:
        app.clock = FixedClock(at)
    from recharged.mail.notices import notify_from_plans

    db = app.database()
    report = app.recharges().run_cycle(
        concurrency=app.settings.daemon.charge_concurrency,
        plans_seen=lambda plans: notify_from_plans(db, app.clock.now(), plans),
    )
    out.print(f"recharge cycle at {report.at.isoformat()}")
    if report.recovered:
        _print_reports(report.recovered, "recovered")
    _print_reports(sorted(report.charged, key=lambda r: r.account_id), "charged")
    for account_id, problem in sorted(report.errors.items()):
        err.print(f"account {account_id}: not charged: {problem}", markup=False)
    for account_id in report.not_claimed:
        out.print(f"account {account_id}: skipped, no longer due (another worker charged it, or it changed)")
    if any(r.phase not in ("finished", "failed") for r in report.recovered + report.charged):
        out.print("some recharges wait on the processor; the next cycle (or `cycle --once`) finishes them")
    if report.errors:
        sys.exit(1)


@main.command("run")
@pass_app
def run(app: App) -> None:
    """Run the daemon: recharge cycles on schedule, the HTTP API, health and metrics, until SIGTERM.

    Meant for systemd (Type=notify; see deploy/recharged.service). SIGHUP reloads config.toml."""
    from recharged.daemon.process import run_daemon

    sys.exit(run_daemon(app.config_path, app.clock))


@main.command("recover")
@pass_app
def recover(app: App) -> None:
    """Finish every recharge left half-way (after a crash, a timeout or a lost connection), charging nothing twice."""
    reports = app.recharges().recover()
    _print_reports(reports, "recovered")
    if any(r.phase not in ("finished", "failed") for r in reports):
        out.print("some recharges still wait on the processor; run `recharged recover` again later")
        sys.exit(1)


def _print_reports(reports: list[RechargeReport], title: str) -> None:
    if not reports:
        out.print(f"{title}: nothing")
        return
    table = Table("recharge", "account", "kind", "amount", "charged", "card", "phase", "outcome", title=title)
    for r in reports:
        table.add_row(
            str(r.recharge_id),
            r.account_id,
            r.kind,
            f"{format_ledger(r.amount)} {r.currency}",
            f"{format_ledger(r.total)} {r.currency}",
            r.source or "-",
            r.phase,
            r.outcome,
        )
    out.print(table)


# --- status, account history and reconciliation -------------------------------------------------------------


def _utc(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts, amounts as decimal strings.")
@pass_app
def status_command(app: App, as_json: bool) -> None:
    """The daemon's last and next cycle, what it charged in the last 24 hours, and what needs attention:
    accounts waiting on the customer (action_required), suspended or backing off, unusable cards, email not
    delivered, recharges open longer than a lease. The next cycle is asked of the running daemon (/healthz at
    [http] host:port); when none answers it is estimated from the last successful cycle.

    \b
    Exit status: 0 when nothing needs attention, 1 when something does (it is listed), 69 when the database
    cannot be used, 78 when the configuration is invalid. For scripts: `recharged status --json || alert`.
    """
    from recharged.status import ask_daemon, status_report

    db = app.database()
    report = status_report(db, app.settings, app.clock.now(), ask_daemon(app.settings))
    if as_json:
        out.print_json(json.dumps(report.as_json()))
    else:
        _status_tables(report)
    if report.needs_attention:
        sys.exit(1)


def _status_tables(report: Any) -> None:
    from rich.markup import escape

    from recharged.money import format_customer

    table = Table(title=f"recharged status at {_utc(report.at)}", show_header=False)
    last = report.last_cycle
    if last is None:
        table.add_row("last cycle", "none recorded yet")
    else:
        table.add_row("last cycle", f"{_utc(last.started_at)} on {escape(last.instance)}: {last.status}")
        s = last.summary
        if s:
            totals = ", ".join(f"{amount} {currency}" for currency, amount in (s.get("charged_total") or {}).items())
            table.add_row(
                "  result",
                f"{s.get('charged', 0)} charged{f' ({totals})' if totals else ''}, {s.get('failed', 0)} failed, "
                f"{s.get('errors', 0)} errors, {s.get('waiting', 0)} waiting on the processor",
            )
        if last.error:
            table.add_row("  error", escape(last.error))
    if report.last_success is not None and report.last_success is not last:
        table.add_row("last successful", f"{_utc(report.last_success.finished_at)} on {report.last_success.instance}")
    upcoming = report.next_cycle
    shown = _utc(upcoming.at) if upcoming.at else "unknown"
    table.add_row("next cycle", f"{shown} ({escape(upcoming.note)})")
    charged = "; ".join(
        f"{c.count} recharges, {format_customer(c.charged, c.currency)} charged "
        f"({format_customer(c.credited, c.currency)} credited)"
        for c in report.charged
    )
    table.add_row("charged, last 24 h", charged or "nothing")
    out.print(table)
    if not report.attention:
        out.print("nothing needs attention")
        return
    attention = Table("kind", "what", "detail", "since / retry at", title="needs attention")
    for a in report.attention:
        attention.add_row(a.kind, escape(a.subject), escape(a.detail), _utc(a.at) if a.at else "-")
    out.print(attention)
    count = len(report.attention)
    out.print(f"{count} {'item needs' if count == 1 else 'items need'} attention")


@accounts_group.command("history")
@click.argument("account_id")
@click.option("--days", type=click.IntRange(1, 366), help="The last N UTC days, today included (default 30).")
@click.option("--since", metavar="DATE", help="The first UTC day, YYYY-MM-DD.")
@click.option("--until", metavar="DATE", help="The last UTC day, YYYY-MM-DD (default: today).")
@click.option("--json", "as_json", is_flag=True, help="JSON with amounts as decimal strings.")
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.png",
    help="Draw the balance, threshold and recharges as a PNG chart into FILE.png (instead of the table).",
)
@pass_app
def accounts_history(
    app: App, account_id: str, days: int | None, since: str | None, until: str | None, as_json: bool, chart: Path | None
) -> None:
    """An account day by day (UTC): usage per kind, credits and adjustments, the balance at the end of the day (from the
    ledger), the threshold the recharge decision had that day, and the recharges claimed that day."""
    from recharged.history import account_history, parse_period

    if chart is not None and chart.suffix.lower() != ".png":
        raise InputError(f"--chart {chart}: the chart is a PNG; name the file *.png")
    first, last = parse_period(days, since, until, app.clock.now().date())
    history = account_history(app.database(), app.settings, account_id, first, last)
    if chart is not None:
        history.chart(chart)
        (err if as_json else out).print(f"account {account_id}: chart of {first} to {last} written to {chart}")
    if as_json:
        out.print_json(json.dumps(history.as_json()))
    elif chart is None:
        _history_table(history)


def _history_table(history: Any) -> None:
    from rich.markup import escape

    table = Table(title=f"account {history.account_id} ({history.currency}), {history.first} to {history.last} UTC")
    for column in ("day", "usage", "by kind", "credits/adj.", "balance", "threshold", "recharges"):
        table.add_column(column, justify="left" if column in ("day", "by kind", "recharges") else "right")
    for d in history.days:
        kinds = "\n".join(f"{u.kind} {format_ledger(u.amount)} ({u.events}x, {u.quantity} {u.unit})" for u in d.usage)
        recharges = "\n".join(
            f"#{r.id} {r.kind} {format_ledger(r.amount)}, charged {format_ledger(r.total)}: {r.phase}"
            + (f" ({escape(r.outcome)})" if r.outcome else "")
            for r in d.recharges
        )
        table.add_row(
            d.day.isoformat(),
            format_ledger(d.usage_total),
            kinds or "-",
            format_ledger(d.credits_and_adjustments) if d.credits_and_adjustments else "-",
            format_ledger(d.balance),
            format_ledger(d.threshold),
            recharges or "-",
        )
    out.print(table)
    out.print(f"balance at the start of {history.first}: {format_ledger(history.opening_balance)} {history.currency}")


def _parse_since(value: str) -> datetime:
    from datetime import date

    from recharged.clock import midnight

    try:
        day = date.fromisoformat(value.strip())
    except ValueError:
        try:
            return parse_instant(value)
        except ValueError:
            raise InputError(f"--since {value!r} is not a date (YYYY-MM-DD) or an ISO instant with offset") from None
    return midnight(day)


@main.command("reconcile")
@click.option(
    "--since", metavar="DATE", help="Payments created from this UTC day (or ISO instant) on; default 30 days ago."
)
@click.option("--json", "as_json", is_flag=True, help="JSON with amounts as decimal strings.")
@pass_app
def reconcile_command(app: App, since: str | None, as_json: bool) -> None:
    """Match the processor's PaymentIntents for our customers one to one with the ledger's credits and our
    recharges; report succeeded charges without a credit, credits without a succeeded charge, amounts or
    currencies that differ, and charges whose metadata names another account than the one credited.

    \b
    Exit status: 0 when everything matches, 1 when a problem is found (each is listed), 78 when the Stripe key
    or the configuration is missing or invalid.
    """
    from datetime import timedelta

    from rich.markup import escape

    from recharged.reconcile import reconcile

    start = _parse_since(since) if since is not None else app.clock.now() - timedelta(days=30)
    gateway = app.gateway()  # fail before reading anything when the key is missing
    report = reconcile(app.database(), gateway, start)
    if as_json:
        out.print_json(json.dumps(report.as_json()))
    else:
        charged = ", ".join(f"{format_ledger(v)} {c}" for c, v in sorted(report.charged.items())) or "nothing"
        credited = ", ".join(f"{format_ledger(v)} {c}" for c, v in sorted(report.credited.items())) or "nothing"
        out.print(
            f"since {_utc(report.since)}: {report.customers} customers, {report.charges} PaymentIntents, "
            f"{report.succeeded} succeeded, {report.matched} matched one to one; charged {charged}, credited {credited}"
        )
        if report.problems:
            table = Table("problem", "payment intent", "account", "detail", title="reconciliation problems")
            for p in report.problems:
                table.add_row(p.kind, p.payment_intent, p.account or "-", escape(p.detail))
            out.print(table)
            out.print(f"{len(report.problems)} problem{'' if len(report.problems) == 1 else 's'} found")
        else:
            out.print("every charge matches its credit")
    if not report.ok:
        sys.exit(1)


# --- verify -------------------------------------------------------------------------------------------------


@main.command("verify")
@pass_app
def verify(app: App) -> None:
    """Prove the ledger's invariants: balances, rating, daily totals, first usage. Exits 1 on any violation."""
    report = verify_ledger(app.database())
    for line in report.violations:
        out.print(f"VIOLATION {line}")
    if not report.ok:
        sys.exit(1)
    out.print(f"ledger OK: {report.checked_entries} usage entries checked, every invariant holds")


# --- receipts, the outbox and statements ----------------------------------------------------------------------


class _DefaultGroup(click.Group):
    """A group that runs its `list` command when the first argument is not one of its commands:
    `recharged receipts ACCOUNT` is `recharged receipts list ACCOUNT`, `recharged outbox` is `outbox list`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["list", *args]
        return super().parse_args(ctx, args)


def _sender(app: App) -> Any:
    from recharged.mail.outbox import OutboxSender

    return OutboxSender(app.database(), app.settings, app.clock)


def _send_report(report: Any) -> None:
    out.print(
        f"sent {len(report.sent)}, recovered as sent {len(report.recovered)}, to retry later "
        f"{len(report.retrying)}, failed {len(report.failed)}"
    )
    if report.error:
        err.print(f"[bold red]error:[/] {report.error}; pending messages stay queued", markup=True)


@main.group("receipts", cls=_DefaultGroup)
def receipts_group() -> None:
    """Credit receipts: `receipts ACCOUNT` lists an account's, `receipts show NUMBER` prints one."""


@receipts_group.command("list")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="JSON with amounts as decimal strings.")
@pass_app
def receipts_list(app: App, account_id: str, as_json: bool) -> None:
    """An account's receipts, oldest first, and whether each email was sent."""
    from recharged.mail.receipts import list_receipts
    from recharged.money import format_customer

    rows = list_receipts(app.database(), account_id)
    if as_json:
        listing = [
            {
                "number": r.number,
                "issued_at": r.issued_at.isoformat(),
                "kind": r.kind,
                "currency": r.currency,
                "credited": format_ledger(r.amount),
                "vat_percent": str(r.vat_percent),
                "vat": format_ledger(r.vat),
                "charged": format_ledger(r.total),
                "card": r.card,
                "payment_reference": r.payment_reference,
                "email": r.email_status,
            }
            for r in rows
        ]
        out.print_json(json.dumps(listing))
        return
    table = Table("receipt", "issued (UTC)", "kind", "credited", "VAT", "charged", "card", "reference", "email")
    for r in rows:
        table.add_row(
            r.number,
            r.issued_at.strftime("%Y-%m-%d %H:%M"),
            r.kind,
            format_customer(r.amount, r.currency),
            f"{format_customer(r.vat, r.currency)} ({r.vat_percent}%)",
            format_customer(r.total, r.currency),
            r.card,
            r.payment_reference,
            r.email_status or "-",
        )
    out.print(table if rows else f"account {account_id} has no receipts")


@receipts_group.command("show")
@click.argument("number")
@click.option("--resend", is_flag=True, help="Email a copy, marked as a copy, to the account's current address.")
@pass_app
def receipts_show(app: App, number: str, resend: bool) -> None:
    """Print a receipt as its email shows it; with --resend, send the customer a copy now."""
    from recharged.mail.receipts import get_receipt, receipt_text, resend_copy

    db = app.database()
    receipt = get_receipt(db, number)
    click.echo(receipt_text(app.settings, receipt), nl=False)
    if not resend:
        return
    outbox_id = resend_copy(db, app.clock, receipt.number)
    report = _sender(app).send_pending(ids=[outbox_id])
    if outbox_id in report.sent:
        out.print(f"a copy of receipt {receipt.number} was sent (outbox message {outbox_id})")
        return
    _send_report(report)
    _fail(f"the copy of receipt {receipt.number} is queued as outbox message {outbox_id} but was not sent", 1)


@main.group("outbox", cls=_DefaultGroup)
def outbox_group() -> None:
    """Emails to customers: `outbox` lists them (failures included), `outbox send` delivers what is pending."""


@outbox_group.command("list")
@click.option("--status", type=click.Choice(["pending", "sending", "sent", "failed"]), help="Only these.")
@click.option("--account", "account_id", help="Only this account's.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def outbox_list(app: App, status: str | None, account_id: str | None, limit: int, as_json: bool) -> None:
    """Messages newest first, with how many are waiting and how many failed for good."""
    from recharged.mail.outbox import list_messages, outbox_health

    db = app.database()
    with db.transaction() as session:
        health = outbox_health(session)
    rows = list_messages(db, status=status, account_id=account_id, limit=limit)

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    if as_json:
        listing = [
            {
                "id": m.id,
                "created_at": m.created_at.isoformat(),
                "kind": m.kind,
                "account": m.account_id,
                "to": m.to_address,
                "subject": m.subject,
                "status": m.status,
                "attempts": m.attempts,
                "last_attempt_at": when(m.last_attempt_at),
                "next_attempt_at": when(m.next_attempt_at) if m.status == "pending" else None,
                "sent_at": when(m.sent_at),
                "message_id": m.message_id,
                "error": m.last_error,
            }
            for m in rows
        ]
        out.print_json(json.dumps({"summary": health, "messages": listing}))
        return
    table = Table("id", "created (UTC)", "kind", "account", "to", "status", "tries", "last try / sent", "error")
    for m in rows:
        shown = {"failed": "[bold red]failed[/]", "pending": "[yellow]pending[/]"}.get(m.status, m.status)
        last = m.sent_at or m.last_attempt_at
        table.add_row(
            str(m.id),
            m.created_at.strftime("%Y-%m-%d %H:%M"),
            m.kind,
            m.account_id or "-",
            m.to_address,
            shown,
            str(m.attempts),
            last.strftime("%Y-%m-%d %H:%M") if last else "-",
            (m.last_error or "").replace("[", r"\["),
        )
    out.print(table if rows else "no messages")
    out.print(
        f"{health['pending']} pending, {health['sending']} being sent, {health['failed']} failed for good; "
        f"last attempt {health['last_attempt_at'] or 'never'}: {health['last_outcome'] or '-'}".replace("[", r"\[")
    )


@outbox_group.command("send")
@click.option("--retry-failed", is_flag=True, help="First put failed messages back in the queue (cause fixed).")
@pass_app
def outbox_send(app: App, retry_failed: bool) -> None:
    """Deliver every pending message now, also those waiting to be retried. Exits 1 if any failed."""
    from recharged.mail.outbox import retry_failed as requeue

    if retry_failed:
        out.print(f"{requeue(app.database(), app.clock)} failed messages queued again")
    report = _sender(app).send_pending(due_only=False)
    _send_report(report)
    if not report.ok:
        sys.exit(1)


@main.command("statement")
@click.argument("account_id")
@click.option("--month", required=True, metavar="YYYY-MM", help="The calendar month (UTC), e.g. 2026-11.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text", show_default=True)
@pass_app
def statement(app: App, account_id: str, month: str, fmt: str) -> None:
    """An account's monthly statement: as issued, or for a month not issued yet, as it stands now."""
    from recharged.mail.statements import as_csv, as_json, parse_month, statement_for
    from recharged.mail.templating import render

    content = statement_for(app.database(), app.settings, account_id, parse_month(month), app.clock.now())
    if fmt == "json":
        click.echo(json.dumps(as_json(content), indent=2, ensure_ascii=False))
    elif fmt == "csv":
        click.echo(as_csv(content), nl=False)
    else:
        click.echo(render(app.settings, "statement", content).text, nl=False)


@main.command("issue-statements")
@at_option
@pass_app
def issue_statements(app: App, at: datetime | None) -> None:
    """Issue and queue last month's statement for every account that has none yet (the daemon does this on
    the first of each month); safe to run again."""
    from recharged.mail.statements import issue_monthly_statements

    issued = issue_monthly_statements(app.database(), app.settings, app.clock, at)
    out.print(f"{issued} statements issued and queued; `recharged outbox send` delivers them")


__all__ = ["main"]


# --- demo -----------------------------------------------------------------------------------------------------


@main.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("recharged-demo"),
    show_default=True,
    help="Folder for the demo's database, emails and charts (a previous demo's output there is replaced).",
)
def demo(out_dir: Path) -> None:
    """Sixty days of six made-up customers in under a minute: usage, recharge cycles, receipts, notices and a
    balance chart per account. All local: SQLite, an in-process Stripe-compatible server, .eml files, no keys.
    It always runs on the built-in defaults (config.toml and RECHARGED_* settings do not apply)."""
    from recharged.config import LoggingSettings
    from recharged.demo import simulation
    from recharged.money import format_customer

    configure(LoggingSettings(level="warning"))
    columns = (TextColumn("simulating"), BarColumn(), TextColumn("day {task.completed}/{task.total}"))
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("days", total=simulation.DAYS)
        result = simulation.run(out_dir, progress=lambda done, _total: bar.update(task, completed=done))

    def money(units: int) -> str:
        return format_customer(units, result.currency)

    out.print(
        f"recharged demo: the {simulation.DAYS} days before today, {result.start:%Y-%m-%d} 00:00 to "
        f"{result.end:%Y-%m-%d} 00:00 UTC; {len(result.accounts)} accounts, {result.usage_events:,} usage events, "
        f"{result.cycles} recharge cycles (one every 4 simulated hours); ran in {result.seconds:.1f} s"
    )
    table = Table("account", "habit", "charges", "declines", "receipts", "notices", "balance start -> end",
                  "reserve (days)", "state", title="what happened")  # fmt: skip
    rows = result.accounts
    for a in rows:
        reserve = f"{a.reserve_days[0]} - {a.reserve_days[1]}" if a.reserve_days else "-"
        charges = f"{a.charges} ({money(a.charged)})"
        balance = f"{money(a.balance_start)} -> {money(a.balance_end)}"
        table.add_row(a.account_id, a.habit, charges, str(a.declines), str(a.receipts), str(a.notices), balance,
                      reserve, a.state)  # fmt: skip
    table.add_row(
        "total",
        "",
        f"{sum(a.charges for a in rows)} ({money(sum(a.charged for a in rows))})",
        str(sum(a.declines for a in rows)),
        str(sum(a.receipts for a in rows)),
        str(sum(a.notices for a in rows)),
        f"{money(sum(a.balance_start for a in rows))} -> {money(sum(a.balance_end for a in rows))}",
    )
    out.print(table)
    lines = [f"  {a.account_id}: {a.story}" for a in rows]
    lines.append(
        "reserve: the balance in days of the account's average daily usage, lowest before a cycle and highest after "
        "one. Below 7 days (the threshold) recharged adds 14 days' worth, so it bounces between about one and three "
        "weeks. The dialer stops an account's calls while its balance is zero or less."
    )
    lines += [
        f"database  {result.database}",
        f"emails    {result.emails}/ ({result.emails_written} .eml files: receipts and notices)",
        f"charts    {result.charts}/ (one PNG per account: balance, threshold and recharges)",
        f"summary   {result.out / 'summary.json'}",
        f"look around: recharged --config {result.config} receipts steady",
    ]
    for line in lines:
        out.print(line, markup=False)
    for line in result.verify.violations:
        err.print(f"VIOLATION {line}", markup=False)
    if not result.verify.ok:
        _fail(f"verify found {len(result.verify.violations)} violations in the demo's database", 1)
    out.print(f"verify: ledger OK, {result.verify.checked_entries:,} usage entries checked, every invariant holds")
