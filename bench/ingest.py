"""Ingestion throughput: UsageRecorder.record against a bare INSERT of the same rows on the same database.

    .venv/bin/python bench/ingest.py [--db sqlite|postgres|both] [--events N] [--accounts N]

For each database (a file under /tmp, or a scratch PostgreSQL database dropped at the end), in a fresh
process: create the accounts with accounts.create_accounts, generate the events as CSV-like dicts of
strings, then time only the `record` calls, one batch at a time (as the CSV import does). Then the limit:
the same rows as the ledger entries `record` writes, inserted by SQLAlchemy Core executemany, batch by
batch, one transaction per batch, into a table with the same 12 columns and types but no key, index or
constraint, through an engine from recharged.db.make_engine. Goal: recharged >= 50% of the limit.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys
from datetime import UTC, datetime, timedelta
from time import perf_counter
from typing import Any

import _common as c
from sqlalchemy import Column, MetaData, Table, func, select

from recharged.clock import FixedClock
from recharged.config import load_settings
from recharged.rating import rate_event
from recharged.store.engine import Database, make_engine
from recharged.store.models import Entry, Rate
from recharged.usage import UsageRecorder, summarize

# kind, share of events, event-id prefix: mostly calls, some texts, some number lookups.
MIX = (("dialer", 0.55, "CA"), ("outbound", 0.25, "CA"), ("sms_out", 0.13, "SM"), ("lookup", 0.07, "LK"))
CALL_SECONDS = (5, 600)
SMS_SEGMENTS = ((1, 0.80), (2, 0.15), (3, 0.05))
SPREAD = timedelta(days=30)

Spec = tuple[str, str, str, str, str | None, str | None]  # event_id, account, kind, started_at, seconds, qty


def account_id(n: int) -> str:
    return f"acct-{n:06d}"


def make_specs(events: int, accounts: int, seed: int, ids: str) -> list[Spec]:
    """The events, in started_at order (a CDR export is chronological), as tuples of the CSV strings."""
    rng = random.Random(seed)
    kinds = [k for k, _, _ in MIX]
    prefix = {k: p for k, _, p in MIX}
    numbers = [str(n) for n in range(CALL_SECONDS[1] + 1)]  # shared to save memory (a CSV reader makes new ones)
    chosen = rng.choices(kinds, weights=[w for _, w, _ in MIX], k=events)
    offsets = sorted(rng.randrange(1, int(SPREAD.total_seconds()) + 1) for _ in range(events))
    start = c.AT.timestamp()
    names = [account_id(n) for n in range(accounts)]
    specs: list[Spec] = []
    for i in range(events):
        kind = chosen[i]
        event_id = f"{prefix[kind]}{rng.getrandbits(128):032x}" if ids == "random" else f"ev-{i:010d}"
        started = datetime.fromtimestamp(start - offsets[-1 - i], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        seconds = quantity = None
        if kind in ("dialer", "outbound"):
            seconds = numbers[rng.randint(*CALL_SECONDS)]
        elif kind == "sms_out":
            quantity = numbers[rng.choices([s for s, _ in SMS_SEGMENTS], weights=[w for _, w in SMS_SEGMENTS])[0]]
        else:
            quantity = numbers[1]
        specs.append((event_id, names[rng.randrange(accounts)], kind, started, seconds, quantity))
    return specs


def as_event(spec: Spec) -> dict[str, str]:
    event_id, account, kind, started, seconds, quantity = spec
    event = {"event_id": event_id, "account_id": account, "kind": kind, "started_at": started}
    if seconds is not None:
        event["duration_seconds"] = seconds
    if quantity is not None:
        event["quantity"] = quantity
    return event


def as_entry_row(spec: Spec, rates: dict[str, Any], rate_ids: dict[str, int], now: datetime) -> dict[str, Any]:
    """The ledger row `record` writes for this event."""
    event_id, account, kind, started, seconds, quantity = spec
    duration = None if seconds is None else int(seconds)
    count = None if quantity is None else int(quantity)
    rated = rate_event(rates[kind], duration_seconds=duration, quantity=count)
    return {
        "account_id": account,
        "entry_type": "usage",
        "external_id": event_id,
        "amount": -rated.cost,
        "occurred_at": datetime.fromisoformat(started),
        "recorded_at": now,
        "kind": kind,
        "duration_seconds": duration,
        "quantity": count,
        "billable_quantity": rated.billable_quantity,
        "rate_id": rate_ids[kind],
        "note": None,
    }


def create_bench_accounts(db: Database, settings: Any, clock: FixedClock, accounts: int) -> None:
    c.create_bench_accounts(db, settings, clock, accounts, account_id=account_id, opening_balance="100.00")


def instrument(db: Database) -> dict[str, float]:
    """For --breakdown: time, by wrapping them, the steps `record` calls. They are found by name, so this
    follows the code as it changes: the parsing and rating functions, every function `recharged.usage`
    takes from `recharged.db`, and the commits."""
    import recharged.usage as usage_module

    names = [n for n in ("parse_event", "check_against_rate", "rate_event") if hasattr(usage_module, n)]
    names += sorted(
        name
        for name, value in vars(usage_module).items()
        if callable(value) and not isinstance(value, type) and getattr(value, "__module__", "") == "recharged.db"
    )
    spent = dict.fromkeys((*names, "commit"), 0.0)

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += perf_counter() - started

        return wrapper

    for name in names:
        setattr(usage_module, name, timed(name, getattr(usage_module, name)))
    dialect: Any = db.engine.dialect
    dialect.do_commit = timed("commit", dialect.do_commit)
    return spent


def time_limit(url: str, rows: list[dict[str, Any]], batch_size: int, multirow: bool) -> c.CpuClock:
    """Insert the rows batch by batch (one transaction each) into a new plain table.

    multirow=False is SQLAlchemy's default executemany (the DBAPI's executemany); multirow=True makes
    SQLAlchemy send multi-row VALUES pages (insertmanyvalues, 1,000 rows a page)."""
    engine = make_engine(url)
    try:
        engine.dialect.use_insertmanyvalues_wo_returning = multirow
        plain = Table(
            f"bench_plain_entries_{'multirow' if multirow else 'executemany'}",
            MetaData(),
            *(Column(col.name, col.type) for col in Entry.__table__.c if col.name != "id"),
        )
        plain.create(engine)
        chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        statement = plain.insert()
        with c.CpuClock() as clock:
            for chunk in chunks:
                with engine.begin() as connection:
                    connection.execute(statement, chunk)
        with engine.connect() as connection:
            if connection.scalar(select(func.count()).select_from(plain)) != len(rows):
                raise RuntimeError(f"the plain table does not hold {len(rows)} rows")
        return clock
    finally:
        engine.dispose()


def run(
    kind: str, events: int, accounts: int, batch_size: int, seed: int, ids: str, profile: int, breakdown: bool
) -> dict[str, Any]:
    """One database, in a fresh process: set up, time recharged, time the limit."""
    code = c.code_fingerprint()
    result: dict[str, Any] = {"db": kind, "code": code, "load_before": os.getloadavg()[0]}
    settings = load_settings(None, environ={})
    clock = FixedClock(c.AT)
    with c.scratch_database(kind, "ingest") as url:
        db = Database(url)
        try:
            db.upgrade()
            t = perf_counter()
            create_bench_accounts(db, settings, clock, accounts)
            result["setup_accounts_s"] = perf_counter() - t
            specs = make_specs(events, accounts, seed, ids)
            batches = [[as_event(s) for s in specs[i : i + batch_size]] for i in range(0, events, batch_size)]

            recorder = UsageRecorder(db, settings, clock)
            spent = instrument(db) if breakdown else None
            result["rss_before_mb"] = c.rss_mb()
            counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
            profiler = cProfile.Profile() if profile else None
            with c.CpuClock() as timing:
                if profiler:
                    profiler.enable()
                for batch in batches:
                    for status, n in summarize(recorder.record(batch)).items():
                        counts[status] += n
                if profiler:
                    profiler.disable()
            result["recharged_s"], result["recharged_cpu_s"] = timing.wall, timing.cpu
            result["recharged_written_mb"] = timing.written
            result["rss_peak_recharged_mb"] = c.peak_rss_mb()
            result["counts"] = counts
            result["breakdown"] = spent
            if profiler:
                print(f"\ncProfile of the recharged phase ({kind}, {events:,} events), top {profile} by cumulative:")
                pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(profile)
                print(f"top {profile} by own time:")
                pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(profile)
            del batches
            with db.transaction() as session:
                stored = session.scalar(select(func.count()).select_from(Entry).where(Entry.entry_type == "usage"))
                rate_ids = {k: i for k, i in session.execute(select(Rate.kind, Rate.id))}
            if counts["accepted"] != events or stored != events:
                raise RuntimeError(f"{kind}: expected {events} accepted events, got {counts}, {stored} stored")
        finally:
            db.close()

        # The limit: the same rows, generated before timing, into a table with no key, index or constraint.
        rates = settings.plans["standard"].rate_table()
        rows = [as_entry_row(s, rates, rate_ids, clock.now()) for s in specs]
        del specs
        limit = time_limit(url, rows, batch_size, False)
        result["limit_s"], result["limit_cpu_s"], result["limit_written_mb"] = limit.wall, limit.cpu, limit.written
        result["multirow_s"] = time_limit(url, rows, batch_size, True).wall
    result["rss_peak_mb"] = c.peak_rss_mb()
    result["load_after"] = os.getloadavg()[0]
    c.check_code(code, kind)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_db_argument(parser)
    parser.add_argument("--events", type=int, default=1_000_000, help="default: 1,000,000")
    parser.add_argument("--accounts", type=int, default=10_000, help="default: 10,000")
    default_batch = load_settings(None, environ={}).usage.batch_size
    parser.add_argument(
        "--batch-size", type=int, default=default_batch, help=f"default: {default_batch:,} (the CSV import's)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--ids", choices=("random", "sequential"), default="random", help="event ids: random (like CDR SIDs) or ordered"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile the recharged phase, print the top N (slows it)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="time the steps of record (wraps them: a little slower)"
    )
    args = parser.parse_args(argv)
    print(
        f"ingest: {args.events:,} events, {args.accounts:,} accounts, batches of {args.batch_size:,}, "
        f"{args.ids} event ids, seed {args.seed}"
    )
    results = []
    for kind in c.chosen(args.db):
        print(f"[{kind}] running...", flush=True)
        t = perf_counter()
        outcome = c.in_child(
            run, kind, args.events, args.accounts, args.batch_size, args.seed, args.ids, args.profile, args.breakdown
        )
        print(f"[{kind}] done in {perf_counter() - t:.0f} s (set-up included)", flush=True)
        results.append(outcome)

    n = args.events
    c.print_code([(r["db"], r["code"]) for r in results])
    table = [
        ("recharged events/s", *(c.fmt_int(n / r["recharged_s"]) for r in results)),
        ("limit rows/s (Core executemany, plain table)", *(c.fmt_int(n / r["limit_s"]) for r in results)),
        ("ratio recharged / limit (goal >= 50%)", *(f"{r['limit_s'] / r['recharged_s']:.1%}" for r in results)),
        ("recharged seconds (wall)", *(c.fmt_s(r["recharged_s"]) for r in results)),
        ("limit seconds (wall)", *(c.fmt_s(r["limit_s"]) for r in results)),
        ("recharged: CPU seconds of this process", *(c.fmt_s(r["recharged_cpu_s"]) for r in results)),
        ("limit: CPU seconds of this process", *(c.fmt_s(r["limit_cpu_s"]) for r in results)),
        (
            "SQLite: MB written, recharged / limit",
            *(
                f"{r['recharged_written_mb']:,.0f} / {r['limit_written_mb']:,.0f}" if r["db"] == "sqlite" else "n/a"
                for r in results
            ),
        ),
        ("info: multi-row VALUES limit rows/s", *(c.fmt_int(n / r["multirow_s"]) for r in results)),
        ("info: ratio recharged / multi-row limit", *(f"{r['multirow_s'] / r['recharged_s']:.1%}" for r in results)),
        ("RSS before timing, MB (events in memory)", *(c.fmt_mb(r["rss_before_mb"]) for r in results)),
        ("peak RSS after recharged phase, MB", *(c.fmt_mb(r["rss_peak_recharged_mb"]) for r in results)),
        ("peak RSS of the whole run, MB", *(c.fmt_mb(r["rss_peak_mb"]) for r in results)),
        ("accepted/duplicate/rejected", *("{accepted}/{duplicate}/{rejected}".format(**r["counts"]) for r in results)),
        ("set-up: create_accounts seconds", *(c.fmt_s(r["setup_accounts_s"]) for r in results)),
        ("load average before / after", *(f"{r['load_before']:.2f} / {r['load_after']:.2f}" for r in results)),
    ]
    c.print_table(f"ingest: {n:,} events / {args.accounts:,} accounts", ["", *(r["db"] for r in results)], table)
    if args.breakdown:
        parts = list(dict.fromkeys(part for r in results for part in r["breakdown"]))
        rows = [(part, *(f"{r['breakdown'].get(part, 0.0):.3f}" for r in results)) for part in parts]
        rows.append(
            (
                "rest of record (validation, rows, outcomes)",
                *(f"{r['recharged_s'] - sum(r['breakdown'].values()):.3f}" for r in results),
            )
        )
        rows.append(("total", *(c.fmt_s(r["recharged_s"]) for r in results)))
        c.print_table("breakdown of the recharged phase, seconds", ["", *(r["db"] for r in results)], rows)


if __name__ == "__main__":
    main()
