"""The ledger and usage: posting entries, the dialect-specific usage upsert, the per-day totals and window
sums behind planning, receipt numbers (taken in the credit's transaction)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, and_, case, cast, func, select, update
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
    closed_at: datetime | None  # when the account was closed; None while it is open


def _accounts_by_id(session: Session, columns: str, ids: Iterable[str], suffix: str = "") -> tuple[str, list[Any]]:
    """`SELECT id, {columns} FROM accounts` for the named accounts, in id order, `suffix` (a lock) on PostgreSQL:
    one statement with the ids as a single array parameter. Returns the dialect and the rows."""
    wanted = sorted(set(ids))
    if not wanted:
        return "", []
    dialect, raw = _driver(session)
    cursor = raw.cursor()
    try:
        if dialect == "sqlite":
            cursor.execute(
                f"SELECT id, {columns} FROM accounts WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                (json.dumps(wanted),),
            )
        else:
            query = f"SELECT id, {columns} FROM accounts WHERE id = ANY(%b::text[]) ORDER BY id{suffix}"
            cursor.execute(query, (wanted,))
        return dialect, cursor.fetchall()
    finally:
        cursor.close()


def lock_accounts(session: Session, ids: Iterable[str], *, lock: bool = True) -> dict[str, AccountRef]:
    """The named accounts that exist, locked for update in id order (PostgreSQL; SQLite holds the write lock), with
    what the usage path needs of them (plan, currency, closing). `lock=False` reads them without a lock."""
    dialect, rows = _accounts_by_id(session, "plan, currency, closed_at", ids, " FOR NO KEY UPDATE" if lock else "")
    closing = _from_sqlite_time if dialect == "sqlite" else (lambda at: at.astimezone(UTC))
    return {row[0]: AccountRef(row[0], row[1], row[2], None if row[3] is None else closing(row[3])) for row in rows}


# What a recharge threshold is computed from, besides the usage window and the configuration (`thresholds`).
THRESHOLD_KEY_COLUMNS = (
    "plan",
    "currency",
    "created_at",
    "first_usage_at",
    "window_days",
    "threshold_days",
    "min_threshold",
)


def available_and_threshold_keys(session: Session, ids: Sequence[str]) -> list[tuple[Any, ...]]:
    """(id, balance - reserved, *THRESHOLD_KEY_COLUMNS) of the named accounts that exist, unlocked (after each usage
    batch, for up to a thousand accounts)."""
    _, rows = _accounts_by_id(session, "balance - reserved, " + ", ".join(THRESHOLD_KEY_COLUMNS), ids)
    return [tuple(row) for row in rows]


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
    locked: Account | None = None,
) -> bool:
    """Post one non-usage entry (opening balance, adjustment, recharge or top-up credit, or a reversal of one:
    refund, dispute, reinstated, with the `payment_intent` it reverses) and move the cached balance with it,
    once: False, and no change, when (entry_type, external_id) is already in the ledger.

    An amount or a resulting balance past the ledger's bounds (money.MAX_AMOUNT, MAX_BALANCE) is an InputError,
    raised before anything is written. The account row is locked first (as the usage path locks its accounts),
    so the balance checked is the one the amount is added to. `locked`: the account as the caller loaded it with
    its row locked in this transaction, no balance moved since; its balance and currency are not read again."""
    account: Any = locked
    if account is None:
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


def posted_after(session: Session, at: datetime, ids: Sequence[str] | None = None) -> dict[str, int]:
    """The sum of the entries that occurred after `at`, per account: a balance as of `at` is today's minus it."""
    query = select(Entry.account_id, func.sum(Entry.amount)).where(Entry.occurred_at > at).group_by(Entry.account_id)
    if ids is not None:
        query = query.where(Entry.account_id.in_(ids))
    return {account: int(total) for account, total in session.execute(query)}


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
# What `plan_rows` gives for each account, in this order, before its usage sums: the plan and the account's own
# policy settings first (together they make its policy), then the figures of its decision.
PLAN_COLUMNS = (
    "id",
    "plan",
    *POLICY_COLUMNS,
    "currency",
    "balance",
    "reserved",
    "created_at",
    "first_usage_at",
    "auto_recharge",
    "recharge_state",
    "retry_at",
    "vat_percent",
    "closed_at",
)


def usage_total(session: Session, account_id: str, start: date, end: date) -> int:
    """The cost of one account's usage over the UTC days [start, end)."""
    query = select(func.coalesce(func.sum(DailyUsage.amount), 0)).where(
        DailyUsage.account_id == account_id, DailyUsage.day >= start, DailyUsage.day < end
    )
    return int(session.connection().execute(query).scalar_one())


def window_choices(session: Session, ids: Sequence[str] | None = None) -> list[tuple[str, int | None]]:
    """The distinct (plan, window_days of the account's own) in use: which averaging windows a plan needs."""
    query = select(Account.plan, Account.window_days).distinct()
    if ids is not None:
        query = query.where(Account.id.in_(ids))
    return [(plan, days) for plan, days in session.execute(query)]


def plan_rows(
    session: Session, end: date, window_days: Sequence[int], ids: Sequence[str] | None = None, chunk: int = 5_000
) -> Iterator[Any]:
    """The accounts (of `ids`, or all) in id order, a chunk at a time, each a plain row of `PLAN_COLUMNS` followed
    by the cost of its usage in each of the `window_days` UTC days before `end` (0 without usage).

    One statement: the sums come with the accounts. SQLite sums each account's rows as one range of the primary
    key (account_id, day, kind), a plan that needs no statistics (a GROUP BY over the window reads the day index
    and sorts unless ANALYZE has run, about three times slower); PostgreSQL joins one GROUP BY over the longest
    window, each shorter one a filtered sum."""
    columns = [getattr(Account, name) for name in PLAN_COLUMNS]
    starts = [end - timedelta(days=days) for days in window_days]
    if session.get_bind().dialect.name == "sqlite":
        sums = [
            select(func.coalesce(func.sum(DailyUsage.amount), 0))
            .where(DailyUsage.account_id == Account.id, DailyUsage.day >= start, DailyUsage.day < end)
            .scalar_subquery()
            for start in starts
        ]
        query = select(*columns, *sums)
    else:
        first = min(starts, default=end)
        grouped = (
            select(
                DailyUsage.account_id,
                *(
                    func.sum(
                        DailyUsage.amount if start == first else case((DailyUsage.day >= start, DailyUsage.amount))
                    ).label(f"usage_{n}")
                    for n, start in enumerate(starts)
                ),
            )
            .where(DailyUsage.day >= first, DailyUsage.day < end)
            .group_by(DailyUsage.account_id)
        )
        if ids is not None:
            grouped = grouped.where(DailyUsage.account_id.in_(ids))
        usage = grouped.subquery()
        query = select(
            *columns, *(cast(func.coalesce(usage.c[f"usage_{n}"], 0), BigInteger) for n in range(len(starts)))
        ).outerjoin_from(Account, usage, usage.c.account_id == Account.id)
    query = query.order_by(Account.id)
    if ids is not None:
        query = query.where(Account.id.in_(ids))
    # Not a server-side cursor (yield_per): PostgreSQL would plan for the first rows, without a parallel GROUP BY
    # (reading the whole primary key index in order instead), about 1.5 times slower. The driver holds the result
    # instead (libpq: the process grew by about 60 MB at 100,000 accounts); rows become objects a chunk at a time.
    result = session.connection().execute(query)
    while rows := result.fetchmany(chunk):
        yield from rows


def daily_usage_rows(session: Session) -> Iterator[Any]:
    yield from session.execute(select(DailyUsage).execution_options(yield_per=20_000)).scalars()


def first_usage_times(session: Session) -> dict[str, datetime | None]:
    return {row.id: row.first_usage_at for row in session.execute(select(Account.id, Account.first_usage_at))}


def lock_account(session: Session, account_id: str) -> Account | None:
    """Lock an account row for update (PostgreSQL; SQLite holds the write lock already). FOR NO KEY UPDATE: a
    transaction that only inserts rows naming the account (a usage batch's entries) does not wait for it."""
    locked = select(Account).where(Account.id == account_id).with_for_update(key_share=True)
    return session.execute(locked).scalar_one_or_none()


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
# itself: SQLAlchemy's per-row parameter processing would cost more than the database's own work. On PostgreSQL
# the columns go as arrays in binary (`%b`): psycopg quotes every element of a text array in Python, which cost
# about four times as much as the whole statement's binary form (24 vs 6 ms for 1,000 rows).
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


def _from_sqlite_time(text: str) -> datetime:
    """A time as SQLAlchemy's SQLite DATETIME stored it (naive UTC), read through the driver itself."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _driver(session: Session) -> tuple[str, Any]:
    connection = session.connection()
    return connection.dialect.name, connection.connection.dbapi_connection


_DAILY_UPSERT = (
    "ON CONFLICT (account_id, day, kind) DO UPDATE SET events = daily_usage.events + excluded.events, "
    "quantity = daily_usage.quantity + excluded.quantity, amount = daily_usage.amount + excluded.amount"
)


def record_usage(session: Session, rows: Sequence[UsageRow]) -> set[str]:
    """SQLite: insert usage entries, skipping event ids already recorded, and add exactly the inserted ones to the
    per-day totals and the balances (with the earliest usage time). Returns the event ids inserted. (PostgreSQL:
    `insert_usage`, then `add_to_balances` once the accounts are locked.)

    Rows with a key in common are written in key order, so concurrent writers lock them in one order."""
    if not rows:
        return set()
    _, raw = _driver(session)
    cursor = raw.cursor()
    try:
        return _record_usage_sqlite(cursor, rows)
    finally:
        cursor.close()


# What a batch writes before its accounts are locked (PostgreSQL): its entries, skipping event ids recorded
# already, and exactly those in the per-day totals. Neither needs an account's row; each locks its rows in key order.
_PG_ENTRIES_AND_DAILY = f"""
            WITH new AS (
                INSERT INTO entries (entry_type, {_USAGE_COLUMNS})
                SELECT 'usage', {_USAGE_COLUMNS} FROM unnest(%b::text[], %b::text[], %b::bigint[],
                    %b::timestamptz[], %b::timestamptz[], %b::text[], %b::integer[], %b::bigint[], %b::bigint[],
                    %b::bigint[]) AS v({_USAGE_COLUMNS})
                ORDER BY external_id
                ON CONFLICT (entry_type, external_id) DO NOTHING
                RETURNING account_id, external_id, amount, occurred_at, kind, billable_quantity
            ), daily AS (
                INSERT INTO daily_usage (account_id, day, kind, events, quantity, amount)
                SELECT account_id, (occurred_at AT TIME ZONE 'UTC')::date, kind, count(*), sum(billable_quantity),
                    -sum(amount)
                FROM new GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                {_DAILY_UPSERT}
            )"""

Written = tuple[str, int, datetime]  # an inserted usage entry: (account, amount, occurred_at)


def insert_usage(session: Session, rows: Sequence[UsageRow]) -> dict[str, Written]:
    """PostgreSQL: insert usage entries, skipping event ids already recorded, and add exactly the inserted ones to
    the per-day totals, without touching the accounts (`add_to_balances` does, once they are locked). Returns the
    inserted ones by event id."""
    if not rows:
        return {}
    _, raw = _driver(session)
    cursor = raw.cursor()
    try:
        cursor.execute(
            f"{_PG_ENTRIES_AND_DAILY} SELECT external_id, account_id, amount, occurred_at FROM new",
            [list(column) for column in zip(*rows, strict=True)],
        )
        return {row[0]: (row[1], row[2], row[3]) for row in cursor.fetchall()}
    finally:
        cursor.close()


def add_to_balances(session: Session, written: Iterable[Written]) -> None:
    """PostgreSQL: add usage entries `insert_usage` wrote to their accounts' balances and earliest usage times, in
    one statement. The accounts must be locked already (`lock_accounts`), which gives the lock order."""
    totals: dict[str, tuple[int, datetime]] = {}
    for account_id, amount, occurred_at in written:
        delta, first = totals.get(account_id, (0, occurred_at))
        totals[account_id] = (delta + amount, min(first, occurred_at))
    if not totals:
        return
    ids = sorted(totals)
    _, raw = _driver(session)
    cursor = raw.cursor()
    try:
        cursor.execute(
            "UPDATE accounts AS a SET balance = a.balance + t.delta, first_usage_at = LEAST(a.first_usage_at, t.first) "
            "FROM unnest(%b::text[], %b::bigint[], %b::timestamptz[]) AS t(account_id, delta, first) "
            "WHERE a.id = t.account_id",
            [ids, [totals[i][0] for i in ids], [totals[i][1] for i in ids]],
        )
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
    ends: numbers are sequential, and a rolled-back transaction gives its number back, so there are no gaps.
    Every receipt of the issuer waits for that lock: take the number last, just before the rows that carry it
    (one statement; the first receipt of an issuer also creates its row)."""
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
