"""Call authorizations: the money held for calls in progress (the dialer asks for them over the HTTP API)."""

from __future__ import annotations

import json

import click
from rich.table import Table

from recharged.authorizations import list_open
from recharged.cli.app import App, main, out, pass_app


@main.group("authorizations")
def authorizations_group() -> None:
    """Calls authorized and the money held for them until their usage arrives (POST /v1/authorizations)."""


@authorizations_group.command("list")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@pass_app
def authorizations_list(app: App, account_id: str, as_json: bool) -> None:
    """The account's open authorizations, oldest first: each call, how long it may last, what is held for it."""
    found = list_open(app.database(), account_id)
    if as_json:
        out.print_json(json.dumps(found))
        return
    if not found:
        out.print(f"account {account_id} holds no money for calls")
        return
    table = Table("id", "call", "kind", "authorized", "held", "since", "expires")
    for a in found:
        table.add_row(
            str(a["id"]),
            a["call_id"],
            a["kind"],
            f"{a['authorized_seconds']} s",
            f"{a['reserved_amount']} {a['currency']}",
            a["created_at"],
            a["expires_at"],
        )
    out.print(table)
