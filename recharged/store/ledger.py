"""The ledger and usage: posting entries, the dialect-specific usage upsert, the per-day totals and window
sums behind planning, receipt numbers (taken in the credit's transaction)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from recharged.errors import InputError
from recharged.money import check_amount, check_balance
from recharged.states import EntryType
from recharged.store.engine import dialect_insert, insert_once
from recharged.store.models import (
    Account,
    DailyUsage,
    Entry,
    Rate,
    ReceiptCounter,
)


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
    session.execute(dialect_insert(session, Rate.__table__).values(key).on_conflict_do_nothing())
    conditions = [getattr(Rate, name) == value for name, value in key.items()]
    return session.execute(select(Rate.id).where(and_(*conditions))).scalar_one()


def existing_entries(session: Session, entry_type: str, external_ids: Iterable[str]) -> dict[str, Entry]:
    ids = sorted(set(external_ids))
    if not ids:
        return {}
    rows = session.scalars(select(Entry).where(Entry.entry_type == entry_type, Entry.external_id.in_(ids)))
    return {entry.external_id: entry for entry in rows}


_ENTRY_WORDS: dict[str, str] = {
    EntryType.OPENING: "opening balance",
    EntryType.TOPUP: "top-up",
    EntryType.RECHARGE: "recharge",
}


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
    payment_intent: str | None = None,
) -> bool:
    """Post one non-usage entry (opening balance, adjustment, recharge or top-up credit, or a reversal of one:
    refund, dispute, reinstated, with the `payment_intent` it reverses) and move the cached balance with it,
    once: False, and no change, when (entry_type, external_id) is already in the ledger.

    An amount or a resulting balance past the ledger's bounds (money.MAX_AMOUNT, MAX_BALANCE) is an InputError,
    raised before anything is written. The account row is locked first (as the usage path locks its accounts),
    so the balance checked is the one the amount is added to."""
    account = session.execute(
        select(Account.balance, Account.currency).where(Account.id == account_id).with_for_update()
    ).one_or_none()
    if account is not None:
        try:
            what = _ENTRY_WORDS.get(entry_type, str(entry_type))
            check_amount(amount, account.currency, what=what)
            check_balance(account.balance, amount, account.currency, what=what)
        except ValueError as exc:
            posted = select(Entry.id).where(Entry.entry_type == entry_type, Entry.external_id == external_id)
            if session.execute(posted).first() is not None:
                return False  # posted before, when it was in bounds: the same entry again changes nothing
            raise InputError(f"account {account_id}: {exc}; nothing was written") from None
    inserted = session.execute(
        dialect_insert(session, Entry.__table__)
        .values(
            account_id=account_id,
            entry_type=entry_type,
            external_id=external_id,
            amount=amount,
            occurred_at=at,
            recorded_at=recorded_at or at,
            note=note,
            payment_intent=payment_intent,
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


def posted_after(session: Session, at: datetime, ids: Sequence[str] | None = None) -> dict[str, int]:
    """The sum of the entries that occurred after `at`, per account: a balance as of `at` is today's minus it."""
    query = select(Entry.account_id, func.sum(Entry.amount)).where(Entry.occurred_at > at).group_by(Entry.account_id)
    if ids is not None:
        query = query.where(Entry.account_id.in_(ids))
    return {account: int(total) for account, total in session.execute(query)}


def plan_rows(session: Session, ids: Sequence[str] | None = None, chunk: int = 5_000) -> Iterator[Any]:
    """The account columns a recharge decision needs, streamed in id order (plain rows, no ORM objects)."""
    query = select(
        Account.id,
        Account.currency,
        Account.plan,
        Account.balance,
        Account.reserved,
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


def daily_usage_rows(session: Session) -> Iterator[Any]:
    yield from session.execute(select(DailyUsage).execution_options(yield_per=20_000)).scalars()


def first_usage_times(session: Session) -> dict[str, datetime | None]:
    return {row.id: row.first_usage_at for row in session.execute(select(Account.id, Account.first_usage_at))}


def lock_account(session: Session, account_id: str) -> Account | None:
    """Lock an account row for update (PostgreSQL; SQLite holds the write lock already)."""
    return session.execute(select(Account).where(Account.id == account_id).with_for_update()).scalar_one_or_none()


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


def next_receipt_number(session: Session, issuer: str) -> int:
    """The issuer's next receipt number, taken from its counter row, which stays locked until the transaction
    ends: numbers are sequential, and a rolled-back transaction gives its number back, so there are no gaps."""

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
