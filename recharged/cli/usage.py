"""Usage: record one event, or import a CSV of call-detail records."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from recharged.cli.app import App, err, main, out, pass_app
from recharged.errors import InputError, RejectedRowsError
from recharged.usage import UsageRecorder, import_csv
from recharged.words import plural


@main.group("usage")
def usage_group() -> None:
    """Record usage: one event, or a CSV of call-detail records."""


@usage_group.command("record")
@click.argument("account", required=False)
@click.option("--account", "account_option", hidden=True, help="The account, as the first argument (older form).")
@click.option("--event-id", required=True)
@click.option("--kind", required=True, help="A usage kind of the account's plan, e.g. dialer or sms_out.")
@click.option("--started-at", required=True, metavar="ISO", help="When the call was dialed or the message sent.")
@click.option(
    "--duration-seconds", "--duration", "duration_seconds", help="Seconds of the whole leg (time-based kinds)."
)
@click.option("--quantity", help="Units (count-based kinds).")
@click.option("--text", help="The SMS text; its segments are counted.")
@click.option("--cost", help="A pre-rated cost, used as given.")
@pass_app
def usage_record(app: App, /, account: str | None, account_option: str | None, **event: str | None) -> None:
    """Record one usage event of ACCOUNT (the CSV's and the API's field names, as options)."""
    if account and account_option and account != account_option:
        raise InputError(f"two accounts given: {account!r} and --account {account_option!r}")
    account_id = account or account_option
    if not account_id:
        raise InputError("which account? give it as the first argument: usage record ACCOUNT --event-id ...")
    recorder = UsageRecorder(app.database(), app.settings, app.clock)
    outcome = recorder.record([{"account_id": account_id, **event}])[0]
    if outcome.status == "rejected":
        raise InputError(f"event {event['event_id']} rejected: {outcome.reason}")
    out.print(f"event {event['event_id']}: {outcome.status}")


@usage_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--rejects",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write rejected rows, only if there are any (default: next to FILE, as FILE.rejected.csv).",
)
@click.option(
    "--accept-rejects",
    is_flag=True,
    help="Exit 0 even when rows were rejected (default: exit 65, so a cron job notices unbilled calls).",
)
@pass_app
def usage_import(app: App, file: Path, rejects: Path | None, accept_rejects: bool) -> None:
    """Import call-detail records from CSV; duplicates are skipped, bad rows rejected one by one and written, with
    their line numbers and reasons, to the rejects file. Exits 65 when any row was rejected (the good rows are
    recorded all the same), unless --accept-rejects.

    Header: event_id,account_id,kind,started_at,duration_seconds,quantity,text,cost
    """
    recorder = UsageRecorder(app.database(), app.settings, app.clock)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task: TaskID | None = None

    def advance(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(f"importing {file.name}", total=total)
        progress.update(task, completed=done)

    with progress:
        report = import_csv(recorder, file, batch_size=app.settings.usage.batch_size, rejects=rejects, progress=advance)
    rate = f", {report.total / report.elapsed:,.0f} events/s" if report.elapsed > 0 and report.total else ""
    out.print(
        f"{file}: {report.accepted} accepted, {plural(report.duplicate, 'duplicate')}, {report.rejected} rejected "
        f"in {report.elapsed:.1f}s{rate}"
    )
    if report.rejects is not None:
        out.print(f"rejected rows with their line numbers and reasons: {report.rejects}")
    if report.rejected and not accept_rejects:
        rows = "row was" if report.rejected == 1 else "rows were"
        raise RejectedRowsError(
            f"{report.rejected} of {report.total} {rows} rejected and not billed (see {report.rejects}); the other "
            "rows are recorded. Fix and import the rejects file, or pass --accept-rejects."
        )
