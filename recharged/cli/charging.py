"""Charging: what the next cycle would charge, top-ups, manual adjustments, recharge cycles, recovery and
reconciliation with the processor."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import date, datetime, timedelta

import click
from rich.markup import escape
from rich.table import Table

from recharged import accounts as accounts_service
from recharged.balance import AccountPlan
from recharged.cli.app import App, actor_option, at_option, err, main, out, parse_at, pass_app
from recharged.cli.render import plan_table, stream_plan_json, utc
from recharged.clock import midnight, parse_instant
from recharged.errors import InputError
from recharged.mail.notices import notify_from_plans
from recharged.money import format_amount, format_customer, format_ledger, parse_amount
from recharged.planning import plan_accounts
from recharged.recharge import RechargeReport
from recharged.reconcile import reconcile
from recharged.words import plural


@main.command("plan")
@at_option
@click.option("--json", "as_json", is_flag=True, help="JSON with amounts as decimal strings.")
@click.option("--charges-only", is_flag=True, help="Only the accounts the cycle would charge.")
@pass_app
def plan(app: App, at: datetime | None, as_json: bool, charges_only: bool) -> None:
    """What the next recharge cycle would charge, for every account, and why."""
    when = at or app.clock.now()
    plans: Iterator[AccountPlan] = plan_accounts(app.database(), app.settings, when, as_of=at is not None)
    if charges_only:
        plans = (p for p in plans if p.decision.action == "charge")
    if as_json:
        stream_plan_json(plans, when, sys.stdout.write)
        return
    plan_table(list(plans), when)


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
    if report.receipt is not None and report.balance_after is not None:
        balance = format_customer(report.balance_after, report.currency)
        out.print(f"account {account_id}: receipt {report.receipt}; the balance is now {balance}", markup=False)


@main.command("adjust")
@click.argument("account_id")
@click.option("--credit", help="Add this amount to the balance.")
@click.option("--debit", help="Take this amount from the balance.")
@click.option("--reason", required=True, help="Why, in words the next admin will understand.")
@click.option(
    "--reference",
    help="Your own id for this adjustment, unique per account: recording it again changes nothing; another amount "
    "or direction under it is refused.",
)
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
@click.option("--once", is_flag=True, hidden=True, help="Accepted for compatibility: `cycle` always runs one cycle.")
@click.option(
    "--at",
    "at",
    metavar="ISO",
    callback=parse_at,
    help="Take the usage window as of this instant (default: now); balances and caps are today's, since charges "
    "are real: every processor call, attempt, lease, receipt and notice is recorded at the real time, never at "
    "ISO. `recharged plan --at` shows the plan as the ledger stood at an instant, and charges nothing.",
)
@pass_app
def cycle(app: App, once: bool, at: datetime | None) -> None:
    """Run one recharge cycle now: recover unfinished recharges, decide, charge, credit; print what it did. Exits 1
    when any due account was not charged (declined, failed, an error, or charging stopped), so a cron job notices;
    the daemon (`recharged run`) runs cycles on its own schedule."""
    del once
    db = app.database()
    report = app.recharges().run_recorded_cycle(
        at,
        concurrency=app.settings.daemon.charge_concurrency,
        plans_seen=lambda plans: notify_from_plans(db, app.clock.now(), plans),
    )
    out.print(f"recharge cycle at {report.at.isoformat()}")
    if report.recovered:
        _print_reports(report.recovered, "recovered")
    done = sorted(report.charged, key=lambda r: r.account_id)
    charged = [r for r in done if r.phase == "finished"]
    failed = [r for r in done if r.phase == "failed"]
    waiting = [r for r in done if r.phase not in ("finished", "failed")]
    for reports, title in ((charged, "charged"), (failed, "not charged"), (waiting, "waiting on the processor")):
        if reports:
            _print_reports(reports, title)
    for account_id, problem in sorted(report.errors.items()):
        err.print(f"account {account_id}: not charged: {problem}", markup=False)
    for account_id in report.not_claimed:
        out.print(f"account {account_id}: skipped, no longer due (another worker charged it, or it changed)")
    if waiting or any(r.phase not in ("finished", "failed") for r in report.recovered):
        out.print("some recharges wait on the processor; the next cycle (or `recharged recover`) finishes them")
    if report.halted:
        err.print(f"charging stopped: {report.halted}", markup=False)
    out.print(
        f"{plural(report.accounts, 'account')} planned: {len(charged)} charged, {len(failed)} not charged, "
        f"{len(waiting)} waiting, {plural(len(report.errors), 'error')}"
    )
    if failed or waiting or report.errors or report.halted or any(r.integration_error for r in report.charged):
        sys.exit(1)


@main.command("recover")
@click.option(
    "--recharge",
    "recharge_id",
    type=click.IntRange(1),
    help="Credit this failed recharge whose abandoned attempt has a payment at the processor (`reconcile` names it).",
)
@pass_app
def recover(app: App, recharge_id: int | None) -> None:
    """Finish every recharge left half-way (after a crash, a timeout or a lost connection), charging nothing twice."""
    if recharge_id is not None:
        report = app.recharges().reclaim(recharge_id)
        _print_reports([report], "reclaimed")
        if report.phase != "finished":
            err.print(f"recharge {recharge_id}: no payment at the processor under its attempts; nothing credited")
            sys.exit(1)
        return
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


def parse_since(value: str) -> datetime:
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
    """Match the processor's PaymentIntents for our customers one to one with the ledger's credits (and
    adjustments that name them) and our recharges, and their refunds and disputes with the ledger's reversals;
    report succeeded charges without a credit (or that `recharged recover` will still credit), credits without a
    succeeded charge, charges credited twice, amounts or currencies that differ, charges whose metadata names
    another account than the one credited, refunds and disputes without their reversal and the reverse, and
    customers whose payments cannot be listed.

    \b
    Exit status: 0 when everything matches, 1 when a problem is found (each is listed), 78 when the Stripe key
    or the configuration is missing or invalid.
    """
    start = parse_since(since) if since is not None else app.clock.now() - timedelta(days=30)
    gateway = app.gateway()  # fail before reading anything when the key is missing
    report = reconcile(app.database(), gateway, start)
    if as_json:
        out.print_json(json.dumps(report.as_json()))
    else:

        def amounts(values: dict[str, int]) -> str:
            return ", ".join(format_amount(v, c) for c, v in sorted(values.items())) or "nothing"

        out.print(
            f"since {utc(report.since)}: {plural(report.customers, 'customer')}, "
            f"{plural(report.charges, 'PaymentIntent')}, {report.succeeded} succeeded, {report.matched} matched one "
            f"to one; charged {amounts(report.charged)}, credited {amounts(report.credited)}",
            markup=False,
        )
        if report.charged:
            vat = "charged = credited + VAT: the cards paid the VAT, the balances were credited without it"
            out.print(vat + ("; the problems below account for any other difference" if report.problems else ""))
        if report.refunded or report.disputed or report.reversed:
            out.print(
                f"given back: refunded {amounts(report.refunded)}, disputed {amounts(report.disputed)}; "
                f"taken off balances {amounts(report.reversed)}"
            )
        if report.problems:
            table = Table("problem", "payment intent", "account", "detail", title="reconciliation problems")
            for p in report.problems:
                table.add_row(p.kind, p.payment_intent or "-", p.account or "-", escape(p.detail))
            out.print(table)
            out.print(f"{plural(len(report.problems), 'problem')} found")
        else:
            out.print("every charge matches its credit")
    if not report.ok:
        sys.exit(1)
