"""Funding sources: the cards on file an account is charged from."""

from __future__ import annotations

import json

import click
from rich.table import Table

from recharged import accounts as accounts_service
from recharged import funding as sources_service
from recharged.cli.app import App, actor_option, main, out, pass_app
from recharged.payments import card_label


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
    source = sources_service.add_source(
        db,
        account_id,
        card,
        actor=actor,
        clock=app.clock,
        make_default=make_default,
        notice_delay=app.settings.outbox.admin_notice_delay,
    )
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
    sources_service.make_default(
        app.database(),
        account_id,
        source_id,
        actor=actor,
        clock=app.clock,
        notice_delay=app.settings.outbox.admin_notice_delay,
    )
    out.print(f"account {account_id}: funding source {source_id} is the default")


@sources_group.command("remove")
@click.argument("account_id")
@click.argument("source_id", type=int)
@actor_option
@pass_app
def sources_remove(app: App, account_id: str, source_id: int, actor: str) -> None:
    """Remove a card (the first backup becomes the default if it was)."""
    promoted = sources_service.remove_source(
        app.database(),
        account_id,
        source_id,
        actor=actor,
        clock=app.clock,
        notice_delay=app.settings.outbox.admin_notice_delay,
    )
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
    sources_service.reactivate_source(
        app.database(),
        account_id,
        source_id,
        actor=actor,
        clock=app.clock,
        notice_delay=app.settings.outbox.admin_notice_delay,
    )
    out.print(f"account {account_id}: funding source {source_id} can be charged again")
