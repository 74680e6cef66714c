"""Events out to the CRM: the deliveries to its webhook endpoints, listed, sent now, and replayed."""

from __future__ import annotations

import json
import sys

import click
from rich.markup import escape
from rich.table import Table

from recharged.cli.app import App, main, out, pass_app
from recharged.cli.render import utc
from recharged.mail.webhook_deliveries import list_deliveries, replay, route_events
from recharged.mail.webhook_sender import WebhookSender, configured_endpoints
from recharged.states import WebhookStatus
from recharged.words import plural


@main.group("webhooks")
def webhooks_group() -> None:
    """Signed events to the CRM's webhook endpoints: `list` the deliveries, `send` what is due now, `replay ID`
    an event again (the daemon sends on its own)."""


@webhooks_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in WebhookStatus]), help="Only deliveries in this state.")
@click.option("--account", "account_id", help="Only events about this account.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@pass_app
def webhooks_list(app: App, status: str | None, account_id: str | None, limit: int, as_json: bool) -> None:
    """Deliveries newest first: each event to each endpoint, its attempts, and the endpoint's last answer."""
    db = app.database()
    route_events(db, app.settings.webhooks.endpoints, app.clock.now())  # events written since the last send, too
    found = list_deliveries(db, status=status, account_id=account_id, limit=limit)
    if as_json:
        out.print_json(json.dumps([d.as_json() for d in found]))
        return
    if not found:
        out.print("no webhook deliveries")
        return
    table = Table("event", "type", "account", "created", "endpoint", "status", "tries", "last answer / next try")
    for d in found:
        answer = d.last_error or (f"HTTP {d.last_status_code}" if d.last_status_code else "-")
        if d.status == WebhookStatus.PENDING and d.attempts:
            answer += f"; next {utc(d.next_attempt_at)}"
        shown = {"failed": "[bold red]failed[/]", "pending": "[yellow]pending[/]"}.get(d.status, d.status)
        table.add_row(
            d.event_id, d.type, d.account_id, utc(d.created_at), d.endpoint, shown, str(d.attempts), escape(answer)
        )
    out.print(table)


@webhooks_group.command("send")
@pass_app
def webhooks_send(app: App) -> None:
    """Deliver what is due now, once, as the daemon does: new events, and retries whose time has come. Each
    endpoint is sent to in parallel. Exits 1 when a delivery failed or is to be retried."""
    endpoints = configured_endpoints(app.settings)
    report = WebhookSender(app.database(), app.settings, app.clock, endpoints).send_due()
    if not endpoints:
        out.print("no webhook endpoints configured ([[webhooks.endpoints]] in config.toml); nothing was sent")
        return
    for run in report.runs:
        line = (
            f"{run.endpoint}: delivered {len(run.delivered)}, to retry later {len(run.retrying)}, "
            f"failed {len(run.failed)}"
        )
        if run.error:
            line += f"; stopped: {run.error} (the rest of its queue waits for the next run)"
        out.print(escape(line))
    if not report.ok:
        sys.exit(1)


@webhooks_group.command("replay")
@click.argument("event_id", metavar="ID")
@pass_app
def webhooks_replay(app: App, event_id: str) -> None:
    """Queue event ID again, with the same id and body, to every configured endpoint that takes its type, with a
    fresh retry schedule (after the CRM fixed its endpoint, or lost what it received). `webhooks send` or the
    daemon delivers it. An unknown ID exits 3."""
    queued = replay(app.database(), event_id, configured_endpoints(app.settings), app.clock.now())
    out.print(escape(f"event {event_id} queued again to {plural(len(queued), 'endpoint')}: {', '.join(queued)}"))
