"""Rendering shared by several commands: the recharge plan as a table or JSON, and instants in UTC."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from rich.table import Table

from recharged.balance import AccountPlan
from recharged.cli.app import out
from recharged.money import format_ledger
from recharged.words import plural


def utc(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def plan_json(p: AccountPlan) -> dict[str, Any]:
    """One account's plan as JSON values, amounts as decimal strings (`plan --json`, `accounts show --json`)."""
    d = p.decision
    return {
        "account": p.account_id,
        "currency": p.currency,
        "balance": format_ledger(d.balance),
        "window": {"start": p.window.start.isoformat(), "end": p.window.end.isoformat(), "days": str(d.history_days)},
        "average_daily_usage": format_ledger(d.average_daily),
        "threshold": format_ledger(d.threshold),
        "recharge_amount": format_ledger(d.recharge_amount),
        "runway_days": None if d.runway_days is None else str(d.runway_days),
        "auto_recharge": p.auto_recharge,
        "decision": d.action,
        "reason": d.reason,
        "charge_amount": format_ledger(d.charge_amount),
        "limited_by": d.limited_by,
        "next_try_at": None if d.next_try_at is None else d.next_try_at.isoformat(),
    }


def stream_plan_json(plans: Iterable[AccountPlan], when: datetime, write: Callable[[str], Any]) -> None:
    """Every plan as one JSON document, written account by account as the plans stream in."""
    write('{"at": ' + json.dumps(when.isoformat()) + ', "accounts": [')
    for i, p in enumerate(plans):
        write(("," if i else "") + "\n  " + json.dumps(plan_json(p)))
    write("\n]}\n")


def plan_table(plans: list[AccountPlan], when: datetime) -> None:
    """The plans as a table, with how many accounts the cycle would charge."""
    table = Table(title=f"recharge plan at {when.isoformat()}")
    for column in ("account", "cur", "balance", "avg/day", "days", "threshold", "recharge", "runway d", "decision"):
        table.add_column(column, justify="right" if column not in ("account", "cur", "decision") else "left")
    charges = 0
    for p in plans:
        d = p.decision
        verdict = f"[bold]charge {format_ledger(d.charge_amount)}[/]" if d.action == "charge" else "skip"
        why = d.reason + (f" ({d.limited_by})" if d.limited_by else "")
        why += f" until {utc(d.next_try_at)}" if d.next_try_at is not None else ""
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
    out.print(f"{plural(len(plans), 'account')}, {charges} to charge")
