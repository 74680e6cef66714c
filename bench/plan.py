"""Planning speed and memory: plan_accounts over many accounts against one bare GROUP BY of the same rows.

    .venv/bin/python bench/plan.py [--db sqlite|postgres|both] [--sizes N [N ...]] [--busier F] [--kinds K]

For each database and each size (a file under /tmp, or a scratch PostgreSQL database dropped at the end):
bulk-load the accounts and 30 days of daily usage (1-3 kinds a day per account) straight into the tables, with a
few automatic recharges for the spend caps, and gather the planner's statistics; then, in a fresh process, time
`plan_accounts(db, settings, at)` consumed as a stream (results counted, not kept) and read its memory: the RSS
growth of the process (ru_maxrss after the runs minus the RSS before) and, for the largest size, in a separate
pass, the tracemalloc peak of Python allocations. The limit: `SELECT account_id, SUM(amount) FROM daily_usage
WHERE day >= :start AND day < :end GROUP BY account_id` over the same window, fetched fully, through the same
engine. Goals: plan within 2x of the limit, peak memory under 300 MB, and a cost per account that stays the
same at every size (linear in accounts) and with more calls a day (`--busier F`: the first size once more with
F times the calls a day, which changes the per-day totals but not how many there are).
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
from time import perf_counter, process_time
from typing import Any

import _common as c
from sqlalchemy import Date, bindparam, func, insert, select, text

from recharged.balance import Window
from recharged.clock import start_of_day
from recharged.config import load_settings
from recharged.planning import plan_accounts
from recharged.states import Phase, RechargeKind
from recharged.store import models
from recharged.store.engine import Database
from recharged.store.models import Account, DailyUsage, Entry, Recharge

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


def account_rows(
    first: int, count: int, rng: random.Random, calls_scale: float = 1.0, kinds: int = 3
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """Accounts [first, first + count) and their daily usage rows over the 30 days before AT: 1 to `kinds` usage
    kinds a day, `calls_scale` times the calls a day (the same rows, other totals)."""
    today = start_of_day(c.AT)
    window_days = [(today - timedelta(days=d)).date() for d in range(DAYS, 0, -1)]
    accounts: list[dict[str, Any]] = []
    daily: list[tuple[Any, ...]] = []
    for n in range(first, first + count):
        account = f"acct-{n:06d}"
        # 15% of the accounts are younger than the window; the others up to about three years old.
        age = timedelta(days=rng.randint(1, DAYS) if rng.random() < 0.15 else rng.randint(DAYS + 1, 1_100))
        created_at = c.AT - age - timedelta(seconds=rng.randrange(86_400))
        # median about 12 calls a day (times calls_scale), a long tail of busy accounts
        calls_a_day = rng.lognormvariate(2.5, 1.2) * calls_scale
        spent = 0
        first_usage: datetime | None = None
        for day in window_days:
            if day < created_at.date():
                continue
            for kind, measure, price in rng.sample(KINDS, rng.randint(1, kinds)):
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
    """A third of the accounts had 1-3 automatic recharges in the last 30 days: their ledger credits (what a
    plan as of a past instant takes off) and, from them, `recharge_credits`."""
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


def recharge_credits(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished automatic recharges behind those credits, 20% VAT on top (what the spend caps read)."""
    return [
        {
            "account_id": entry["account_id"],
            "kind": RechargeKind.AUTO,
            "phase": Phase.FINISHED,
            "currency": "USD",
            "amount": entry["amount"],
            "vat": entry["amount"] // 5,
            "total": entry["amount"] + entry["amount"] // 5,
            "vat_percent": Decimal(20),
            "balance_before": 0,
            "payment_intent": entry["external_id"],
            "created_at": entry["occurred_at"],
            "updated_at": entry["occurred_at"],
        }
        for entry in entries
    ]


def limit_query(prefix: str = "") -> tuple[Any, dict[str, date]]:
    """The bare GROUP BY, with its dates bound as SQLAlchemy binds a Date column's."""
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


def setup(url: str, accounts: int, seed: int, analyze: bool, calls_scale: float, kinds: int) -> dict[str, Any]:
    """Create the schema and load the rows (not timed against anything)."""
    started = perf_counter()
    db = Database(url)
    try:
        db.upgrade()
        rng = random.Random(seed)
        counts: dict[str, Any] = {"accounts": 0, "daily_usage": 0, "recharges": 0, "funding_sources": 0}
        for first in range(0, accounts, CHUNK):
            account_batch, daily = account_rows(first, min(CHUNK, accounts - first), rng, calls_scale, kinds)
            recharges = recharge_rows(account_batch, rng)
            with db.engine.begin() as connection:
                connection.execute(insert(Account), account_batch)
                if db.dialect == "postgresql":  # COPY: set-up speed only
                    driver: Any = connection.connection.driver_connection
                    cursor = driver.cursor()
                    with cursor.copy(f"COPY daily_usage ({', '.join(DAILY_COLUMNS)}) FROM STDIN") as copy:
                        for row in daily:
                            copy.write_row(row)
                else:
                    connection.execute(insert(DailyUsage), [dict(zip(DAILY_COLUMNS, r, strict=True)) for r in daily])
                if recharges:
                    connection.execute(insert(Entry), recharges)
                    connection.execute(insert(Recharge), recharge_credits(recharges))
                cards = funding_rows(account_batch, rng)
                if cards:
                    connection.execute(insert(models.FundingSource), cards)
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


def measure(url: str, repeat: int, profile: int, trace: bool) -> dict[str, Any]:
    """In a fresh process: plan runs (each plan counted and its action read, none kept) and limit runs in turns,
    so that other work on the machine slows both alike, then the RSS; with `trace`, one more plan run under
    tracemalloc."""
    code = c.code_fingerprint()
    settings = load_settings(None, environ={})
    db = Database(url)
    result: dict[str, Any] = {"code": code, "load_before": os.getloadavg()[0]}
    try:
        result["rss_before_mb"] = c.rss_mb()
        query, params = limit_query()
        plan_times, plan_cpu, limit_times = [], [], []
        planned = charges = 0
        for _ in range(repeat):
            started, cpu = perf_counter(), process_time()
            planned = charges = 0
            for plan in plan_accounts(db, settings, c.AT):
                planned += 1
                charges += plan.decision.action == "charge"
            plan_times.append(perf_counter() - started)
            plan_cpu.append(process_time() - cpu)
            started = perf_counter()
            with db.engine.connect() as connection:
                rows = connection.execute(query, params).fetchall()
            limit_times.append(perf_counter() - started)
            result["groups"] = len(rows)
            del rows
        result["rss_peak_mb"] = c.peak_rss_mb()
        result["plan_times"], result["plan_cpu"], result["limit_times"] = plan_times, plan_cpu, limit_times
        result["planned"], result["charges"] = planned, charges

        if trace:
            tracemalloc.start()
            started = perf_counter()
            for _plan in plan_accounts(db, settings, c.AT):
                pass
            result["traced_s"] = perf_counter() - started
            result["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()

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
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--sizes", type=int, nargs="+", metavar="N", help="accounts, one run each (default: 100,000)")
    sizes.add_argument("--accounts", type=int, metavar="N", help="one size: the same as --sizes N")
    parser.add_argument(
        "--busier", type=float, default=0, metavar="F", help="also the first size with F times the calls a day"
    )
    parser.add_argument("--kinds", type=int, default=3, choices=range(1, len(KINDS) + 1), help="most kinds a day")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; the best is reported (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-sqlite-analyze",
        dest="sqlite_analyze",
        action="store_false",
        help="leave SQLite without statistics (the limit then reads the day index and sorts)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile one more plan run, top N")
    args = parser.parse_args(argv)
    counts = args.sizes or [args.accounts or 100_000]
    runs: list[tuple[int, float]] = [(n, 1.0) for n in counts]
    if args.busier:
        runs.append((counts[0], args.busier))
    largest = max(counts)
    print(
        f"plan: {', '.join(f'{n:,}' for n in counts)} accounts, {DAYS} days of usage (1-{args.kinds} kinds a day) "
        f"before {c.AT.isoformat()}, best of {args.repeat}"
        + (f"; {counts[0]:,} accounts again with {args.busier:g}x the calls a day" if args.busier else "")
    )
    results = []
    for kind in c.chosen(args.db):
        for accounts, calls_scale in runs:
            label = f"{kind} {accounts:,}" + (f" x{calls_scale:g} calls" if calls_scale != 1 else "")
            with c.scratch_database(kind, "plan") as url:
                print(f"[{label}] loading...", flush=True)
                setup_args = (url, accounts, args.seed, args.sqlite_analyze, calls_scale, args.kinds)
                loaded = c.in_child(setup, *setup_args)
                print(
                    f"[{label}] loaded {loaded['accounts']:,} accounts, {loaded['daily_usage']:,} daily_usage rows, "
                    f"{loaded['recharges']:,} recharges, {loaded['funding_sources']:,} cards "
                    f"in {loaded['seconds']:.0f} s; limit query plan:",
                    flush=True,
                )
                for line in loaded["query_plan"]:
                    print(f"    {line}")
                trace = accounts == largest and calls_scale == 1
                measured = c.in_child(measure, url, args.repeat, args.profile, trace)
                results.append({"label": label, "db": kind, "calls_scale": calls_scale, **loaded, **measured})
    print_results(results)


def per_account_us(r: dict[str, Any], key: str) -> float:
    """The best of a run's times, in microseconds per account."""
    return float(min(r[key]) / r["accounts"] * 1e6)


def print_results(results: list[dict[str, Any]]) -> None:
    def runs(values: list[float]) -> str:
        return " ".join(f"{v:.2f}" for v in values)

    versions: dict[str, tuple[dict[str, Any], list[str]]] = {}  # the code measured (others may change it meanwhile)
    for r in results:
        versions.setdefault(r["code"]["digest"], (r["code"], []))[1].append(r["label"])
    c.print_code([(", ".join(labels), code) for code, labels in versions.values()])
    table = [
        ("plan_accounts seconds (best)", *(c.fmt_s(min(r["plan_times"])) for r in results)),
        ("limit GROUP BY seconds (best)", *(c.fmt_s(min(r["limit_times"])) for r in results)),
        ("ratio plan / limit (goal <= 2x)", *(f"{min(r['plan_times']) / min(r['limit_times']):.2f}x" for r in results)),
        ("plan, microseconds per account", *(f"{per_account_us(r, 'plan_times'):.1f}" for r in results)),
        ("limit, microseconds per account", *(f"{per_account_us(r, 'limit_times'):.1f}" for r in results)),
        ("plan runs, s", *(runs(r["plan_times"]) for r in results)),
        ("plan runs, CPU s of this process", *(runs(r["plan_cpu"]) for r in results)),
        ("limit runs, s", *(runs(r["limit_times"]) for r in results)),
        (
            "plan median / limit median",
            *(f"{median(r['plan_times']) / median(r['limit_times']):.2f}x" for r in results),
        ),
        ("accounts planned / groups", *(f"{r['planned']:,} / {r['groups']:,}" for r in results)),
        ("plans that charge", *(f"{r['charges']:,}" for r in results)),
        ("RSS growth, MB (goal < 300)", *(c.fmt_mb(r["rss_peak_mb"] - r["rss_before_mb"]) for r in results)),
        ("RSS before / peak, MB", *(f"{r['rss_before_mb']:.1f} / {r['rss_peak_mb']:.1f}" for r in results)),
        (
            "tracemalloc peak, MB (goal < 300)",
            *(c.fmt_mb(r["traced_peak_mb"]) if "traced_s" in r else "-" for r in results),
        ),
        ("plan run under tracemalloc, s", *(c.fmt_s(r["traced_s"]) if "traced_s" in r else "-" for r in results)),
        ("daily_usage rows in the window", *(f"{r['window_rows']:,}" for r in results)),
        ("set-up seconds", *(f"{r['seconds']:.0f}" for r in results)),
        ("load average before / after", *(f"{r['load_before']:.2f} / {r['load_after']:.2f}" for r in results)),
    ]
    sizes = sorted({r["accounts"] for r in results})
    title = f"plan: {' / '.join(f'{n:,}' for n in sizes)} accounts x {DAYS} days"
    c.print_table(title, ["", *(r["label"] for r in results)], table)

    print_growth(results)


def print_growth(results: list[dict[str, Any]]) -> None:
    """The plan's cost per account across sizes (linear: the same at each) and with more calls a day (the same)."""
    lines = []
    for kind in dict.fromkeys(r["db"] for r in results):
        base = [r for r in results if r["db"] == kind and r["calls_scale"] == 1]
        if len(base) > 1:
            costs = [per_account_us(r, "plan_times") for r in base]
            sizes_text = " / ".join(f"{r['accounts']:,}" for r in base)
            plan_text = " / ".join(f"{us:.1f}" for us in costs)
            cpu_text = " / ".join(f"{per_account_us(r, 'plan_cpu'):.1f}" for r in base)
            limit_text = " / ".join(f"{per_account_us(r, 'limit_times'):.1f}" for r in base)
            lines.append(
                f"  {kind}: plan {plan_text} us per account (CPU {cpu_text}) at {sizes_text} accounts (limit "
                f"{limit_text}): the largest per-account time is {max(costs) / min(costs):.2f}x the smallest "
                "(1.00x: linear)"
            )
        for busier in (r for r in results if r["db"] == kind and r["calls_scale"] != 1):
            same = next((r for r in base if r["accounts"] == busier["accounts"]), None)
            if same is None:
                continue
            ratio = min(busier["plan_times"]) / min(same["plan_times"])
            wall, cpu = per_account_us(busier, "plan_times"), per_account_us(busier, "plan_cpu")
            lines.append(
                f"  {kind}: {busier['calls_scale']:g}x the calls a day at {busier['accounts']:,} accounts: "
                f"{busier['window_rows']:,} daily rows (vs {same['window_rows']:,}), plan {wall:.1f} us per account, "
                f"CPU {cpu:.1f} (vs {per_account_us(same, 'plan_times'):.1f}, {per_account_us(same, 'plan_cpu'):.1f}): "
                f"{ratio:.2f}x (1.00x: independent of the calls a day)"
            )
    if lines:
        print("\nCost growth (best runs):", *lines, sep="\n")


if __name__ == "__main__":
    main()
