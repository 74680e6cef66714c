"""Accounts: create, import, update, show and history; list, search, export, close and reopen; auto-recharge
settings; the audit trail."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from recharged import accounts as accounts_service
from recharged.cli.app import App, actor_option, at_option, err, main, out, pass_app
from recharged.cli.render import plan_json, plan_table
from recharged.credentials import read_secret
from recharged.errors import InputError
from recharged.funding import list_sources
from recharged.money import format_amount, format_customer, format_ledger
from recharged.words import plural

if TYPE_CHECKING:
    from recharged.history import AccountHistory


@main.group("accounts")
def accounts_group() -> None:
    """Create, import, change, show, list, search, export, close and reopen accounts."""


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
    for a card already on file at Stripe: stripe_customer,payment_method,card_brand,card_last4,card_exp (MM/YYYY),
    each checked with Stripe when a key is configured. Every bad row and every conflict with an existing account
    is listed at once. Re-importing the same file changes nothing.
    """
    accounts_service.parse_actor(actor)
    keyed = read_secret("stripe_api_key") is not None
    result = accounts_service.import_accounts(
        app.database(),
        app.settings,
        file,
        actor=actor,
        clock=app.clock,
        created_at=created_at,
        gateway=app.gateway if keyed else None,
    )
    out.print(
        f"{file}: {plural(len(result.created), 'account')} created, {len(result.unchanged)} already present and "
        "unchanged"
    )
    if result.unchecked_cards:
        where = ", ".join(result.unchecked_cards[:10]) + (", ..." if len(result.unchecked_cards) > 10 else "")
        err.print(
            f"{plural(len(result.unchecked_cards), 'card')} {'was' if len(result.unchecked_cards) == 1 else 'were'} "
            f"not checked with the processor (no Stripe API key is configured): {where}. A card the processor does "
            "not hold is set aside at its first charge as our error, never as the customer's decline",
            markup=False,
        )


@accounts_group.command("update")
@click.argument("account_id")
@click.option("--email")
@click.option("--plan")
@click.option("--vat-percent")
@click.option("--overdraft", help="How far below zero calls may be authorized (an amount; 0: not at all).")
@actor_option
@pass_app
def accounts_update(
    app: App,
    account_id: str,
    email: str | None,
    plan: str | None,
    vat_percent: str | None,
    overdraft: str | None,
    actor: str,
) -> None:
    """Change an account's email, plan, VAT rate or overdraft (signed and audited)."""
    if email is None and plan is None and vat_percent is None and overdraft is None:
        raise InputError("nothing to change: give --email, --plan, --vat-percent or --overdraft")
    before, after = accounts_service.change_account(
        app.database(),
        account_id,
        actor=actor,
        clock=app.clock,
        settings=app.settings,
        email=email,
        plan=plan,
        vat_percent=vat_percent,
        overdraft=overdraft,
    )
    _print_change(account_id, before, after)


def _print_change(
    account_id: str, before: dict[str, Any], after: dict[str, Any], inherited: dict[str, Any] | None = None
) -> None:
    """Each changed setting, old -> new; a setting taken from the plan reads "default (VALUE)", a flag yes or no."""

    def shown(key: str, value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if value is None and inherited is not None and key in inherited:
            return f"default ({inherited[key]})"
        return "-" if value is None else str(value)

    changed = [k for k in after if after[k] != before[k]]
    if not changed:
        out.print(f"account {account_id}: nothing changed")
    for key in changed:
        out.print(f"account {account_id}: {key} {shown(key, before[key])} -> {shown(key, after[key])}")


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
    plan = app.settings.policy_of(str(after["plan"]))
    inherited = {
        name: getattr(plan, name)
        if name in accounts_service.OVERRIDE_DAYS
        else format_ledger(getattr(plan, name))
        if getattr(plan, name) is not None
        else "off"
        for name in accounts_service.OVERRIDES
    }
    _print_change(account_id, before, after, inherited)
    if enable and not any(card["unusable"] is None for card in list_sources(app.database(), account_id)):
        err.print(
            f"{account_id} has no usable card: nothing will be charged until a card is added with "
            "`recharged sources add`",
            markup=False,
        )


@accounts_group.command("show")
@click.argument("account_id")
@at_option
@click.option("--json", "as_json", is_flag=True)
@pass_app
def accounts_show(app: App, account_id: str, at: datetime | None, as_json: bool) -> None:
    """One account: its settings, balance and the decision the next cycle would take."""
    when = at or app.clock.now()
    view = accounts_service.account_view(app.database(), app.settings, account_id, when, as_of=at is not None)
    settings = view.settings
    cards = list_sources(app.database(), account_id)
    if as_json:
        shown = {"account": account_id, "settings": settings, "cards": cards, **plan_json(view.plan)}
        out.print_json(json.dumps(shown))
        return
    table = Table(title=f"account {account_id}", show_header=False)
    held = 0 if at is not None else view.account.reserved  # the decision counts money held for calls as spent
    table.add_row("balance", format_customer(view.plan.decision.balance + held, view.plan.currency))
    if held:
        table.add_row("held for calls", format_customer(held, view.plan.currency))
    policy, currency = view.plan.policy, view.plan.currency
    for key, value in settings.items():
        if value is None and key in accounts_service.OVERRIDES:  # taken from the plan: show what it is
            inherited = getattr(policy, key)
            if key in accounts_service.OVERRIDE_AMOUNTS:
                inherited = "off" if inherited is None else format_amount(inherited, currency)
            table.add_row(key, f"{inherited} (config)")
        elif isinstance(value, bool):
            table.add_row(key, "yes" if value else "no")
        else:
            table.add_row(key, "-" if value is None else str(value))
    for card in cards:
        marks = [
            m for m, on in (("default", card["default"]), (f"unusable: {card['unusable']}", card["unusable"])) if on
        ]
        table.add_row("card", f"{card['card']}" + (f" ({', '.join(marks)})" if marks else ""))
    if not cards:
        table.add_row("card", "none: `recharged sources add` adds one")
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


# --- the life cycle -------------------------------------------------------------------------------------------

PAGE = 1_000  # rows per table: a long listing is printed as it streams in, never held whole


def _summary_json(a: accounts_service.AccountSummary) -> dict[str, Any]:
    return {
        "id": a.id,
        "email": a.email,
        "plan": a.plan,
        "currency": a.currency,
        "balance": format_ledger(a.balance),
        "auto_recharge": a.auto_recharge,
        "recharge_state": str(a.recharge_state),
        "status": a.status,
        "closed_at": a.closed_at.isoformat() if a.closed_at else None,
        "closed_reason": a.closed_reason,
    }


def _accounts_table() -> Table:
    table = Table()
    for column in ("account", "email", "plan", "cur", "balance", "auto-recharge", "status"):
        table.add_column(column, justify="right" if column == "balance" else "left")
    return table


def _print_accounts(found: Iterator[accounts_service.AccountSummary], as_json: bool, nothing: str) -> None:
    """Accounts as they stream in: a JSON array, or tables of PAGE rows and a count."""
    if as_json:
        sys.stdout.write("[")
        for i, a in enumerate(found):
            sys.stdout.write(("," if i else "") + "\n  " + json.dumps(_summary_json(a)))
        sys.stdout.write("\n]\n")
        return
    count = closed = 0
    table: Table | None = None
    for a in found:
        table = table or _accounts_table()
        state = "" if a.recharge_state == "ok" else f" ({a.recharge_state})"
        status = "open" if a.closed_at is None else f"closed {a.closed_at:%Y-%m-%d}: {a.closed_reason}"
        table.add_row(
            escape(a.id),
            escape(a.email),
            escape(a.plan),
            a.currency,
            format_ledger(a.balance),
            ("on" if a.auto_recharge else "off") + state,
            escape(status),
        )
        count, closed = count + 1, closed + (a.closed_at is not None)
        if table.row_count == PAGE:
            out.print(table)
            table = None
    if table is not None:
        out.print(table)
    out.print(f"{plural(count, 'account')} ({closed} closed)" if count else nothing)


@accounts_group.command("list")
@click.option(
    "--status", type=click.Choice(accounts_service.STATUSES), default="all", show_default=True, help="Which accounts."
)
@click.option("--plan", help="Only the accounts on this plan.")
@click.option("--currency", help="Only the accounts in this currency.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, amounts as decimal strings.")
@pass_app
def accounts_list(app: App, status: str, plan: str | None, currency: str | None, as_json: bool) -> None:
    """Every account in id order: email, plan, currency, balance, automatic recharge and its state, and whether it
    is open or closed."""
    found = accounts_service.list_accounts(app.database(), status=status, plan=plan, currency=currency)
    _print_accounts(found, as_json, "no accounts match")


@accounts_group.command("search")
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, amounts as decimal strings.")
@pass_app
def accounts_search(app: App, text: str, as_json: bool) -> None:
    """The accounts whose id or email contains TEXT, in any case (% and _ match only themselves)."""
    found = accounts_service.search_accounts(app.database(), text)
    _print_accounts(found, as_json, f"no account's id or email contains {escape(repr(text.strip()))}")


@accounts_group.command("export")
@click.option(
    "--out",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the CSV into FILE, which must not exist yet (default: standard output).",
)
@pass_app
def accounts_export(app: App, path: Path | None) -> None:
    """Every account as the CSV `accounts import` reads, in id order: importing it into an empty database makes the
    same accounts, and importing it again here changes nothing. It holds the opening balance brought over (not
    the balance since), the default card on file, and not whether an account is closed."""
    db = app.database()
    if path is None:
        count = accounts_service.export_csv(db, sys.stdout)
        err.print(f"{plural(count, 'account')} exported")
        return
    if path.exists():
        raise InputError(f"--out {path} exists already; nothing was written (remove it, or name another file)")
    if not path.parent.is_dir():
        raise InputError(f"--out {path}: there is no folder {path.parent}")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("x", newline="", encoding="utf-8") as handle:
            count = accounts_service.export_csv(db, handle)
        partial.replace(path)  # whole or not at all
    finally:
        partial.unlink(missing_ok=True)
    out.print(f"{plural(count, 'account')} exported to {escape(str(path))}")


@accounts_group.command("close")
@click.argument("account_id")
@click.option("--reason", required=True, help="Why the account is closed (kept with it and in the audit log).")
@actor_option
@pass_app
def accounts_close(app: App, account_id: str, reason: str, actor: str) -> None:
    """Close an account (signed and audited): it is never charged again, gets no notices and no statement after
    this month's, and usage that starts from now on is refused. Its balance is kept, not refunded. Refused while
    a recharge of it is open."""
    closed = accounts_service.close_account(app.database(), account_id, reason=reason, actor=actor, clock=app.clock)
    out.print(f"account {escape(account_id)} closed at {closed.at.isoformat()}: {escape(closed.reason or '')}")
    out.print(
        f"its balance of {format_amount(closed.balance, closed.currency)} is kept: recharged does not refund it "
        "(record a refund made elsewhere with `recharged adjust --debit`); automatic recharge is off"
    )


@accounts_group.command("reopen")
@click.argument("account_id")
@actor_option
@pass_app
def accounts_reopen(app: App, account_id: str, actor: str) -> None:
    """Reopen a closed account (signed and audited): it is charged, billed, told and sent statements again.
    Automatic recharge stays off until you turn it on."""
    reopened = accounts_service.reopen_account(app.database(), account_id, actor=actor, clock=app.clock)
    out.print(
        f"account {escape(account_id)} reopened, with a balance of "
        f"{format_amount(reopened.balance, reopened.currency)}; automatic recharge stays off until you turn it on "
        f"(`recharged auto-recharge {escape(account_id)} --enable`)"
    )
