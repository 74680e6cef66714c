"""Accounts: create, import, update, show and history; auto-recharge settings; the audit trail."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from recharged import accounts as accounts_service
from recharged.cli.app import App, actor_option, at_option, err, main, out, pass_app
from recharged.cli.render import plan_json, plan_table
from recharged.errors import InputError
from recharged.money import format_ledger

if TYPE_CHECKING:
    from recharged.history import AccountHistory


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
    new = accounts_service.read_csv(file, app.settings, now, created_at=created_at)
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
@click.option(
    "--enable/--disable",
    default=None,
    help="Turn automatic recharge on (the customer opted in) or off; --enable also lifts a suspension or the pause "
    "after a disputed payment.",
)
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
    view = accounts_service.account_view(app.database(), app.settings, account_id, when)
    settings = view.settings
    if as_json:
        out.print_json(json.dumps({"account": account_id, "settings": settings, **plan_json(view.plan)}))
        return
    table = Table(title=f"account {account_id}", show_header=False)
    for key, value in settings.items():
        table.add_row(key, "(config)" if value is None else str(value))
    out.print(table)
    plan_table([view.plan], when)


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
    # lazy: the history and its charts serve this command alone; imported at the top they slowed every command
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


def _history_table(history: AccountHistory) -> None:
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
