"""Charging throughput: one recharge cycle over N due accounts, through the local Stripe-compatible server
answering every request after `--latency` seconds and refusing more than `--rate-limit` requests a second.

    .venv/bin/python bench/charging.py [--db sqlite|postgres|both] [--accounts N] [--concurrency N]

For each database (a fresh SQLite file under bench/out/, or a scratch PostgreSQL database, both removed at
the end): the Stripe-compatible server starts in a process of its own (so it does not share the GIL with the
cycle); every account gets a customer with Stripe's test card `pm_card_visa` attached, created through the
server's API before the latency and the rate limit are switched on; the accounts are created through
`accounts.create_accounts` with that card on file and an opening balance, and 30 days of usage through
`UsageRecorder.record` leave each of them under its threshold. Then `RechargeService.run_cycle` runs once,
timed, with the daemon's charge concurrency and the daemon's StripeGateway (`runtime.stripe_gateway`: its rate
limiter at payments.max_requests_per_second, its inline retries of 429s). Goal: the cycle takes at most 1.5x
the time the processor's rate limit allows (N / rate limit).
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from statistics import quantiles
from time import perf_counter
from typing import Any

import _common as c
import requests
from sqlalchemy import event, func, select

from recharged.clock import FixedClock
from recharged.config import LoggingSettings, load_settings
from recharged.daemon.runtime import stripe_gateway
from recharged.logs import configure
from recharged.recharge import RechargeService
from recharged.store.engine import Database
from recharged.store.models import Entry, Recharge
from recharged.usage import UsageRecorder, summarize
from recharged.verify import verify

OUT = Path(__file__).resolve().parent / "out"
API_KEY = "sk_test_recharged_bench"
DAYS = 30
CALL_MINUTES = 300  # one 300-minute dialer call a day: $6.00 a day on the standard plan
OPENING = "181.00"  # 30 days of $6.00 leave $1.00, under the threshold (7 days: $42.00)
SEED_THREADS = 8


def account_id(n: int) -> str:
    return f"acct-{n:06d}"


# --- the Stripe-compatible server, in a process of its own ---------------------------------------------------


def serve(conn: Any) -> None:
    """Run a StripeTestServer (no latency, no limit while seeding) and answer the parent's commands."""
    import logging

    from recharged.testing import StripeTestServer

    logging.getLogger("recharged.testing.stripe_server").setLevel(logging.WARNING)
    server = StripeTestServer().start()
    conn.send(server.url)
    cpu = time.process_time()
    while True:
        command, *args = conn.recv()
        if command == "limit":  # seeding is done: what the measured run sees
            server.latency, server.rate_limit = args
            server.clear_requests()
            cpu = time.process_time()
            conn.send(None)
        elif command == "stats":
            stats = server_stats(server)
            stats["cpu_s"] = time.process_time() - cpu
            conn.send(stats)
        elif command == "stop":
            server.stop()
            conn.send(None)
            return


def server_stats(server: Any) -> dict[str, Any]:
    """What the server saw since the limits were set: requests by route and status, the busiest second of
    PaymentIntent creations (by arrival), and the succeeded PaymentIntents per customer."""
    seen = server.requests()
    routes: Counter[str] = Counter()
    for r in seen:
        route = r.path.rsplit("/", 1)[0] if r.path.count("/") > 2 else r.path
        routes[f"{r.method} {route} {r.status}"] += 1
    arrivals = sorted(r.received_at for r in seen if r.method == "POST" and r.path == "/v1/payment_intents")
    busiest, first = 0, 0
    for last, at in enumerate(arrivals):
        while at - arrivals[first] >= 1.0:
            first += 1
        busiest = max(busiest, last - first + 1)
    succeeded = Counter(pi["customer"] for pi in server.payment_intents(status="succeeded"))
    return {
        "requests": len(seen),
        "status_429": sum(1 for r in seen if r.status == 429),
        "routes": dict(routes),
        "busiest_second": busiest,
        "creates": len(arrivals),
        "create_span_s": arrivals[-1] - arrivals[0] if arrivals else 0.0,
        "succeeded_per_customer": dict(succeeded),
    }


class StripeProcess:
    """The server process and its command pipe."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve, args=(child,), name="stripe-testserver")
        self._process.start()
        self.url: str = self._conn.recv()

    def ask(self, *command: Any) -> Any:
        self._conn.send(command)
        return self._conn.recv()

    def stop(self) -> None:
        if self._process.is_alive():
            with suppress(OSError, EOFError):
                self.ask("stop")
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()


def seed_cards(url: str, accounts: int) -> list[dict[str, str]]:
    """A customer with pm_card_visa attached for each account, through the server's API: the card columns of
    the account import."""
    local = threading.local()

    def post(path: str, data: dict[str, str]) -> dict[str, Any]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.trust_env = False
            session.headers["Authorization"] = f"Bearer {API_KEY}"
        response = session.post(url + path, data=data, timeout=30)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def one(n: int) -> dict[str, str]:
        customer = post("/v1/customers", {"email": f"billing@{account_id(n)}.example"})["id"]
        method = post("/v1/payment_methods/pm_card_visa/attach", {"customer": customer})
        card = method["card"]
        return {
            "stripe_customer": customer,
            "payment_method": method["id"],
            "card_brand": card["brand"],
            "card_last4": card["last4"],
            "card_exp": f"{card['exp_month']:02d}/{card['exp_year']}",
        }

    with ThreadPoolExecutor(SEED_THREADS) as pool:
        return list(pool.map(one, range(accounts)))


# --- the database -------------------------------------------------------------------------------------------


@contextmanager
def scratch_database(kind: str) -> Iterator[str]:
    """A fresh SQLite file under bench/out/ (removed afterwards), or a scratch PostgreSQL database."""
    if kind == "postgres":
        with c.scratch_database(kind, "charging") as url:
            yield url
        return
    OUT.mkdir(exist_ok=True)
    directory = tempfile.mkdtemp(prefix="charging-sqlite-", dir=OUT)
    try:
        yield f"sqlite:///{directory}/recharged.db"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def load_accounts(db: Database, settings: Any, clock: FixedClock, cards: list[dict[str, str]]) -> None:
    """The accounts, each with its card on file and an opening balance, then 30 days of usage that leave it
    at $1.00, under its threshold: every one is due."""
    c.create_bench_accounts(
        db, settings, clock, len(cards), account_id=account_id, opening_balance=OPENING, extra=lambda n: cards[n]
    )
    recorder = UsageRecorder(db, settings, clock)
    days = [(c.AT - timedelta(days=d)).strftime("%Y-%m-%dT10:00:00Z") for d in range(DAYS, 0, -1)]
    per_batch = max(1, 50_000 // DAYS)
    for first in range(0, len(cards), per_batch):
        events = [
            {
                "event_id": f"CA-{account_id(n)}-{d:02d}",
                "account_id": account_id(n),
                "kind": "dialer",
                "started_at": day,
                "duration_seconds": str(CALL_MINUTES * 60),
            }
            for n in range(first, min(first + per_batch, len(cards)))
            for d, day in enumerate(days)
        ]
        counts = summarize(recorder.record(events))
        if counts.get("accepted", 0) != len(events):
            raise RuntimeError(f"usage set-up: {counts}")


# --- the measured run ---------------------------------------------------------------------------------------


class TimedGateway:
    """The real gateway, with the time of each charge call (rate limiter wait and retries included)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.latencies: list[float] = []

    def charge(self, request: Any) -> Any:
        started = perf_counter()
        try:
            return self.inner.charge(request)
        finally:
            self.latencies.append(perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Sampler:
    """A wall-clock sampling profiler of the charge threads (what py-spy would show, without py-spy): every
    few milliseconds, where each thread is. A thread waiting for the GIL shows at the line it waits on."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.leaf: Counter[str] = Counter()  # innermost frame
        self.ours: Counter[str] = Counter()  # innermost frame in recharged/
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        names = {}
        while not self._stop.wait(self.interval):
            for thread in threading.enumerate():
                names[thread.ident] = thread.name
            for ident, frame in sys._current_frames().items():
                if not names.get(ident, "").startswith("charge"):
                    continue
                self.samples += 1
                self.leaf[_where(frame)] += 1
                inner = frame
                while inner is not None and "/recharged/" not in inner.f_code.co_filename:
                    inner = inner.f_back
                self.ours[_where(inner) if inner is not None else "?"] += 1

    def print(self, top: int) -> None:
        print(f"\nwall-clock samples of the charge threads: {self.samples:,}; innermost frame, top {top}:")
        for where, n in self.leaf.most_common(top):
            print(f"  {n / self.samples:6.1%}  {where}")
        print(f"innermost frame in recharged/, top {top}:")
        for where, n in self.ours.most_common(top):
            print(f"  {n / self.samples:6.1%}  {where}")


def _where(frame: Any) -> str:
    path = frame.f_code.co_filename
    short = path.split("/site-packages/")[-1].split("/recharged/")[-1]
    return f"{frame.f_code.co_name} ({short}:{frame.f_lineno})"


@contextmanager
def thread_profiles(enabled: bool) -> Iterator[list[cProfile.Profile]]:
    """cProfile in every thread started meanwhile (cProfile alone sees only the thread that enables it)."""
    profiles: list[cProfile.Profile] = []
    if not enabled:
        yield profiles
        return

    def start(*_args: Any) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()  # replaces this hook in the thread

    threading.setprofile(start)
    try:
        yield profiles
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]


class StatementCounter:
    """Counts the SQL statements and transactions the cycle sends, by the charge flow's step that sent them (the
    innermost function of recharged/recharge.py on the stack) and by the statement's first word: the cycle's
    cost in round trips, per charge. Walking the stack costs time: the figures, not the cycle's wall time, are
    the point of a counted run."""

    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()  # step -> statements
        self.transactions: Counter[str] = Counter()  # step -> transactions begun
        self.verbs: Counter[str] = Counter()  # step: first word of the statement -> statements
        self._lock = threading.Lock()

    def attach(self, engine: Any) -> None:
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "begin", self._begin)

    def detach(self, engine: Any) -> None:
        event.remove(engine, "before_cursor_execute", self._statement)
        event.remove(engine, "begin", self._begin)

    def _statement(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        step, verb = _step(), statement.lstrip().split(None, 1)[0].upper()
        if verb in ("BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK", "COMMIT"):
            verb = f"{verb} (transaction control)"
        with self._lock:
            self.verbs[f"{step}: {verb}"] += 1
            if not verb.endswith("(transaction control)"):  # SQLite's BEGIN IMMEDIATE; psycopg's BEGIN is no call
                self.statements[step] += 1

    def _begin(self, _conn: Any) -> None:
        step = _step()
        with self._lock:
            self.transactions[step] += 1

    def print(self, accounts: int) -> None:
        total, begun = sum(self.statements.values()), sum(self.transactions.values())
        print(
            f"\nstatements per charge: {total / accounts:.1f} ({total:,} in all, the cycle's planning and recovery "
            f"included; BEGIN and SAVEPOINT not counted); transactions per charge: {begun / accounts:.2f} ({begun:,})"
        )
        print("by step (statements / transactions per charge):")
        for step, n in self.statements.most_common():
            print(f"  {n / accounts:6.2f} / {self.transactions[step] / accounts:4.2f}  {step}")
        print("by step and statement:")
        for what, n in sorted(self.verbs.items()):
            print(f"  {n / accounts:6.2f}  {what}")


def _step() -> str:
    """The innermost function of recharged/recharge.py on this thread's stack: the step of the charge flow."""
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith("/recharged/recharge.py"):
            return str(frame.f_code.co_name)
        frame = frame.f_back
    return "?"


def bench_settings(server_url: str, args: argparse.Namespace) -> tuple[Any, int]:
    """The built-in settings pointed at the local server, with the bench's limiter and concurrency."""
    environ = {"RECHARGED_PAYMENTS__STRIPE_API_BASE": server_url}
    if args.max_rps is not None:
        environ["RECHARGED_PAYMENTS__MAX_REQUESTS_PER_SECOND"] = str(args.max_rps)
    settings = load_settings(None, environ=environ)
    return settings, args.concurrency or settings.daemon.charge_concurrency


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    code = c.code_fingerprint()
    result: dict[str, Any] = {"db": kind, "code": code}
    clock = FixedClock(c.AT)
    os.environ.setdefault("RECHARGED_STRIPE_API_KEY", API_KEY)
    server = StripeProcess()
    try:
        settings, concurrency = bench_settings(server.url, args)
        result |= {"concurrency": concurrency, "max_rps": settings.payments.max_requests_per_second}
        with scratch_database(kind) as url:
            db = Database(url, connections=concurrency + 24)  # as the daemon sizes its pool
            try:
                started = perf_counter()
                db.upgrade()
                cards = seed_cards(server.url, args.accounts)
                result["setup_cards_s"] = perf_counter() - started
                load_accounts(db, settings, clock, cards)
                result["setup_s"] = perf_counter() - started
                server.ask("limit", args.latency, args.rate_limit)

                log_path = OUT / f"charging-{kind}.log"
                with log_path.open("w") as log_file:
                    configure(LoggingSettings(level="info", format="json"), stream=log_file)
                    gateway = TimedGateway(stripe_gateway(settings, None, None))
                    service = RechargeService(db, settings, lambda: gateway, clock)
                    result["load_before"] = os.getloadavg()[0]
                    sampler = Sampler() if args.profile else None
                    counter = StatementCounter() if args.count_statements else None
                    if counter:
                        counter.attach(db.engine)
                    with thread_profiles(args.profile > 0) as profiles, c.CpuClock() as timing:
                        if sampler:
                            sampler.__enter__()
                        report = service.run_cycle(concurrency=concurrency)
                        if sampler:
                            sampler.__exit__()
                    if counter:
                        counter.detach(db.engine)
                    result["load_after"] = os.getloadavg()[0]
                result["log"] = str(log_path)
                result["wall_s"], result["cpu_s"] = timing.wall, timing.cpu
                result["summary"] = report.summary()
                result["errors"] = dict(list(report.errors.items())[:5])
                result["latencies"] = gateway.latencies
                result["retries"] = gateway.inner.retries
                result["server"] = server.ask("stats")
                result["checks"] = check(db, cards, result["server"])
                if counter:
                    print(f"\n[{kind}] SQL sent by the cycle, {args.accounts:,} charges:")
                    counter.print(args.accounts)
                if args.profile:
                    assert sampler is not None
                    sampler.print(args.profile)
                    stats = pstats.Stats(profiles[0], stream=sys.stdout)
                    for profile in profiles[1:]:
                        stats.add(profile)
                    print(f"\ncProfile of all threads ({kind}), top {args.profile} by own time:")
                    stats.sort_stats("tottime").print_stats(args.profile)
                    print(f"top {args.profile} by cumulative time:")
                    stats.sort_stats("cumulative").print_stats(args.profile)
            finally:
                db.close()
    finally:
        server.stop()
    c.check_code(code, kind)
    return result


def run_gateway_only(args: argparse.Namespace) -> dict[str, Any]:
    """The processor path alone: the same charges straight through StripeGateway (rate limiter, SDK, retries),
    `concurrency` at a time, no database: what the cycle could reach if charging cost nothing else."""
    from recharged.payments import ChargeRequest

    os.environ.setdefault("RECHARGED_STRIPE_API_KEY", API_KEY)
    server = StripeProcess()
    try:
        settings, concurrency = bench_settings(server.url, args)
        cards = seed_cards(server.url, args.accounts)
        server.ask("limit", args.latency, args.rate_limit)
        gateway = TimedGateway(stripe_gateway(settings, None, None))

        def charge(n: int) -> str:
            request = ChargeRequest(
                idempotency_key=f"bench-{os.getpid()}-{n}",
                customer=cards[n]["stripe_customer"],
                payment_method=cards[n]["payment_method"],
                amount_minor=20_160,
                currency="USD",
                description=f"bench charge {n}",
                metadata={"recharged_account": account_id(n)},
            )
            return str(gateway.charge(request).outcome)

        with c.CpuClock() as timing, ThreadPoolExecutor(concurrency, thread_name_prefix="charge") as pool:
            outcomes = Counter(pool.map(charge, range(args.accounts)))
        stats = server.ask("stats")
    finally:
        server.stop()
    ideal = args.accounts / args.rate_limit
    rows = [
        ("succeeded / other", f"{outcomes['succeeded']:,} / {sum(outcomes.values()) - outcomes['succeeded']}"),
        ("wall seconds / ideal / ratio", f"{timing.wall:.1f} / {ideal:.1f} / {timing.wall / ideal:.2f}"),
        ("concurrency / our limiter req/s", f"{concurrency} / {settings.payments.max_requests_per_second:g}"),
        ("requests the server saw", c.fmt_int(stats["requests"])),
        ("429s answered / inline retries", f"{stats['status_429']} / {gateway.inner.retries}"),
        ("busiest second of charges (server)", str(stats["busiest_second"])),
        ("charge call p50 / p99 ms", _ms(gateway.latencies)),
        ("CPU s of this process / server", f"{timing.cpu:.1f} / {stats['cpu_s']:.1f}"),
    ]
    c.print_table(f"gateway only: {args.accounts:,} charges, no database", ["", ""], rows)
    return stats


def check(db: Database, cards: list[dict[str, str]], server: dict[str, Any]) -> dict[str, Any]:
    """Each account: one finished recharge, one ledger credit, one succeeded PaymentIntent; and `verify`."""
    with db.transaction() as session:
        credits = Counter(
            dict(
                session.execute(
                    select(Entry.account_id, func.count())
                    .where(Entry.entry_type == "recharge")
                    .group_by(Entry.account_id)
                ).all()
            )
        )
        finished = Counter(
            dict(
                session.execute(
                    select(Recharge.account_id, func.count())
                    .where(Recharge.phase == "finished")
                    .group_by(Recharge.account_id)
                ).all()
            )
        )
    paid = server["succeeded_per_customer"]
    problems = []
    for n, card in enumerate(cards):
        account = account_id(n)
        counts = (credits[account], finished[account], paid.get(card["stripe_customer"], 0))
        if counts != (1, 1, 1):
            problems.append(f"{account}: {counts[0]} credits, {counts[1]} finished recharges, {counts[2]} paid")
    found = verify(db)
    return {"problems": problems, "verify": found.violations, "ok": not problems and found.ok}


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_db_argument(parser)
    parser.add_argument("--accounts", type=int, default=10_000, help="default: 10,000")
    parser.add_argument("--concurrency", type=int, default=None, help="default: daemon.charge_concurrency")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the server adds to each request")
    parser.add_argument("--rate-limit", type=float, default=100.0, help="the server's requests a second")
    parser.add_argument(
        "--max-rps", type=float, default=None, help="our rate limiter (default: payments.max_requests_per_second)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="sample and cProfile the cycle, print the top N"
    )
    parser.add_argument(
        "--count-statements",
        action="store_true",
        help="count the cycle's SQL statements and transactions per charge, by step (slows the cycle down)",
    )
    parser.add_argument(
        "--gateway-only", action="store_true", help="only the processor path: StripeGateway.charge, no database"
    )
    args = parser.parse_args(argv)
    if args.gateway_only:
        run_gateway_only(args)
        return
    print(
        f"charging: {args.accounts:,} due accounts, server latency {args.latency} s, rate limit {args.rate_limit:g}/s",
        flush=True,
    )
    results = []
    for kind in c.chosen(args.db):
        print(f"[{kind}] running...", flush=True)
        t = perf_counter()
        try:
            results.append(run(kind, args))
        except Exception:
            traceback.print_exc()
            raise
        print(f"[{kind}] done in {perf_counter() - t:.0f} s (set-up included)", flush=True)

    c.print_code([(r["db"], r["code"]) for r in results])
    ideal = args.accounts / args.rate_limit

    def col(fn: Any) -> list[str]:
        return [fn(r) for r in results]

    table = [
        ("accounts charged", *col(lambda r: c.fmt_int(r["summary"]["charged"]))),
        ("failed / errors / waiting", *col(lambda r: "{failed} / {errors} / {waiting}".format(**r["summary"]))),
        ("cycle seconds (wall)", *col(lambda r: f"{r['wall_s']:.1f}")),
        (f"ideal seconds (N / {args.rate_limit:g} req/s)", *col(lambda r: f"{ideal:.1f}")),
        ("ratio cycle / ideal (goal <= 1.5)", *col(lambda r: f"{r['wall_s'] / ideal:.2f}")),
        ("charges/s", *col(lambda r: f"{r['summary']['charged'] / r['wall_s']:.1f}")),
        ("concurrency / our limiter req/s", *col(lambda r: f"{r['concurrency']} / {r['max_rps']:g}")),
        ("requests the server saw", *col(lambda r: c.fmt_int(r["server"]["requests"]))),
        ("429s answered / inline retries", *col(lambda r: f"{r['server']['status_429']} / {r['retries']}")),
        ("busiest second of charges (server)", *col(lambda r: str(r["server"]["busiest_second"]))),
        ("charge call p50 / p99 ms", *col(lambda r: _ms(r["latencies"]))),
        ("CPU s of the cycle process / server", *col(lambda r: f"{r['cpu_s']:.1f} / {r['server']['cpu_s']:.1f}")),
        ("checks (1 PI, 1 credit, 1 recharge each; verify)", *col(lambda r: "ok" if r["checks"]["ok"] else "FAILED")),
        ("set-up seconds (cards / all)", *col(lambda r: f"{r['setup_cards_s']:.0f} / {r['setup_s']:.0f}")),
        ("load average before / after", *col(lambda r: f"{r['load_before']:.2f} / {r['load_after']:.2f}")),
    ]
    c.print_table(f"charging: one cycle over {args.accounts:,} due accounts", ["", *col(lambda r: r["db"])], table)
    for r in results:
        print(f"\n[{r['db']}] server requests by route and status: {r['server']['routes']}")
        if r["errors"]:
            print(f"[{r['db']}] first errors: {r['errors']}")
        if not r["checks"]["ok"]:
            print(f"[{r['db']}] problems: {r['checks']['problems'][:10]}; verify: {r['checks']['verify'][:10]}")
        print(f"[{r['db']}] charge log: {r['log']}")
    if not all(r["checks"]["ok"] for r in results):
        sys.exit(1)


def _ms(values: list[float]) -> str:
    return f"{percentile(values, 50) * 1000:.0f} / {percentile(values, 99) * 1000:.0f}"


if __name__ == "__main__":
    main()
