"""Planning speed and memory: plan_accounts over many accounts against one bare GROUP BY of the same rows.

    .venv/bin/python bench/plan.py [--db sqlite|postgres|both] [--accounts N]

For each database (a file under /tmp, or a scratch PostgreSQL database dropped at the end): bulk-load the
accounts and 30 days of daily usage (1-3 kinds a day per account) straight into the tables, plus a few
automatic-recharge ledger entries for the spend caps; then, in a fresh process, time
`plan_accounts(db, settings, at)` consumed as a stream (results counted, not kept) and read its memory:
the RSS growth of the process (ru_maxrss after the runs minus the RSS before) and, in a separate pass, the
tracemalloc peak of Python allocations. The limit: `SELECT account_id, SUM(amount) FROM daily_usage WHERE
day >= :start AND day < :end GROUP BY account_id` over the same window, fetched fully, through the same
engine. Goals: plan within 2x of the limit, peak memory under 300 MB.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys
import tracemalloc
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from statistics import median
from time import perf_counter
from typing import Any

import _common as c
from sqlalchemy import Date, bindparam, func, insert, select, text

from recharged.balance import Window
from recharged.clock import start_of_day
from recharged.config import load_settings
from recharged.planning import plan_accounts
from recharged.store import models
from recharged.store.engine import Database
from recharged.store.models import Account, DailyUsage, Entry

DAYS = 30
CHUNK = 5_000  # accounts generated and written at a time
# kind, measure, price in Units per minute (time) or per unit (count): the built-in "standard" plan.
KINDS = (
    ("dialer", "time", 2_000),
    ("outbound", "time", 1_400),
    ("inbound", "time", 850),
    ("sms_out", "count", 790),
    ("lookup", "count", 1_000),
)
LIMIT_SQL = "SELECT account_id, SUM(amount) FROM daily_usage WHERE day >= :start AND day < :end GROUP BY account_id"
DAILY_COLUMNS = ("account_id", "day", "kind", "events", "quantity", "amount")


def account_rows(first: int, count: int, rng: random.Random) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """Accounts [first, first + count) and their daily usage rows over the 30 days before AT."""
    today = start_of_day(c.AT)
    window_days = [(today - timedelta(days=d)).date() for d in range(DAYS, 0, -1)]
    accounts: list[dict[str, Any]] = []
    daily: list[tuple[Any, ...]] = []
    for n in range(first, first + count):
        account = f"acct-{n:06d}"
        # 15% of the accounts are younger than the window; the others up to about three years old.
        age = timedelta(days=rng.randint(1, DAYS) if rng.random() < 0.15 else rng.randint(DAYS + 1, 1_100))
        created_at = c.AT - age - timedelta(seconds=rng.randrange(86_400))
        calls_a_day = rng.lognormvariate(2.5, 1.2)  # median about 12 calls a day, a long tail of busy accounts
        spent = 0
        first_usage: datetime | None = None
        for day in window_days:
            if day < created_at.date():
                continue
            for kind, measure, price in rng.sample(KINDS, rng.randint(1, 3)):
                events = max(1, round(calls_a_day * rng.uniform(0.3, 1.7)))
                if measure == "time":
                    quantity = events * 60 * rng.randint(1, 6)  # billable seconds, whole minutes
                    amount = price * quantity // 60
                elif kind == "sms_out":
                    quantity = events * rng.choice((1, 1, 1, 2, 3))
                    amount = price * quantity
                else:
                    quantity, amount = events, price * events
                daily.append((account, day, kind, events, quantity, amount))
                spent += amount
            if first_usage is None:
                first_usage = max(created_at, datetime.combine(day, datetime.min.time(), UTC))
        average = spent // DAYS
        accounts.append(
            {
                "id": account,
                "email": f"billing@{account}.example",
                "plan": "standard",
                "currency": "USD",
                "vat_percent": Decimal(20),
                "auto_recharge": rng.random() < 0.8,
                "balance": int(average * rng.uniform(-1.0, 20.0)),
                "first_usage_at": first_usage,
                "created_at": created_at,
                "updated_at": c.AT,
            }
        )
    return accounts, daily


def recharge_rows(accounts: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """A third of the accounts had 1-3 automatic recharges in the last 30 days (what the spend caps read)."""
    rows = []
    for account in accounts:
        if rng.random() >= 1 / 3:
            continue
        for j in range(rng.randint(1, 3)):
            at = c.AT - timedelta(seconds=rng.randrange(1, DAYS * 86_400))
            rows.append(
                {
                    "account_id": account["id"],
                    "entry_type": "recharge",
                    "external_id": f"pi_{account['id']}_{j}",
                    "amount": rng.randint(10, 200) * 100_000,
                    "occurred_at": at,
                    "recorded_at": at,
                    "note": "bench",
                }
            )
    return rows


def limit_query(prefix: str = "") -> tuple[Any, dict[str, date]]:
    """The bare GROUP BY, with its dates bound as SQLAlchemy binds them for usage_totals."""
    window = Window.before(c.AT, DAYS)
    query = text(prefix + LIMIT_SQL).bindparams(bindparam("start", type_=Date()), bindparam("end", type_=Date()))
    return query, {"start": window.start.date(), "end": window.end.date()}


def funding_rows(accounts: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """A default card for 95% of the accounts with auto-recharge on (without one, no charge is planned)."""
    return [
        {
            "account_id": account["id"],
            "customer": f"cus_{account['id']}",
            "payment_method": f"pm_{account['id']}",
            "brand": "visa",
            "last4": f"{rng.randrange(10_000):04d}",
            "exp_month": rng.randint(1, 12),
            "exp_year": rng.randint(2027, 2031),
            "is_default": True,
            "added_at": account["created_at"],
        }
        for account in accounts
        if account["auto_recharge"] and rng.random() < 0.95
    ]


def setup(url: str, accounts: int, seed: int, analyze: bool) -> dict[str, Any]:
    """Create the schema and load the rows (not timed against anything)."""
    started = perf_counter()
    db = Database(url)
    try:
        db.upgrade()
        rng = random.Random(seed)
        counts = {"accounts": 0, "daily_usage": 0, "recharges": 0, "funding_sources": 0}
        sources = getattr(models, "FundingSource", None)  # the charging schema, when the code has it
        for first in range(0, accounts, CHUNK):
            account_batch, daily = account_rows(first, min(CHUNK, accounts - first), rng)
            recharges = recharge_rows(account_batch, rng)
            with db.engine.begin() as connection:
                connection.execute(insert(Account), account_batch)
                if db.dialect == "postgresql":  # COPY: set-up speed only
                    cursor = connection.connection.driver_connection.cursor()
                    with cursor.copy(f"COPY daily_usage ({', '.join(DAILY_COLUMNS)}) FROM STDIN") as copy:
                        for row in daily:
                            copy.write_row(row)
                else:
                    connection.execute(insert(DailyUsage), [dict(zip(DAILY_COLUMNS, r, strict=True)) for r in daily])
                if recharges:
                    connection.execute(insert(Entry), recharges)
                cards = funding_rows(account_batch, rng) if sources is not None else []
                if cards:
                    connection.execute(insert(sources), cards)
            counts["accounts"] += len(account_batch)
            counts["daily_usage"] += len(daily)
            counts["recharges"] += len(recharges)
            counts["funding_sources"] += len(cards)
        if db.dialect == "postgresql":
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.exec_driver_sql("VACUUM ANALYZE")  # what autovacuum would soon do after a bulk load
        elif analyze:
            with db.engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE")
        with db.engine.begin() as connection:
            explain = "EXPLAIN QUERY PLAN " if db.dialect == "sqlite" else "EXPLAIN "
            query, params = limit_query(explain)
            counts["query_plan"] = [str(row[-1]) for row in connection.execute(query, params)]
    finally:
        db.close()
    counts["seconds"] = perf_counter() - started
    return counts


def measure(url: str, repeat: int, profile: int) -> dict[str, Any]:
    """In a fresh process: the plan runs (RSS), one traced plan run (tracemalloc), then the limit runs."""
    code = c.code_fingerprint()
    settings = load_settings(None, environ={})
    db = Database(url)
    result: dict[str, Any] = {"code": code, "load_before": os.getloadavg()[0]}
    try:
        result["rss_before_mb"] = c.rss_mb()
        plan_times = []
        planned = 0
        for _ in range(repeat):
            started = perf_counter()
            planned = 0
            for _plan in plan_accounts(db, settings, c.AT):
                planned += 1
            plan_times.append(perf_counter() - started)
        result["rss_peak_mb"] = c.peak_rss_mb()
        result["plan_times"] = plan_times
        result["planned"] = planned

        tracemalloc.start()
        started = perf_counter()
        charges = 0
        for plan in plan_accounts(db, settings, c.AT):
            charges += plan.decision.action == "charge"
        result["traced_s"] = perf_counter() - started
        result["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        result["charges"] = charges

        query, params = limit_query()
        limit_times = []
        for _ in range(repeat):
            started = perf_counter()
            with db.engine.connect() as connection:
                rows = connection.execute(query, params).fetchall()
            limit_times.append(perf_counter() - started)
            result["groups"] = len(rows)
            del rows
        result["limit_times"] = limit_times

        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _plan in plan_accounts(db, settings, c.AT):
                pass
            profiler.disable()
            print(f"\ncProfile of one plan run ({db.dialect}), top {profile} by cumulative:")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(profile)
            print(f"top {profile} by own time:")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(profile)
        with db.engine.connect() as connection:
            result["window_rows"] = connection.scalar(
                select(func.count()).select_from(DailyUsage).where(DailyUsage.day >= params["start"])
            )
    finally:
        db.close()
    result["load_after"] = os.getloadavg()[0]
    c.check_code(code, db.dialect)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_db_argument(parser)
    parser.add_argument("--accounts", type=int, default=100_000, help="default: 100,000")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best is reported (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sqlite-analyze", action="store_true", help="run ANALYZE on SQLite after loading")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile one more plan run, top N")
    args = parser.parse_args(argv)
    print(f"plan: {args.accounts:,} accounts, {DAYS} days of usage before {c.AT.isoformat()}, best of {args.repeat}")
    results = []
    for kind in c.chosen(args.db):
        with c.scratch_database(kind, "plan") as url:
            print(f"[{kind}] loading...", flush=True)
            loaded = c.in_child(setup, url, args.accounts, args.seed, args.sqlite_analyze)
            print(
                f"[{kind}] loaded {loaded['accounts']:,} accounts, {loaded['daily_usage']:,} daily_usage rows, "
                f"{loaded['recharges']:,} recharge entries, {loaded['funding_sources']:,} cards "
                f"in {loaded['seconds']:.0f} s; limit query plan:",
                flush=True,
            )
            for line in loaded["query_plan"]:
                print(f"    {line}")
            measured = c.in_child(measure, url, args.repeat, args.profile)
            results.append({"db": kind, **loaded, **measured})

    def runs(values: list[float]) -> str:
        return " ".join(f"{v:.2f}" for v in values)

    c.print_code([(r["db"], r["code"]) for r in results])
    table = [
        ("plan_accounts seconds (best)", *(c.fmt_s(min(r["plan_times"])) for r in results)),
        ("limit GROUP BY seconds (best)", *(c.fmt_s(min(r["limit_times"])) for r in results)),
        ("ratio plan / limit (goal <= 2x)", *(f"{min(r['plan_times']) / min(r['limit_times']):.2f}x" for r in results)),
        ("plan runs, s", *(runs(r["plan_times"]) for r in results)),
        ("limit runs, s", *(runs(r["limit_times"]) for r in results)),
        (
            "plan median / limit median",
            *(f"{median(r['plan_times']) / median(r['limit_times']):.2f}x" for r in results),
        ),
        ("accounts planned / groups", *(f"{r['planned']:,} / {r['groups']:,}" for r in results)),
        ("plans that charge", *(f"{r['charges']:,}" for r in results)),
        ("tracemalloc peak, MB (goal < 300)", *(c.fmt_mb(r["traced_peak_mb"]) for r in results)),
        ("RSS growth, MB (goal < 300)", *(c.fmt_mb(r["rss_peak_mb"] - r["rss_before_mb"]) for r in results)),
        ("RSS before / peak, MB", *(f"{r['rss_before_mb']:.1f} / {r['rss_peak_mb']:.1f}" for r in results)),
        ("plan run under tracemalloc, s", *(c.fmt_s(r["traced_s"]) for r in results)),
        ("daily_usage rows in the window", *(f"{r['window_rows']:,}" for r in results)),
        ("set-up seconds", *(f"{r['seconds']:.0f}" for r in results)),
        ("load average before / after", *(f"{r['load_before']:.2f} / {r['load_after']:.2f}" for r in results)),
    ]
    c.print_table(f"plan: {args.accounts:,} accounts x {DAYS} days", ["", *(r["db"] for r in results)], table)


if __name__ == "__main__":
    main()
