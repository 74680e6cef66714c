"""Engine and session set-up, migrations, and the statements recharged runs: the only module that writes SQL.

SQLite runs in WAL mode and every transaction starts with BEGIN IMMEDIATE, so writers queue instead of
failing half-way. On PostgreSQL, writers lock the accounts they touch (in id order, so they cannot
deadlock) before changing balances, and balances change by `balance = balance + delta`, never by a value
read earlier, so no update is lost.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, and_, create_engine, event, func, insert, literal_column, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from recharged.clock import midnight
from recharged.errors import DatabaseError
from recharged.models import (
    Account,
    ChargeAttempt,
    DailyUsage,
    Entry,
    FundingSource,
    JobRun,
    Rate,
    Recharge,
    WebhookEvent,
)

_BUSY_TIMEOUT_SECONDS = 30  # how long SQLite waits for another writer before giving up
CHARGE_TYPES = ("recharge",)  # what the spend caps count: automatic recharges


def normalize_url(url: str) -> str:
    """Accept postgres:// and postgresql:// and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def masked_url(url: str) -> str:
    return make_url(normalize_url(url)).render_as_string(hide_password=True)


def make_engine(url: str, connections: int | None = None) -> Engine:
    """An engine configured for recharged: WAL and BEGIN IMMEDIATE on SQLite, pre-ping on PostgreSQL.
    `connections`: how many threads may hold a connection at once (the daemon's charge workers and HTTP
    threads); SQLAlchemy's default pool allows 15."""
    url = normalize_url(url)
    pool: dict[str, Any] = {}
    if connections is not None:
        pool = {"pool_size": min(connections, 10), "max_overflow": max(0, connections - 10), "pool_timeout": 60}
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not Path(database).parent.exists():
            raise DatabaseError(f"database {url}: directory {Path(database).parent} does not exist")
        engine = create_engine(url, connect_args={"timeout": _BUSY_TIMEOUT_SECONDS}, **pool)

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_SECONDS * 1000}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            read_only = connection.get_execution_options().get(READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, **pool)
    raise DatabaseError(f"database {masked_url(url)}: only sqlite:// and postgresql:// are supported")


READ_ONLY = "recharged_read_only"  # execution option: begin SQLite's transaction deferred


def migrations_dir() -> Path:
    """Alembic scripts: inside the installed package, or the repository's migrations/ in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise DatabaseError("the migrations folder is missing from this installation")


class Database:
    """One database: its engine, transactions and schema version."""

    def __init__(self, url: str, connections: int | None = None) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, connections)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite lets one transaction at a time write, and every transaction here is a writer (BEGIN IMMEDIATE).
        # Its busy handler waits by sleeping, longer each time (up to 100 ms), so threads of one process that
        # wait for it leave the database idle between turns. They queue on this lock instead, and the next one
        # starts the moment the last one ends; other processes still meet SQLite's lock and busy timeout.
        self._writer = threading.Lock() if self.dialect == "sqlite" else None
        self._writing: dict[int, int] = {}  # thread id -> transactions open in that thread

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self._writer_turn():
            try:
                with self._sessions.begin() as session:
                    yield session
            except OperationalError as exc:
                raise DatabaseError(f"database {masked_url(self.url)}: {exc.orig}") from exc

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """On SQLite, wait for this process's turn to write (a transaction nested in the same thread takes none;
        after the busy timeout the wait is left to SQLite, as it was)."""
        if self._writer is None:
            yield
            return
        thread = threading.get_ident()
        depth = self._writing.get(thread, 0)
        queued = depth == 0 and self._writer.acquire(timeout=_BUSY_TIMEOUT_SECONDS)
        self._writing[thread] = depth + 1
        try:
            yield
        finally:
            if depth:
                self._writing[thread] = depth
            else:
                del self._writing[thread]
            if queued:
                self._writer.release()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reading only, rolled back at the end. On SQLite it takes no write lock (a deferred
        transaction: in WAL mode readers see one snapshot and never hold up the writer), so `verify`, `plan`,
        `status`, health probes and account reads never stall usage recording or charging."""
        try:
            with self.engine.connect() as connection:
                connection.execution_options(**{READ_ONLY: True})
                with Session(bind=connection, expire_on_commit=False) as session:
                    yield session  # closing ends the transaction; what was read stays loaded
        except OperationalError as exc:
            raise DatabaseError(f"database {masked_url(self.url)}: {exc.orig}") from exc

    def _alembic(self) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        return config

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic()).get_current_head()
        assert head is not None
        return head

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as connection:
                return MigrationContext.configure(connection).get_current_revision()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database {masked_url(self.url)}: {getattr(exc, 'orig', exc)}") from exc

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the database to the newest schema; returns (revision before, revision after)."""
        from alembic import command

        before = self.current_revision()
        config = self._alembic()
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        return before, self.head_revision()

    def require_current(self) -> None:
        """Refuse to work on a database that is missing or not at the newest schema."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            state = "has no recharged schema" if current is None else f"is at schema {current}, not {head}"
            raise DatabaseError(f"database {masked_url(self.url)} {state}: run `recharged db upgrade`")

    def close(self) -> None:
        self.engine.dispose()


# --- statements -------------------------------------------------------------------------------------------


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


@dataclass(frozen=True, slots=True)
class AccountRef:
    id: str
    plan: str
    currency: str


def lock_accounts(session: Session, ids: Iterable[str]) -> dict[str, AccountRef]:
    """The named accounts that exist, locked for update in id order (PostgreSQL; SQLite holds the write lock).

    On the usage hot path: one statement with the ids as a single array parameter."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    dialect, raw = _driver(session)
    cursor = raw.cursor()
    try:
        if dialect == "sqlite":
            cursor.execute(
                "SELECT id, plan, currency FROM accounts WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                (json.dumps(wanted),),
            )
        else:
            cursor.execute(
                "SELECT id, plan, currency FROM accounts WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (wanted,)
            )
        return {row[0]: AccountRef(row[0], row[1], row[2]) for row in cursor.fetchall()}
    finally:
        cursor.close()


def rate_id(session: Session, plan: str, kind: str, values: Mapping[str, Any]) -> int:
    """The id of this rate snapshot, created if it is new."""
    key = {"plan": plan, "kind": kind, **values}
    session.execute(_insert(session, Rate.__table__).values(key).on_conflict_do_nothing())
    conditions = [getattr(Rate, name) == value for name, value in key.items()]
    return session.execute(select(Rate.id).where(and_(*conditions))).scalar_one()


def existing_entries(session: Session, entry_type: str, external_ids: Iterable[str]) -> dict[str, Entry]:
    ids = sorted(set(external_ids))
    if not ids:
        return {}
    rows = session.scalars(select(Entry).where(Entry.entry_type == entry_type, Entry.external_id.in_(ids)))
    return {entry.external_id: entry for entry in rows}


def post_entry(
    session: Session,
    account_id: str,
    entry_type: str,
    external_id: str,
    amount: int,
    at: datetime,
    note: str | None = None,
    *,
    recorded_at: datetime | None = None,
) -> bool:
    """Post one non-usage entry (opening balance, adjustment, recharge or top-up credit) and move the cached
    balance with it, once: False, and no change, when (entry_type, external_id) is already in the ledger."""
    inserted = session.execute(
        _insert(session, Entry.__table__)
        .values(
            account_id=account_id,
            entry_type=entry_type,
            external_id=external_id,
            amount=amount,
            occurred_at=at,
            recorded_at=recorded_at or at,
            note=note,
        )
        .on_conflict_do_nothing(index_elements=["entry_type", "external_id"])
        .returning(Entry.id)
    ).scalar_one_or_none()
    if inserted is None:
        return False
    session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(balance=Account.balance + amount)
        .execution_options(synchronize_session=False)
    )
    return True


def usage_totals(session: Session, start: date, end: date, account_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Cost of usage per account over the UTC days [start, end): one GROUP BY over the daily totals."""
    query = (
        select(DailyUsage.account_id, func.sum(DailyUsage.amount))
        .where(DailyUsage.day >= start, DailyUsage.day < end)
        .group_by(DailyUsage.account_id)
    )
    if account_ids is not None:
        query = query.where(DailyUsage.account_id.in_(account_ids))
    return {account: int(total) for account, total in session.execute(query)}


def charged_since(
    session: Session, since: datetime, until: datetime, ids: Sequence[str] | None = None
) -> dict[str, int]:
    """Amounts credited by automatic recharges per account in [since, until) (for the spend caps)."""
    query = (
        select(Entry.account_id, func.sum(Entry.amount))
        .where(Entry.entry_type.in_(CHARGE_TYPES), Entry.occurred_at >= since, Entry.occurred_at < until)
        .group_by(Entry.account_id)
    )
    if ids is not None:
        query = query.where(Entry.account_id.in_(ids))
    return {account: int(total) for account, total in session.execute(query)}


def plan_rows(session: Session, ids: Sequence[str] | None = None, chunk: int = 5_000) -> Iterator[Any]:
    """The account columns a recharge decision needs, streamed in id order (plain rows, no ORM objects)."""
    query = select(
        Account.id,
        Account.currency,
        Account.balance,
        Account.created_at,
        Account.first_usage_at,
        Account.auto_recharge,
        Account.recharge_state,
        Account.retry_at,
        *(getattr(Account, name) for name in POLICY_COLUMNS),
    ).order_by(Account.id)
    if ids is not None:
        query = query.where(Account.id.in_(ids))
    yield from session.execute(query.execution_options(yield_per=chunk))


POLICY_COLUMNS = (
    "window_days",
    "threshold_days",
    "recharge_days",
    "min_threshold",
    "min_recharge",
    "max_recharge",
    "max_charged_per_day",
    "max_charged_per_30_days",
)


def window_lengths(session: Session, default: int, ids: Sequence[str] | None = None) -> list[int]:
    """The distinct averaging windows in use (accounts may override the configured one)."""
    query = select(func.coalesce(Account.window_days, default)).distinct()
    if ids is not None:
        query = query.where(Account.id.in_(ids))
    return sorted(int(days) for days in session.scalars(query))


def balance_mismatches(session: Session) -> list[tuple[str, int, int]]:
    """Accounts whose cached balance differs from the sum of their ledger entries: (id, cached, sum)."""
    sums = select(Entry.account_id, func.sum(Entry.amount).label("total")).group_by(Entry.account_id).subquery()
    total = func.coalesce(sums.c.total, 0)
    query = (
        select(Account.id, Account.balance, total)
        .outerjoin(sums, sums.c.account_id == Account.id)
        .where(Account.balance != total)
        .order_by(Account.id)
    )
    return [(row[0], int(row[1]), int(row[2])) for row in session.execute(query)]


def usage_entries_with_rates(session: Session, chunk: int = 20_000) -> Iterator[Any]:
    """Every usage entry with the rate snapshot that priced it (NULL rate: pre-rated), streamed."""
    query = (
        select(
            Entry.external_id,
            Entry.account_id,
            Entry.kind,
            Entry.occurred_at,
            Entry.duration_seconds,
            Entry.quantity,
            Entry.billable_quantity,
            Entry.amount,
            Entry.rate_id,
            Rate.measure,
            Rate.price,
            Rate.increment_seconds,
            Rate.minimum_seconds,
            Rate.connect_fee,
            Rate.unit,
        )
        .outerjoin(Rate, Rate.id == Entry.rate_id)
        .where(Entry.entry_type == "usage")
    )
    yield from session.execute(query.execution_options(yield_per=chunk))


def daily_usage_rows(session: Session) -> Iterator[Any]:
    yield from session.execute(select(DailyUsage).execution_options(yield_per=20_000)).scalars()


def first_usage_times(session: Session) -> dict[str, datetime | None]:
    return {row.id: row.first_usage_at for row in session.execute(select(Account.id, Account.first_usage_at))}


# --- charging -----------------------------------------------------------------------------------------------


def insert_recharge(session: Session, values: Mapping[str, Any]) -> int | None:
    """Claim a recharge; None when the account already has an open one (the partial unique index says so)."""
    try:
        with session.begin_nested():
            recharge_id = session.execute(insert(Recharge).values(**values).returning(Recharge.id)).scalar_one()
    except IntegrityError:
        return None
    return int(recharge_id)


def lock_account(session: Session, account_id: str) -> Account | None:
    """Lock an account row for update (PostgreSQL; SQLite holds the write lock already)."""
    return session.execute(select(Account).where(Account.id == account_id).with_for_update()).scalar_one_or_none()


def lock_recharge(session: Session, recharge_id: int, account_id: str | None = None) -> Recharge:
    """Lock a recharge for a phase change: its account row first, then the recharge. Every transaction that
    changes a recharge takes the locks in this order, as claiming does, so they cannot deadlock. `account_id`
    is the recharge's account when the caller knows it (it never changes), saving a query."""
    if account_id is None:
        account_id = session.execute(select(Recharge.account_id).where(Recharge.id == recharge_id)).scalar_one()
    lock_account(session, account_id)
    recharge = session.execute(select(Recharge).where(Recharge.id == recharge_id).with_for_update()).scalar_one()
    return recharge


def take_lease(session: Session, recharge_id: int, now: datetime, until: datetime) -> bool:
    """Hold an open recharge while talking to the processor; False when another worker holds it."""
    result = session.execute(
        update(Recharge)
        .where(
            Recharge.id == recharge_id,
            Recharge.phase == "charging",
            (Recharge.lease_until.is_(None)) | (Recharge.lease_until < now),
        )
        .values(lease_until=until)
        .execution_options(synchronize_session=False)
    )
    return bool(cast(Any, result).rowcount)


def settle_attempt(session: Session, attempt_id: int, values: Mapping[str, Any]) -> bool:
    """Record an attempt's outcome once: False when another worker already did."""
    result = session.execute(
        update(ChargeAttempt)
        .where(ChargeAttempt.id == attempt_id, ChargeAttempt.status == "pending")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(cast(Any, result).rowcount)


def pending_attempt(session: Session, recharge_id: int) -> ChargeAttempt | None:
    return session.scalars(
        select(ChargeAttempt).where(ChargeAttempt.recharge_id == recharge_id, ChargeAttempt.status == "pending")
    ).one_or_none()


def candidate_sources(
    session: Session, account_id: str, recharge_id: int, now: datetime, cooldown: timedelta, max_declines_30d: int
) -> list[FundingSource]:
    """Usable sources in charging order (default first), minus those this recharge tried and those resting
    after declines (at most `max_declines_30d` declines in 30 days, none within `cooldown`)."""
    tried = select(ChargeAttempt.source_id).where(ChargeAttempt.recharge_id == recharge_id)
    declines_30d = (
        select(func.count())
        .where(
            ChargeAttempt.source_id == FundingSource.id,
            ChargeAttempt.status == "declined",
            ChargeAttempt.created_at >= now - timedelta(days=30),
        )
        .scalar_subquery()
    )
    last_decline = (
        select(func.max(ChargeAttempt.created_at))
        .where(ChargeAttempt.source_id == FundingSource.id, ChargeAttempt.status == "declined")
        .scalar_subquery()
    )
    query = (
        select(FundingSource)
        .where(
            FundingSource.account_id == account_id,
            FundingSource.removed_at.is_(None),
            FundingSource.unusable_reason.is_(None),
            FundingSource.id.not_in(tried),
            declines_30d < max_declines_30d,
            (last_decline.is_(None)) | (last_decline < now - cooldown),
        )
        .order_by(FundingSource.is_default.desc(), FundingSource.id)
    )
    return list(session.scalars(query))


def open_recharge_ids(session: Session, now: datetime, idle_since: datetime | None = None) -> list[int]:
    """Recharges left in an intermediate phase whose lease (if any) has run out, oldest first; with
    `idle_since`, only those not changed since then."""
    query = (
        select(Recharge.id)
        .where(Recharge.phase.not_in(("finished", "failed")))
        .where((Recharge.lease_until.is_(None)) | (Recharge.lease_until < now))
        .order_by(Recharge.id)
    )
    if idle_since is not None:
        query = query.where(Recharge.updated_at < idle_since)
    return list(session.scalars(query))


# --- the daemon: job runs and webhook events --------------------------------------------------------------


def start_job_run(session: Session, job: str, instance: str, at: datetime) -> int:
    run = JobRun(job=job, instance=instance, status="running", started_at=at)
    session.add(run)
    session.flush()
    return run.id


def finish_job_run(
    session: Session, run_id: int, status: str, at: datetime, summary: Mapping[str, Any] | None, error: str | None
) -> None:
    session.execute(
        update(JobRun)
        .where(JobRun.id == run_id)
        .values(status=status, finished_at=at, summary=dict(summary) if summary else None, error=error)
    )


def last_job_run(session: Session, job: str, status: str | None = None) -> JobRun | None:
    query = select(JobRun).where(JobRun.job == job)
    if status is not None:
        query = query.where(JobRun.status == status)
    return session.scalars(query.order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(1)).first()


def running_job_runs(session: Session) -> list[JobRun]:
    return list(session.scalars(select(JobRun).where(JobRun.status == "running")))


def record_webhook_event(session: Session, values: Mapping[str, Any]) -> bool:
    """Remember a handled processor event; False when its id was handled before."""
    try:
        with session.begin_nested():
            session.execute(insert(WebhookEvent).values(**values))
    except IntegrityError:
        return False
    return True


def webhook_event_seen(session: Session, event_id: str) -> bool:
    return session.get(WebhookEvent, event_id) is not None


def recharge_of_payment(session: Session, payment_intent: str, recharge_hint: str | None) -> int | None:
    """The recharge a PaymentIntent belongs to: by the id recorded on the recharge or one of its attempts, or
    by the recharge id our metadata carries (an answer we never received)."""
    found = session.scalar(select(Recharge.id).where(Recharge.payment_intent == payment_intent))
    if found is None:
        found = session.scalar(
            select(ChargeAttempt.recharge_id).where(ChargeAttempt.payment_intent == payment_intent).limit(1)
        )
    if found is None and recharge_hint is not None and recharge_hint.isdigit():
        found = session.scalar(select(Recharge.id).where(Recharge.id == int(recharge_hint)))
    return None if found is None else int(found)


CLAIM_LOCK_SPACE = 0x52435244  # "RCRD": the advisory-lock key space of recharge claims


def try_claim_lock(session: Session, account_id: str, *, wait: bool) -> bool:
    """The right to claim a recharge for an account, until the transaction ends: on PostgreSQL a
    transaction-level advisory lock, so instances working through the same due accounts pass over the one
    another instance is claiming at that moment (without `wait`) instead of queueing behind it. SQLite has
    one writer at a time already."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    statement = f"SELECT {function}(:space, hashtext(:account))"
    result = session.execute(text(statement), {"space": CLAIM_LOCK_SPACE, "account": account_id}).scalar()
    return True if wait else bool(result)


def mark_due(session: Session, account_ids: Sequence[str], at: datetime) -> None:
    """Note when each account fell under its threshold (kept until its balance is credited)."""
    waiting = sorted(
        session.scalars(select(Account.id).where(Account.id.in_(account_ids), Account.due_since.is_(None)))
    )
    for account_id in waiting:  # one row at a time, in id order: the lock order of every writer
        session.execute(
            update(Account)
            .where(Account.id == account_id, Account.due_since.is_(None))
            .values(due_since=at)
            .execution_options(synchronize_session=False)
        )


def accounts_with_open_recharge(session: Session, ids: Sequence[str] | None = None) -> set[str]:
    query = select(Recharge.account_id).where(Recharge.phase.not_in(("finished", "failed")))
    if ids is not None:
        query = query.where(Recharge.account_id.in_(ids))
    return set(session.scalars(query))


def accounts_with_usable_source(session: Session, ids: Sequence[str] | None = None) -> set[str]:
    query = select(FundingSource.account_id).where(
        FundingSource.removed_at.is_(None), FundingSource.unusable_reason.is_(None)
    )
    if ids is not None:
        query = query.where(FundingSource.account_id.in_(ids))
    return set(session.scalars(query.distinct()))


def attempts_of(session: Session, recharge_id: int) -> int:
    query = select(func.count()).select_from(ChargeAttempt).where(ChargeAttempt.recharge_id == recharge_id)
    return int(session.scalar(query) or 0)


# --- the usage hot path ---------------------------------------------------------------------------------------
# Usage arrives by the million, so a batch is written with a few set-based statements through the driver
# itself: SQLAlchemy's per-row parameter processing would cost more than the database's own work.
# A usage row is (account_id, external_id, amount, occurred_at, recorded_at, kind, duration_seconds,
# quantity, billable_quantity, rate_id), in external_id order.

UsageRow = tuple[str, str, int, datetime, datetime, str, int | None, int | None, int, int | None]
_USAGE_COLUMNS = (
    "account_id, external_id, amount, occurred_at, recorded_at, kind, duration_seconds, quantity, "
    "billable_quantity, rate_id"
)


def _sqlite_time(value: datetime) -> str:
    """The text SQLAlchemy's SQLite DATETIME stores (naive UTC), so raw writes read back the same."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _driver(session: Session) -> tuple[str, Any]:
    connection = session.connection()
    return connection.dialect.name, connection.connection.dbapi_connection


_DAILY_UPSERT = (
    "ON CONFLICT (account_id, day, kind) DO UPDATE SET events = daily_usage.events + excluded.events, "
    "quantity = daily_usage.quantity + excluded.quantity, amount = daily_usage.amount + excluded.amount"
)


def record_usage(session: Session, rows: Sequence[UsageRow]) -> set[str]:
    """Insert usage entries, skipping event ids already recorded, and add exactly the inserted ones to the
    per-day totals and the balances (with the earliest usage time). Returns the event ids inserted.

    Rows with a key in common are written in key order, so concurrent writers lock them in one order."""
    if not rows:
        return set()
    dialect, raw = _driver(session)
    cursor = raw.cursor()
    try:
        if dialect == "sqlite":
            return _record_usage_sqlite(cursor, rows)
        cursor.execute(
            f"""
            WITH new AS (
                INSERT INTO entries (entry_type, {_USAGE_COLUMNS})
                SELECT 'usage', {_USAGE_COLUMNS} FROM unnest(%s::text[], %s::text[], %s::bigint[],
                    %s::timestamptz[], %s::timestamptz[], %s::text[], %s::integer[], %s::bigint[], %s::bigint[],
                    %s::bigint[]) AS v({_USAGE_COLUMNS})
                ORDER BY external_id
                ON CONFLICT (entry_type, external_id) DO NOTHING
                RETURNING account_id, external_id, amount, occurred_at, kind, billable_quantity
            ), daily AS (
                INSERT INTO daily_usage (account_id, day, kind, events, quantity, amount)
                SELECT account_id, (occurred_at AT TIME ZONE 'UTC')::date, kind, count(*), sum(billable_quantity),
                    -sum(amount)
                FROM new GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                {_DAILY_UPSERT}
            ), balance AS (
                UPDATE accounts AS a SET balance = a.balance + t.delta,
                    first_usage_at = LEAST(a.first_usage_at, t.first)
                FROM (SELECT account_id, sum(amount) AS delta, min(occurred_at) AS first FROM new GROUP BY account_id)
                    AS t
                WHERE a.id = t.account_id
            )
            SELECT external_id FROM new
            """,
            [list(column) for column in zip(*rows, strict=True)],
        )
        return {row[0] for row in cursor.fetchall()}
    finally:
        cursor.close()


def _record_usage_sqlite(cursor: Any, rows: Sequence[UsageRow]) -> set[str]:
    # SQLite runs one writer at a time (BEGIN IMMEDIATE): the rows above the largest id before the insert are
    # exactly the ones this insert added, so the totals can be summed from them by SQLite itself.
    cursor.execute(
        "CREATE TEMP TABLE IF NOT EXISTS staged_usage (account_id TEXT, external_id TEXT, amount INTEGER, "
        "occurred_at TEXT, recorded_at TEXT, kind TEXT, duration_seconds INTEGER, quantity INTEGER, "
        "billable_quantity INTEGER, rate_id INTEGER)"
    )
    recorded_at = _sqlite_time(rows[0][4])
    cursor.executemany(
        "INSERT INTO staged_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(r[0], r[1], r[2], _sqlite_time(r[3]), recorded_at, *r[5:]) for r in rows],
    )
    before = cursor.execute("SELECT coalesce(max(id), 0) FROM entries").fetchone()[0]
    cursor.execute(
        f"INSERT INTO entries (entry_type, {_USAGE_COLUMNS}) SELECT 'usage', {_USAGE_COLUMNS} "
        "FROM staged_usage WHERE true ORDER BY external_id "
        "ON CONFLICT (entry_type, external_id) DO NOTHING RETURNING external_id"
    )
    inserted = {row[0] for row in cursor.fetchall()}
    cursor.execute("DELETE FROM staged_usage")
    if not inserted:
        return inserted
    cursor.execute(
        "INSERT INTO daily_usage (account_id, day, kind, events, quantity, amount) "
        "SELECT account_id, date(occurred_at), kind, count(*), sum(billable_quantity), -sum(amount) "
        "FROM entries WHERE id > ? AND entry_type = 'usage' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 "
        f"{_DAILY_UPSERT}",
        (before,),
    )
    cursor.execute(
        "UPDATE accounts SET balance = balance + t.delta, first_usage_at = CASE "
        "WHEN first_usage_at IS NULL OR t.first < first_usage_at THEN t.first ELSE first_usage_at END "
        "FROM (SELECT account_id, sum(amount) AS delta, min(occurred_at) AS first FROM entries "
        "WHERE id > ? AND entry_type = 'usage' GROUP BY account_id) AS t WHERE accounts.id = t.account_id",
        (before,),
    )
    return inserted


def recharge_credit_problems(session: Session) -> list[str]:
    """Charging invariants: every credited recharge has exactly its ledger credit, every charge credit
    belongs to a credited recharge, and no recharge has more than one succeeded attempt."""
    credit_types = ("recharge", "topup")
    credited = select(Recharge).where(Recharge.phase.in_(("credited", "finished")))
    credits = {e.external_id: e for e in session.scalars(select(Entry).where(Entry.entry_type.in_(credit_types)))}
    problems = []
    for recharge in session.scalars(credited):
        entry = credits.pop(recharge.payment_intent or "", None)
        if entry is None:
            problems.append(
                f"recharge {recharge.id}: {recharge.phase} but no ledger credit for {recharge.payment_intent}"
            )
        elif (entry.account_id, entry.amount) != (recharge.account_id, recharge.amount):
            problems.append(
                f"recharge {recharge.id}: credit {entry.external_id} is {entry.amount} to {entry.account_id}"
            )
    problems += [f"credit {pi}: no credited recharge paid by it" for pi in credits]
    doubles = session.execute(
        select(ChargeAttempt.recharge_id, func.count())
        .where(ChargeAttempt.status == "succeeded")
        .group_by(ChargeAttempt.recharge_id)
        .having(func.count() > 1)
    )
    problems += [f"recharge {recharge_id}: {n} succeeded attempts" for recharge_id, n in doubles]
    return problems


def recharge_phase_problems(session: Session) -> list[str]:
    """Each recharge's phase agrees with its attempts: charging has exactly one pending attempt and nothing
    else has one; paid, credited and finished have one succeeded attempt for their PaymentIntent; failed and
    claimed have none; an account's recharge state has the fields it needs."""
    problems: list[str] = []
    attempts: dict[int, list[ChargeAttempt]] = {}
    for attempt in session.scalars(select(ChargeAttempt)):
        attempts.setdefault(attempt.recharge_id, []).append(attempt)
    for recharge in session.scalars(select(Recharge).order_by(Recharge.id)):
        mine = attempts.get(recharge.id, [])
        pending = [a for a in mine if a.status == "pending"]
        succeeded = [a for a in mine if a.status == "succeeded"]
        where = f"recharge {recharge.id} ({recharge.phase})"
        if recharge.phase == "charging" and len(pending) != 1:
            problems.append(f"{where}: {len(pending)} pending attempts, expected exactly one")
        if recharge.phase != "charging" and pending:
            problems.append(f"{where}: has a pending attempt outside the charging phase")
        if recharge.phase in ("paid", "credited", "finished"):
            if len(succeeded) != 1 or succeeded[0].payment_intent != recharge.payment_intent:
                problems.append(f"{where}: expected one succeeded attempt for {recharge.payment_intent}")
        elif succeeded:
            problems.append(f"{where}: a succeeded attempt but the recharge was never paid")
        if recharge.total < recharge.amount or recharge.amount <= 0:
            problems.append(f"{where}: amount {recharge.amount} and total {recharge.total} do not add up")
    for account in session.scalars(select(Account).where(Account.recharge_state != "ok")):
        if account.recharge_state == "backing_off" and account.retry_at is None:
            problems.append(f"account {account.id}: backing off without a retry time")
        if account.recharge_state not in ("backing_off", "suspended", "action_required"):
            problems.append(f"account {account.id}: unknown recharge state {account.recharge_state!r}")
    return problems


def uniqueness_problems(session: Session) -> list[str]:
    """What the database's unique indexes promise, checked again (an index dropped by hand, a restore from a
    dump without them): one ledger entry per origin, one open recharge and one default source per account."""
    problems = [
        f"ledger: {n} entries for {entry_type} {external_id}"
        for entry_type, external_id, n in session.execute(
            select(Entry.entry_type, Entry.external_id, func.count())
            .group_by(Entry.entry_type, Entry.external_id)
            .having(func.count() > 1)
        )
    ]
    problems += [
        f"account {account_id}: {n} open recharges"
        for account_id, n in session.execute(
            select(Recharge.account_id, func.count())
            .where(Recharge.phase.not_in(("finished", "failed")))
            .group_by(Recharge.account_id)
            .having(func.count() > 1)
        )
    ]
    problems += [
        f"account {account_id}: {n} default funding sources"
        for account_id, n in session.execute(
            select(FundingSource.account_id, func.count())
            .where(FundingSource.is_default, FundingSource.removed_at.is_(None))
            .group_by(FundingSource.account_id)
            .having(func.count() > 1)
        )
    ]
    return problems


# --- receipts, the outbox, notices, statements ------------------------------------------------------------------


def insert_once(session: Session, model: Any, values: Mapping[str, Any], conflict: Sequence[str]) -> bool:
    """Insert one row unless a row with the same `conflict` columns exists; True when this call inserted it."""
    statement = _insert(session, model.__table__).values(**values).on_conflict_do_nothing(index_elements=conflict)
    return bool(cast(Any, session.execute(statement)).rowcount)


def next_receipt_number(session: Session, issuer: str) -> int:
    """The issuer's next receipt number, taken from its counter row, which stays locked until the transaction
    ends: numbers are sequential, and a rolled-back transaction gives its number back, so there are no gaps."""
    from recharged.models import ReceiptCounter

    raise_counter = (
        update(ReceiptCounter)
        .where(ReceiptCounter.issuer == issuer)
        .values(last_number=ReceiptCounter.last_number + 1)
        .returning(ReceiptCounter.last_number)
        .execution_options(synchronize_session=False)
    )
    number = session.execute(raise_counter).scalar_one_or_none()
    if number is None:
        insert_once(session, ReceiptCounter, {"issuer": issuer, "last_number": 0}, ["issuer"])
        number = session.execute(raise_counter).scalar_one()
    return int(number)


# --- status, account history and reconciliation (`recharged status`, `accounts history`, `reconcile`) ---------

CREDIT_TYPES = ("recharge", "topup")
_USAGE_INLINE: Any = literal_column("'usage'")  # inline, so the partial index on non-usage entries applies
_IN_CHUNK = 500  # ids per IN (...) list


def recharges_finished_since(session: Session, since: datetime) -> list[tuple[str, int, int, int]]:
    """Recharges finished at or after `since`, per currency: (currency, count, credited, charged)."""
    query = (
        select(Recharge.currency, func.count(), func.sum(Recharge.amount), func.sum(Recharge.total))
        .where(Recharge.phase == "finished", Recharge.updated_at >= since)
        .group_by(Recharge.currency)
        .order_by(Recharge.currency)
    )
    return [(row[0], int(row[1]), int(row[2]), int(row[3])) for row in session.execute(query)]


def accounts_not_ok(session: Session) -> list[Account]:
    """Accounts whose automatic recharge is not in the ok state, in id order."""
    return list(session.scalars(select(Account).where(Account.recharge_state != "ok").order_by(Account.id)))


def unusable_sources(session: Session) -> list[FundingSource]:
    """Cards on file (not removed) that a hard decline made unusable, by account."""
    query = (
        select(FundingSource)
        .where(FundingSource.removed_at.is_(None), FundingSource.unusable_reason.is_not(None))
        .order_by(FundingSource.account_id, FundingSource.id)
    )
    return list(session.scalars(query))


def undelivered_mail(session: Session, pending_before: datetime) -> list[tuple[str, int, datetime, str | None]]:
    """Emails failed for good, and emails still pending that were queued before `pending_before`:
    (status, count, oldest queued at, the latest error) per status."""
    from recharged.models import OutboxMessage

    late = (OutboxMessage.status == "failed") | (
        (OutboxMessage.status == "pending") & (OutboxMessage.created_at < pending_before)
    )
    groups = session.execute(
        select(OutboxMessage.status, func.count(), func.min(OutboxMessage.created_at))
        .where(late)
        .group_by(OutboxMessage.status)
        .order_by(OutboxMessage.status)
    ).all()
    found = []
    for status, count, oldest in groups:
        error = session.scalar(
            select(OutboxMessage.last_error)
            .where(late, OutboxMessage.status == status, OutboxMessage.last_error.is_not(None))
            .order_by(OutboxMessage.last_attempt_at.desc(), OutboxMessage.id.desc())
            .limit(1)
        )
        found.append((str(status), int(count), oldest, error))
    return found


def open_recharges_claimed_before(session: Session, created_before: datetime) -> list[Recharge]:
    """Recharges still open that were claimed before `created_before`, oldest first."""
    query = (
        select(Recharge)
        .where(Recharge.phase.not_in(("finished", "failed")), Recharge.created_at < created_before)
        .order_by(Recharge.created_at, Recharge.id)
    )
    return list(session.scalars(query))


def usage_days(session: Session, account_id: str, start: date, end: date) -> list[DailyUsage]:
    """An account's per-day usage totals over the UTC days [start, end), by day and kind."""
    query = (
        select(DailyUsage)
        .where(DailyUsage.account_id == account_id, DailyUsage.day >= start, DailyUsage.day < end)
        .order_by(DailyUsage.day, DailyUsage.kind)
    )
    return list(session.scalars(query))


def ledger_sum_before(session: Session, account_id: str, day: date) -> int:
    """The sum of an account's ledger entries that occurred before the UTC day `day`: its balance at that
    midnight. Usage entries are summed through their per-day totals (which `verify` proves equal), the others
    read through their own index."""
    start = midnight(day)
    others = session.scalar(
        select(func.coalesce(func.sum(Entry.amount), 0)).where(
            Entry.account_id == account_id, Entry.entry_type != _USAGE_INLINE, Entry.occurred_at < start
        )
    )
    usage = session.scalar(
        select(func.coalesce(func.sum(DailyUsage.amount), 0)).where(
            DailyUsage.account_id == account_id, DailyUsage.day < day
        )
    )
    return int(others or 0) - int(usage or 0)


def non_usage_entries(session: Session, account_id: str, since: datetime, until: datetime) -> list[Entry]:
    """An account's credits, adjustments and opening balance entries that occurred in [since, until)."""
    query = (
        select(Entry)
        .where(
            Entry.account_id == account_id,
            Entry.entry_type != _USAGE_INLINE,
            Entry.occurred_at >= since,
            Entry.occurred_at < until,
        )
        .order_by(Entry.occurred_at, Entry.id)
    )
    return list(session.scalars(query))


def account_recharges(session: Session, account_id: str, since: datetime, until: datetime) -> list[Recharge]:
    """An account's recharges claimed in [since, until), oldest first."""
    query = (
        select(Recharge)
        .where(Recharge.account_id == account_id, Recharge.created_at >= since, Recharge.created_at < until)
        .order_by(Recharge.created_at, Recharge.id)
    )
    return list(session.scalars(query))


def account_currencies(session: Session, ids: Sequence[str]) -> dict[str, str]:
    """The currency of each of the given accounts that exists."""
    return dict(session.execute(select(Account.id, Account.currency).where(Account.id.in_(ids))).all())


def processor_customers(session: Session) -> list[str]:
    """The processor's customers behind our funding sources (removed ones included: they were charged)."""
    return list(session.scalars(select(FundingSource.customer).distinct().order_by(FundingSource.customer)))


def credits_for(session: Session, since: datetime, payment_intents: Sequence[str]) -> list[Entry]:
    """Ledger credits of charges (recharge and top-up entries) that occurred at or after `since`, and those of
    the given PaymentIntents whenever they occurred."""
    found = {
        e.id: e
        for e in session.scalars(select(Entry).where(Entry.entry_type.in_(CREDIT_TYPES), Entry.occurred_at >= since))
    }
    ids = sorted(set(payment_intents))
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        query = select(Entry).where(Entry.entry_type.in_(CREDIT_TYPES), Entry.external_id.in_(chunk))
        found.update((e.id, e) for e in session.scalars(query))
    return sorted(found.values(), key=lambda e: (e.occurred_at, e.id))


def recharges_paid_by(session: Session, payment_intents: Sequence[str]) -> dict[str, Recharge]:
    """The recharges recorded as paid by the given PaymentIntents, by PaymentIntent."""
    ids = sorted(set(payment_intents))
    found: dict[str, Recharge] = {}
    for i in range(0, len(ids), _IN_CHUNK):
        query = select(Recharge).where(Recharge.payment_intent.in_(ids[i : i + _IN_CHUNK]))
        found.update((r.payment_intent or "", r) for r in session.scalars(query))
    return found
