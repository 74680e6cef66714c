"""Mail to customers: receipts, the outbox and monthly statements."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click
from rich.markup import escape
from rich.table import Table

from recharged import accounts as accounts_service
from recharged.cli.app import App, actor_option, at_option, err, fail, main, out, pass_app
from recharged.errors import InputError
from recharged.mail import statements
from recharged.mail.admin import cancel_message
from recharged.mail.outbox import OutboxSender, SendReport, list_messages, outbox_health
from recharged.mail.outbox import retry_failed as requeue
from recharged.mail.receipts import get_receipt, list_receipts, receipt_text, resend_copy
from recharged.mail.templating import render
from recharged.money import format_customer, format_ledger
from recharged.states import OutboxStatus
from recharged.words import plural


class _DefaultGroup(click.Group):
    """A group that runs its `list` command when the first argument is not one of its commands:
    `recharged receipts ACCOUNT` is `recharged receipts list ACCOUNT`, `recharged outbox` is `outbox list`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["list", *args]
        return super().parse_args(ctx, args)


def _sender(app: App) -> OutboxSender:
    return OutboxSender(app.database(), app.settings, app.clock)


def _send_report(report: SendReport) -> None:
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
    fail(f"the copy of receipt {receipt.number} is queued as outbox message {outbox_id} but was not sent", 1)


@main.group("outbox", cls=_DefaultGroup)
def outbox_group() -> None:
    """Emails to customers: `outbox` lists them (failures included), `outbox send` delivers what is pending,
    `outbox cancel ID` stops one not sent yet."""


@outbox_group.command("list")
@click.option("--status", type=click.Choice([str(s) for s in OutboxStatus]), help="Only these.")
@click.option("--account", "account_id", help="Only this account's.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def outbox_list(app: App, status: str | None, account_id: str | None, limit: int, as_json: bool) -> None:
    """Messages newest first, with how many are waiting and how many failed for good."""
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
    if retry_failed:
        out.print(f"{requeue(app.database(), app.clock)} failed messages queued again")
    report = _sender(app).send_pending(due_only=False)
    _send_report(report)
    if not report.ok:
        sys.exit(1)


@outbox_group.command("cancel")
@click.argument("message_id", metavar="ID", type=int)
@click.option("--reason", required=True, help="Why it must not be sent (kept with it and in the audit log).")
@actor_option
@pass_app
def outbox_cancel(app: App, message_id: int, reason: str, actor: str) -> None:
    """Cancel a message not sent yet (pending, or failed): it is never sent. Signed and audited. A message sent, or
    being sent, cannot be cancelled (exit 4)."""
    actor = accounts_service.parse_actor(actor)
    message, cancelled = cancel_message(app.database(), app.clock, message_id, reason=reason, actor=actor)
    what = escape(f"outbox message {message.id} ({message.kind} to {message.to_address})")
    if cancelled:
        out.print(f"{what} cancelled; it will not be sent")
    else:
        out.print(f"{what} was already cancelled ({escape(message.last_error or '')}); nothing changed")


@main.command("statement")
@click.argument("account_id")
@click.option("--month", required=True, metavar="YYYY-MM", help="The calendar month (UTC), e.g. 2026-11.")
@click.option("--json", "as_json", is_flag=True, help="JSON, amounts as decimal strings (as every --json).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV, one line per movement.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), help="The same: text, json or csv.")
@pass_app
def statement(app: App, account_id: str, month: str, as_json: bool, as_csv: bool, fmt: str | None) -> None:
    """An account's monthly statement: as issued, or for a month not issued yet, as it stands now."""
    chosen = {f for f, given in (("json", as_json), ("csv", as_csv), (fmt, fmt is not None)) if given}
    if len(chosen) > 1:
        raise InputError(f"give one output format, not {' and '.join(sorted(str(c) for c in chosen))}")
    fmt = chosen.pop() if chosen else "text"
    content = statements.statement_for(
        app.database(), app.settings, account_id, statements.parse_month(month), app.clock.now()
    )
    if fmt == "json":
        click.echo(json.dumps(statements.as_json(content), indent=2, ensure_ascii=False))
    elif fmt == "csv":
        click.echo(statements.as_csv(content), nl=False)
    else:
        click.echo(render(app.settings, "statement", content).text, nl=False)


@main.command("issue-statements")
@at_option
@pass_app
def issue_statements(app: App, at: datetime | None) -> None:
    """Issue and queue last month's statement for every account that has none yet (the daemon does this on
    the first of each month); safe to run again."""
    issued = statements.issue_monthly_statements(app.database(), app.settings, app.clock, at)
    out.print(f"{plural(issued, 'statement')} issued and queued; `recharged outbox send` delivers them")
