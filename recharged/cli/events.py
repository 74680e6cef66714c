"""Processor events: the inbox of Stripe webhooks, listed, and handled without the daemon."""

from __future__ import annotations

import json
import sys
from collections import Counter

import click
from rich.markup import escape
from rich.table import Table

from recharged import events as events_service
from recharged.cli.app import App, main, out, pass_app
from recharged.cli.charging import parse_since
from recharged.cli.render import utc
from recharged.events import EventService
from recharged.states import EventStatus
from recharged.words import plural


@main.group("events")
def events_group() -> None:
    """The inbox of processor (Stripe) events: refunds, disputes, card changes and payments, stored when their
    webhook arrives and handled once, off the request path (the daemon does it on its own)."""


@events_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in EventStatus]), help="Only events in this state.")
@click.option("--failing", is_flag=True, help="Only pending events whose last attempt failed.")
@click.option("--account", "account_id", help="Only events about this account.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@pass_app
def events_list(app: App, status: str | None, failing: bool, account_id: str | None, limit: int, as_json: bool) -> None:
    """Events newest first, with how each was handled, or why it failed and when it is tried again."""
    db = app.database()
    if failing:
        found = events_service.failing(db)[:limit]
    else:
        found = events_service.events(db, EventStatus(status) if status else None, account_id, limit)
    if as_json:
        out.print_json(json.dumps([e.as_json() for e in found]))
        return
    if not found:
        out.print("no events")
        return
    table = Table("received", "event", "type", "object", "status", "account", "outcome", title="processor events")
    for e in found:
        if e.status == EventStatus.PENDING:
            outcome = (
                f"attempt {e.attempts} failed: {e.last_error}; next {utc(e.next_attempt_at)}" if e.last_error else "-"
            )
        else:
            outcome = e.outcome or "-"
        table.add_row(
            utc(e.received_at), e.id, e.type, e.object_id or "-", e.status, e.account_id or "-", escape(outcome)
        )
    out.print(table)


@events_group.command("process")
@click.argument("event_ids", nargs=-1, metavar="[EVENT_ID]...")
@pass_app
def events_process(app: App, event_ids: tuple[str, ...]) -> None:
    """Handle the pending events that are due now (or the named ones, even before their retry time), as the
    daemon does: for set-ups without the daemon, or to retry at once after fixing what made an event fail.

    \b
    Exit status: 0 when every event tried was handled, 1 when one failed (it stays pending and is listed)."""
    service = EventService(app.database(), app.recharges(), app.clock)
    if event_ids:
        processed = [service.process(event_id) for event_id in event_ids]
    else:
        processed = service.process_pending().processed
    if not processed:
        out.print("no event to handle")
        return
    table = Table("event", "outcome", "what happened", title="events handled")
    for p in processed:
        table.add_row(p.event_id, p.outcome, escape(p.text))
    out.print(table)
    if any(p.outcome == "failed" for p in processed):
        sys.exit(1)


@events_group.command("fetch")
@click.option("--since", metavar="DATE", required=True, help="Events created from this UTC day (or ISO instant) on.")
@pass_app
def events_fetch(app: App, since: str) -> None:
    """Ask Stripe for its events since DATE and keep those the inbox does not have: after a restore from a backup,
    the events answered after the backup are not in the restored inbox and Stripe never sends them again (it
    keeps events for 30 days). `recharged events process` (or the daemon) then handles them."""
    start = parse_since(since)
    service = EventService(app.database(), app.recharges(), app.clock)
    counts = Counter(s.outcome for s in service.fetch(start))
    out.print(
        f"since {utc(start)}: {plural(counts['stored'], 'new event')} stored, {counts['ignored']} of types "
        f"recharged does not act on, {counts['duplicate']} already in the inbox"
    )
    if counts["stored"]:
        out.print("`recharged events process` handles them (the daemon does on its own)")
