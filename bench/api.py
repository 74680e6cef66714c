"""The daemon's HTTP API under load: POST /v1/usage throughput and GET /v1/accounts/{id} latency.

    .venv/bin/python bench/api.py [--db sqlite|postgres|both] [--accounts N]

For each database (a fresh SQLite file under bench/out/, or a scratch PostgreSQL database, both removed at
the end): the accounts are created with `accounts.create_accounts` (a card on file, a balance far above any
threshold, so nothing is charged) and 30 days of usage through `UsageRecorder.record`; then a real
`recharged --config <tmp>/config.toml run` process starts (the local Stripe-compatible server in a process of
its own behind it, the daily cycle far away) and is measured from this process over HTTP:

1. POST /v1/usage, closed loop: `--clients` threads post batches of 100 and of 1000 new events as fast as the
   daemon answers; events/s, requests/s, p50/p99 of a request. Beside it, the limit: the same number of the
   ledger rows those events make, inserted by this process in batches of 1,000 (one transaction each) into a
   plain table with no key or index (`ingest.time_limit`, SQLAlchemy Core executemany), with the daemon idle.
2. GET /v1/accounts/{id} at a steady rate (50 and 200 requests/s), open loop: request i is due at
   start + i / rate, and its latency is counted from then, so a slow answer delays the ones behind it and
   shows in the figures instead of slowing the schedule down; once with nothing else running, once while
   `--clients` threads post batches of 100 events.

Finally SIGTERM, and the daemon must exit 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import quantiles
from time import perf_counter
from typing import Any

import _common as c
import requests
from charging import StripeProcess
from ingest import time_limit

from recharged.clock import SystemClock
from recharged.config import load_settings
from recharged.rating import rate_event
from recharged.store.engine import Database
from recharged.usage import UsageRecorder, summarize

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
TOKEN = "bench-token-0123456789abcdef"
DAYS = 30
TICKS = os.sysconf("SC_CLK_TCK")


def account_id(n: int) -> str:
    return f"acct-{n:05d}"


# --- set-up ---------------------------------------------------------------------------------------------------


@contextmanager
def scratch_database(kind: str) -> Iterator[tuple[str, Path]]:
    """A database URL and a scratch directory (config, outbox, log) under bench/out/, removed afterwards."""
    OUT.mkdir(exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"api-{kind}-", dir=OUT))
    try:
        if kind == "postgres":
            with c.scratch_database(kind, "api") as url:
                yield url, directory
        else:
            yield f"sqlite:///{directory}/recharged.db", directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def load_accounts(url: str, accounts: int, events_per_day: int) -> None:
    """Accounts with a card on file and $50,000 (never due), and 30 days of calls before today."""
    settings = load_settings(None, environ={})
    clock = SystemClock()
    db = Database(url)
    try:
        db.upgrade()
        now = clock.now()
        c.create_bench_accounts(
            db,
            settings,
            clock,
            accounts,
            account_id=account_id,
            opening_balance="50000.00",
            extra=lambda n: {
                "stripe_customer": f"cus_bench{n:05d}",
                "payment_method": f"pm_bench{n:05d}",
                "card_brand": "visa",
                "card_last4": "4242",
                "card_exp": "12/2030",
            },
        )
        rng = random.Random(1)
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        events = [
            {
                "event_id": f"CA-hist-{n}-{d}-{k}",
                "account_id": account_id(n),
                "kind": "dialer",
                "started_at": (today - timedelta(days=d, seconds=rng.randrange(86_400))).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "duration_seconds": str(rng.randint(5, 600)),
            }
            for n in range(accounts)
            for d in range(1, DAYS + 1)
            for k in range(events_per_day)
        ]
        recorder = UsageRecorder(db, settings, clock)
        for first in range(0, len(events), 50_000):
            counts = summarize(recorder.record(events[first : first + 50_000]))
            if counts.get("accepted", 0) != len(events[first : first + 50_000]):
                raise RuntimeError(f"usage set-up: {counts}")
    finally:
        db.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    """`recharged --config <dir>/config.toml run`, its log in <dir>/daemon.log."""

    def __init__(self, url: str, directory: Path, stripe_url: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = directory / "config.toml"
        config.write_text(
            f'[database]\nurl = "{url}"\n\n'
            f"[http]\nport = {self.port}\n\n"
            "[daemon]\ncycle_interval_hours = 24\ncycle_jitter_seconds = 0\n\n"
            f'[outbox]\nfolder = "{directory}/outbox"\njournal = "{directory}/outbox.journal"\n\n'
            '[logging]\nformat = "json"\n'
        )
        env = {
            **os.environ,
            "RECHARGED_API_TOKENS": TOKEN,
            "RECHARGED_STRIPE_API_KEY": "sk_test_x",
            "RECHARGED_PAYMENTS__STRIPE_API_BASE": stripe_url,
        }
        env.pop("NOTIFY_SOCKET", None)
        self.log_path = directory / "daemon.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "recharged"), "--config", str(config), "run"],
            cwd=directory,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Ready, and the start-up cycle (the first one runs at once) has finished."""
        deadline = time.monotonic() + timeout
        session = _session()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.process.returncode}; see {self.log_path}")
            try:
                if session.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    metrics = session.get(f"{self.base}/metrics", timeout=5).text
                    if 'recharged_cycles_total{outcome="succeeded"} 1.0' in metrics:
                        return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the daemon was not ready within {timeout:.0f} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the daemon process so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self._log.close()
                return None
        self._log.close()
        return self.process.returncode


# --- clients --------------------------------------------------------------------------------------------------


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    return session


class Local:
    """One requests.Session per client thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _session()
        return session


def usage_batch(size: int, accounts: int, rng: random.Random, now: datetime, hours: float = 24) -> dict[str, Any]:
    """`size` new dialer calls started in the last `hours` (`--started-within-hours`), for accounts picked at random.
    A call of an earlier UTC day than today's changes its account's usage window, so the daemon plans that account
    again after the batch (`recharged.thresholds`): a dialer posting each call as it ends sends few of those."""
    return {
        "events": [
            {
                "event_id": f"CA{uuid.uuid4().hex}",
                "account_id": account_id(rng.randrange(accounts)),
                "kind": "dialer",
                "started_at": (now - timedelta(seconds=rng.randrange(60, int(hours * 3600)))).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
                "duration_seconds": rng.randint(5, 600),
            }
            for _ in range(size)
        ]
    }


def ledger_rows(count: int, accounts: int, hours: float) -> list[dict[str, Any]]:
    """The `entries` rows `count` events of `usage_batch` make (rated at the standard plan's dialer rate)."""
    rate = load_settings(None, environ={}).plans["standard"].rate_table()["dialer"]
    now, rng = datetime.now(UTC), random.Random(7)
    rows = []
    for event in usage_batch(count, accounts, rng, now, hours)["events"]:
        rated = rate_event(rate, duration_seconds=event["duration_seconds"], quantity=None)
        rows.append(
            {
                "account_id": event["account_id"],
                "entry_type": "usage",
                "external_id": event["event_id"],
                "amount": -rated.cost,
                "occurred_at": datetime.fromisoformat(event["started_at"].replace("Z", "+00:00")),
                "recorded_at": now,
                "kind": "dialer",
                "duration_seconds": event["duration_seconds"],
                "quantity": None,
                "billable_quantity": rated.billable_quantity,
                "rate_id": 1,
                "note": None,
            }
        )
    return rows


def post_usage(
    base: str,
    batch: int,
    accounts: int,
    clients: int,
    *,
    events: int | None = None,
    stop: Any = None,
    hours: float = 24,
) -> dict[str, Any]:
    """Closed loop: `clients` threads post batches until `events` were sent (or `stop` is set)."""
    local = Local()
    left = itertools.count()
    budget = None if events is None else max(1, events // batch)
    latencies: list[float] = []
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0, "failed": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while stop is None or not stop.is_set():
            if budget is not None and next(left) >= budget:
                return
            body = json.dumps(usage_batch(batch, accounts, rng, datetime.now(UTC), hours))  # prepared before timing
            started = perf_counter()
            response = local.session.post(
                f"{base}/v1/usage", data=body, headers={"Content-Type": "application/json"}, timeout=120
            )
            took = perf_counter() - started
            with lock:
                latencies.append(took)
                if response.status_code != 200:
                    counts["failed"] += batch
                    continue
                result = response.json()
                for status in ("accepted", "duplicate", "rejected"):
                    counts[status] += result[status]

    started = perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = perf_counter() - started
    return {"wall_s": wall, "requests": len(latencies), "latencies": latencies, **counts}


def open_loop(base: str, rate: float, seconds: float, accounts: int, workers: int = 64) -> dict[str, Any]:
    """GET /v1/accounts/{id} for a random account, request i due at start + i / rate; latency from due time."""
    local = Local()
    total = int(rate * seconds)
    counter = itertools.count()
    latencies: list[float] = []
    service: list[float] = []
    failed = 0
    lock = threading.Lock()
    start = perf_counter() + 0.2

    def worker(seed: int) -> None:
        nonlocal failed
        rng = random.Random(seed)
        while (i := next(counter)) < total:
            due = start + i / rate
            delay = due - perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = perf_counter()
            response = local.session.get(f"{base}/v1/accounts/{account_id(rng.randrange(accounts))}", timeout=60)
            done = perf_counter()
            with lock:
                latencies.append(done - due)
                service.append(done - sent)
                if response.status_code != 200:
                    failed += 1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    wall = perf_counter() - start
    return {
        "rate": rate,
        "requests": total,
        "latencies": latencies,
        "service": service,
        "failed": failed,
        "wall_s": wall,
    }


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return quantiles(values, n=100, method="inclusive")[q - 1]


def ms(values: list[float]) -> str:
    return f"{pct(values, 50) * 1000:.1f} / {pct(values, 99) * 1000:.1f}"


# --- one database -------------------------------------------------------------------------------------------


def measured(daemon: DaemonProcess, what: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    cpu = daemon.cpu_seconds()
    result = what()
    result["daemon_cpu_s"] = daemon.cpu_seconds() - cpu
    return result


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    code = c.code_fingerprint()
    result: dict[str, Any] = {"db": kind, "code": code, "load_before": os.getloadavg()[0]}
    stripe = StripeProcess()
    try:
        with scratch_database(kind) as (url, directory):
            started = perf_counter()
            load_accounts(url, args.accounts, args.history_per_day)
            result["setup_s"] = perf_counter() - started
            daemon = DaemonProcess(url, directory, stripe.url)
            try:
                daemon.wait_ready()
                base, n = daemon.base, args.accounts
                for batch in (100, 1000):
                    print(f"[{kind}] POST /v1/usage, batches of {batch}...", flush=True)
                    result[f"usage_{batch}"] = measured(
                        daemon,
                        lambda b=batch: post_usage(
                            base, b, n, args.clients, events=args.events, hours=args.started_within_hours
                        ),
                    )
                for rate in args.rates:
                    print(f"[{kind}] GET /v1/accounts/{{id}} at {rate:g}/s, idle...", flush=True)
                    result[f"get_{rate:g}_idle"] = measured(daemon, lambda r=rate: open_loop(base, r, args.seconds, n))
                    print(f"[{kind}] GET /v1/accounts/{{id}} at {rate:g}/s, with usage being posted...", flush=True)
                    stop = threading.Event()
                    with ThreadPoolExecutor(1) as background:
                        posting = background.submit(
                            post_usage, base, 100, n, args.clients, stop=stop, hours=args.started_within_hours
                        )
                        time.sleep(1.0)
                        try:
                            result[f"get_{rate:g}_busy"] = measured(
                                daemon, lambda r=rate: open_loop(base, r, args.seconds, n)
                            )
                        finally:
                            stop.set()
                        result[f"get_{rate:g}_busy"]["usage"] = posting.result()
                rows = ledger_rows(result["usage_1000"]["accepted"], n, args.started_within_hours)
                result["limit_s"] = time_limit(url, rows, 1000, False).wall
                result["rss_mb"] = daemon.rss_mb()
            finally:
                result["exit_status"] = daemon.stop()
                log_copy = OUT / f"api-{kind}-daemon.log"
                shutil.copy(daemon.log_path, log_copy)
                result["log"] = str(log_copy)
            result["log_errors"] = sum(
                1 for line in daemon.log_path.read_text().splitlines() if '"level": "error"' in line
            )
    finally:
        stripe.stop()
    result["load_after"] = os.getloadavg()[0]
    c.check_code(code, kind)
    return result


def figures(r: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str]]:
    """One database's column of the table, as (label, value) rows."""
    rows = []
    for batch in (100, 1000):
        usage = r[f"usage_{batch}"]
        events = usage["accepted"]
        rows += [
            (f"POST /v1/usage x{batch}: events/s", c.fmt_int(events / usage["wall_s"])),
            ("  requests/s; p50 / p99 ms", f"{usage['requests'] / usage['wall_s']:.1f}; {ms(usage['latencies'])}"),
            ("  daemon CPU ms per 1000 events", f"{usage['daemon_cpu_s'] / events * 1e6:.0f}"),
            ("  accepted / rejected / failed", f"{events:,} / {usage['rejected']} / {usage['failed']}"),
        ]
        if batch == 1000:
            rate = events / usage["wall_s"]
            limit = events / r["limit_s"]
            rows += [
                ("  limit: bare insert of the same rows, rows/s", c.fmt_int(limit)),
                ("  ratio POST /v1/usage x1000 / bare insert", f"{rate / limit:.1%}"),
            ]
    for rate in args.rates:
        for mode in ("idle", "busy"):
            run = r[f"get_{rate:g}_{mode}"]
            meanwhile = "nothing else" if mode == "idle" else f"{args.clients} clients posting x100"
            rows += [
                (f"GET /v1/accounts at {rate:g}/s, {meanwhile}: p50 / p99 ms", ms(run["latencies"])),
                ("  service time only: p50 / p99 ms", ms(run["service"])),
                ("  achieved req/s; failed", f"{run['requests'] / run['wall_s']:.1f}; {run['failed']}"),
                ("  daemon CPU, share of one core", f"{run['daemon_cpu_s'] / run['wall_s']:.0%}"),
            ]
            if mode == "busy":
                rows.append(
                    ("  usage meanwhile: events/s", c.fmt_int(run["usage"]["accepted"] / run["usage"]["wall_s"]))
                )
    return [
        *rows,
        ("daemon RSS at the end, MB", c.fmt_mb(r["rss_mb"])),
        ("exit status after SIGTERM (want 0)", str(r["exit_status"])),
        ("error lines in the daemon log", str(r["log_errors"])),
        ("set-up seconds", f"{r['setup_s']:.0f}"),
        ("load average before / after", f"{r['load_before']:.2f} / {r['load_after']:.2f}"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_db_argument(parser)
    parser.add_argument("--accounts", type=int, default=1_000, help="default: 1,000")
    parser.add_argument("--history-per-day", type=int, default=3, help="calls a day per account before today")
    parser.add_argument("--events", type=int, default=100_000, help="events posted per batch size (default 100,000)")
    parser.add_argument("--clients", type=int, default=4, help="client threads posting usage (default 4)")
    parser.add_argument("--rates", type=float, nargs="+", default=[50.0, 200.0], help="GET rates, requests/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of each GET run (default 20)")
    parser.add_argument(
        "--started-within-hours",
        type=float,
        default=24.0,
        help="posted calls started within this many hours before now (default 24: many of an earlier UTC day)",
    )
    args = parser.parse_args(argv)
    print(
        f"api: {args.accounts:,} accounts, {args.events:,} events per batch size, {args.clients} client threads, "
        f"GET at {', '.join(f'{r:g}' for r in args.rates)}/s for {args.seconds:g} s",
        flush=True,
    )
    results = []
    for kind in c.chosen(args.db):
        print(f"[{kind}] running...", flush=True)
        t = perf_counter()
        results.append(run(kind, args))
        print(f"[{kind}] done in {perf_counter() - t:.0f} s (set-up included)", flush=True)

    c.print_code([(r["db"], r["code"]) for r in results])
    columns = [figures(r, args) for r in results]
    rows = [(label, *(column[i][1] for column in columns)) for i, (label, _) in enumerate(columns[0])]
    c.print_table(f"api: recharged run, {args.accounts:,} accounts", ["", *(r["db"] for r in results)], rows)
    for r in results:
        print(f"[{r['db']}] daemon log: {r['log']}")
    if any(r["exit_status"] != 0 for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
