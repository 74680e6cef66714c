"""The demo: sixty simulated days, all local."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from recharged.cli.app import err, fail, main, out
from recharged.config import LoggingSettings
from recharged.logs import configure
from recharged.money import format_customer
from recharged.words import plural


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
    # lazy: the simulation brings an in-process Stripe server and everything else the demo runs
    from recharged.demo import simulation

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
        fail(f"verify found {plural(len(result.verify.violations), 'violation')} in the demo's database", 1)
    out.print(f"verify: ledger OK, {result.verify.checked_entries:,} usage entries checked, every invariant holds")
