"""Shared pieces of the benchmarks: scratch databases, memory readings, child processes, tables.

Every measured phase runs in a fresh (spawned) child process, so that its peak RSS (ru_maxrss, a high-water
mark over the life of a process) is not hidden by what an earlier phase or another database allocated.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PG_ADMIN_URL = os.environ.get("RECHARGED_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)  # the fixed "now" of every benchmark
ACTOR = "Bench Runner"
DATABASES = ("sqlite", "postgres")


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both", help="default: both")


def chosen(db: str) -> list[str]:
    return list(DATABASES) if db == "both" else [db]


@contextmanager
def scratch_database(kind: str, label: str) -> Iterator[str]:
    """The URL of a new, empty database (a file under /tmp, or a PostgreSQL database), removed afterwards."""
    if kind == "sqlite":
        directory = tempfile.mkdtemp(prefix=f"recharged-bench-{label}-", dir="/tmp")
        try:
            yield f"sqlite:///{directory}/recharged.db"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    import psycopg

    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"recharged_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rss_mb() -> float:
    """The resident set size of this process now, in MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The highest resident set size this process has had, in MB (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def written_mb() -> float:
    """Bytes this process has passed to write() so far (wchar of /proc/self/io), in MB: for SQLite, the
    database file, its WAL and checkpoints."""
    with open("/proc/self/io") as handle:
        fields = dict(line.split(": ") for line in handle.read().splitlines())
    return int(fields["wchar"]) / 2**20


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Run function(*args) in a fresh spawned process and return its (picklable) result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def code_fingerprint() -> dict[str, Any]:
    """Which code is measured: HEAD, the uncommitted files of recharged/ and migrations/, and a digest of
    their current contents (read-only git commands; other people may be changing the code meanwhile)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("recharged/**/*.py"), *root.glob("migrations/**/*.py")]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "recharged", "migrations").splitlines()]
    return {
        "head": git("rev-parse", "--short", "HEAD").strip() or "?",
        "dirty": dirty,
        "digest": digest.hexdigest()[:12],
    }


def describe_code(fingerprint: dict[str, Any]) -> str:
    dirty = f" + uncommitted changes to {', '.join(fingerprint['dirty'])}" if fingerprint["dirty"] else ""
    return f"code: HEAD {fingerprint['head']}{dirty} (content digest {fingerprint['digest']})"


def print_code(measured: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """The code each database's run measured: once when all ran the same code."""
    if len({code["digest"] for _, code in measured}) == 1:
        print(describe_code(measured[0][1]))
        return
    for label, code in measured:
        print(f"[{label}] {describe_code(code)}")


def check_code(before: dict[str, Any], label: str) -> None:
    after = code_fingerprint()
    if after["digest"] != before["digest"]:
        print(f"WARNING [{label}]: the code changed during this run ({before['digest']} -> {after['digest']})")


class CpuClock:
    """Wall time, this process's CPU time (Python, driver and, for SQLite, the database itself) and MB written."""

    def __enter__(self) -> CpuClock:
        self._wall, self._cpu, self._written = time.perf_counter(), time.process_time(), written_mb()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self.written = written_mb() - self._written


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print(line)


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_s(value: float) -> str:
    return f"{value:.3f}"


def fmt_mb(value: float) -> str:
    return f"{value:,.1f}"


def create_bench_accounts(
    db: Any,
    settings: Any,
    clock: Any,
    count: int,
    *,
    account_id: Callable[[int], str],
    opening_balance: str,
    extra: Callable[[int], dict[str, str]] = lambda n: {},
) -> None:
    """`count` accounts on the standard plan with 20% VAT and auto-recharge on, created 90 days before AT,
    in batches of 2,000 through the same code as `accounts import`."""
    from datetime import timedelta

    from recharged.accounts import create_accounts, new_account

    created = (AT - timedelta(days=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for first in range(0, count, 2_000):
        batch = [
            new_account(
                {
                    "id": account_id(n),
                    "email": f"billing@{account_id(n)}.example",
                    "plan": "standard",
                    "vat_percent": "20",
                    "created_at": created,
                    "opening_balance": opening_balance,
                    "auto_recharge": "true",
                    **extra(n),
                },
                settings,
                clock.now(),
            )
            for n in range(first, min(first + 2_000, count))
        ]
        create_accounts(db, batch, ACTOR, clock)
