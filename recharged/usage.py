"""Usage ingestion: parse, validate and rate usage events, and record them in the ledger in batches.

One function serves the CSV import and (later) the HTTP API. Each event ends accepted, duplicate or
rejected with a reason; the good events of a batch are recorded even when others are rejected, and an
event is either recorded whole (ledger entry, daily total, balance) or not at all, in one transaction.
The database's unique (entry_type, external_id) decides what is a duplicate, not a read before the write.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy.orm import Session

from recharged.authorizations import authorizations_of, settle
from recharged.clock import Clock, parse_instant
from recharged.config import Settings
from recharged.csvfiles import batches, check_header, open_csv, shape_problem
from recharged.money import SCALE, Units, check_amount, parse_amount
from recharged.rating import Rate, TimeRate, rate_event, rate_snapshot
from recharged.sms import count_segments
from recharged.store.engine import Database
from recharged.store.ledger import (
    AccountRef,
    UsageRow,
    Written,
    add_to_balances,
    existing_entries,
    insert_usage,
    lock_accounts,
    rate_id,
    record_usage,
)
from recharged.store.models import Entry
from recharged.words import plural

FIELDS = (
    "event_id",
    "account_id",
    "kind",
    "started_at",
    "duration_seconds",
    "quantity",
    "text",
    "cost",
    "authorization_id",
)
REQUIRED = ("event_id", "account_id", "kind", "started_at")
CSV_OPTIONAL = ("authorization_id",)  # a CSV file may leave these columns out (files made before they existed)
_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_ACCOUNT = re.compile(r"^[\x21-\x7e]{1,64}$")
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_DURATION = 7 * 24 * 3600
MAX_QUANTITY = 1_000_000
MAX_COST = 1_000_000 * SCALE  # a million currency units for one event keeps balances far from overflow

Status = Literal["accepted", "duplicate", "rejected"]


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """A parsed usage event; `quantity` holds the counted segments when the event came with text."""

    event_id: str
    account_id: str
    kind: str
    started_at: datetime
    duration_seconds: int | None
    quantity: int | None
    has_text: bool
    cost: Units | None
    authorization_id: int | None = None  # the call's authorization (POST /v1/authorizations), settled by it

    @property
    def content(self) -> tuple[object, ...]:
        """What makes two events with the same id the same event."""
        return (self.account_id, self.kind, self.started_at, self.duration_seconds, self.quantity, self.cost)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one event: `position` is its line number (CSV) or index (API batch)."""

    position: int
    event_id: str | None
    status: Status
    reason: str | None = None


def _text(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value.strip() or None


def _whole(raw: Mapping[str, Any], name: str, *, minimum: int, maximum: int) -> int | None:
    value = raw.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if not (text.isascii() and text.isdigit() and len(text) <= 12) and not re.fullmatch(r"[+-]?\d{1,12}", text):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        number = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {number}")
    if number > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {number}")
    return number


def parse_event(
    raw: Mapping[str, Any], *, now: datetime, future_tolerance: timedelta, max_age: timedelta | None = None
) -> UsageEvent:
    """Check the shape of one event; raise ValueError with the reason when it is malformed. An event that started
    more than `max_age` before `now` is refused (usage.max_age_days)."""
    event_id = _text(raw, "event_id")
    account_id = _text(raw, "account_id")
    kind_raw = _text(raw, "kind")
    started_raw = _text(raw, "started_at")
    if not (event_id and account_id and kind_raw and started_raw):
        missing = [name for name in REQUIRED if not _text(raw, name)]
        raise ValueError(f"{missing[0]} is missing")
    if not _ID.match(event_id):
        raise ValueError("event_id must be 1-128 printable characters without spaces")
    # Wider than the alphabet of new account ids (accounts.ACCOUNT_ID_RULE): accounts made before it keep their
    # usage. An unknown id is rejected later by name; NUL would break PostgreSQL.
    if not _ACCOUNT.match(account_id):
        raise ValueError("account_id must be 1-64 printable characters without spaces")
    kind = kind_raw.lower()
    if not _KIND.match(kind):
        raise ValueError(f"kind {raw.get('kind')!r} is not a usage kind name")
    started_at = parse_instant(started_raw)
    if started_at > now + future_tolerance:
        raise ValueError(f"started_at {started_at.isoformat()} is in the future (now is {now.isoformat()})")
    if max_age is not None and started_at < now - max_age:
        raise ValueError(
            f"started_at {started_at.isoformat()} is more than {plural(max_age.days, 'day')} ago (usage.max_age_days; "
            f"now is {now.isoformat()})"
        )
    duration = _whole(raw, "duration_seconds", minimum=0, maximum=MAX_DURATION)
    quantity = _whole(raw, "quantity", minimum=1, maximum=MAX_QUANTITY)
    text = raw.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError("text must be a string")
    has_text = bool(text)
    if has_text and quantity is not None:
        raise ValueError("give quantity or text, not both")
    if has_text:
        quantity = count_segments(str(text))
    cost_raw = raw.get("cost")
    cost: Units | None = None
    if cost_raw is not None and not (isinstance(cost_raw, str) and not cost_raw.strip()):
        if isinstance(cost_raw, float | bool):
            raise ValueError(f'cost must be a decimal string such as "0.0125", got {cost_raw!r}')
        cost = parse_amount(cost_raw, what="cost")
        if cost < 0:
            raise ValueError("cost must not be negative")
        if cost > MAX_COST:
            raise ValueError(f"cost {cost_raw!r} is more than {MAX_COST // SCALE} for one event")
    authorization_id = _whole(raw, "authorization_id", minimum=1, maximum=2**62)
    return UsageEvent(event_id, account_id, kind, started_at, duration, quantity, has_text, cost, authorization_id)


def check_against_rate(event: UsageEvent, kind_rate: Rate, plan: str) -> None:
    """The fields an event must carry for its kind's measure."""
    if isinstance(kind_rate, TimeRate):
        if event.has_text or event.quantity is not None:
            raise ValueError(f"kind {event.kind!r} is billed by time: give duration_seconds, not quantity or text")
        if event.duration_seconds is None:
            raise ValueError(f"duration_seconds is missing (kind {event.kind!r} is billed by time)")
        return
    if event.duration_seconds is not None:
        raise ValueError(f"kind {event.kind!r} is billed per {kind_rate.unit}: give quantity, not duration_seconds")
    if event.has_text and kind_rate.unit != "segment":
        raise ValueError(f"text is only for kinds billed per segment; {event.kind!r} is billed per {kind_rate.unit}")
    if event.quantity is None:
        raise ValueError(f"quantity is missing (kind {event.kind!r} is billed per {kind_rate.unit})")


def _differences(entry: Entry, event: UsageEvent) -> list[str]:
    pairs = [
        ("account_id", entry.account_id, event.account_id),
        ("kind", entry.kind, event.kind),
        ("started_at", entry.occurred_at, event.started_at),
        ("duration_seconds", entry.duration_seconds, event.duration_seconds),
        ("quantity", entry.quantity, event.quantity),
    ]
    if event.cost is not None:
        pairs.append(("cost", -entry.amount, event.cost))
    return [name for name, recorded, given in pairs if recorded != given]


class UsageRecorder:
    """Records batches of usage events for one database and configuration."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        clock: Clock,
        on_backdated: Callable[[set[str]], None] | None = None,
    ) -> None:
        """`on_backdated` hears, after each commit, the accounts that got usage of an earlier UTC day than today's:
        their usage window changed (`thresholds.Thresholds.forget`)."""
        self._db = db
        self._clock = clock
        self._on_backdated = on_backdated
        self._tolerance = timedelta(seconds=settings.usage.future_tolerance_seconds)
        self._max_age = timedelta(days=settings.usage.max_age_days)
        self._plans = {name: plan.rate_table() for name, plan in settings.plans.items()}
        self._source = settings.source  # the configuration, as messages name it
        self._rate_ids: dict[tuple[str, str, Rate], int] = {}

    def record(self, raws: Sequence[Mapping[str, Any]], positions: Sequence[int] | None = None) -> list[Outcome]:
        """Record a batch; returns one Outcome per input, in input order."""
        where = list(positions) if positions is not None else list(range(len(raws)))
        now = self._clock.now()
        outcomes: list[Outcome | None] = [None] * len(raws)
        # The k-th copy of an event id goes in round k: each round is recorded after the ones before it, in the same
        # transaction, so every copy is judged against what is recorded by then, this batch's earlier copies included.
        rounds: list[list[tuple[int, UsageEvent]]] = []
        copies: dict[str, int] = {}
        for i, raw in enumerate(raws):
            if not isinstance(raw, Mapping):  # an API batch may hold anything
                outcomes[i] = Outcome(where[i], None, "rejected", "an event must be a JSON object")
                continue
            event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
            try:
                event = parse_event(raw, now=now, future_tolerance=self._tolerance, max_age=self._max_age)
            except ValueError as exc:
                outcomes[i] = Outcome(where[i], event_id, "rejected", str(exc))
                continue
            k = copies[event.event_id] = copies.get(event.event_id, -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append((i, event))

        backdated: set[str] = set()
        if rounds:
            late = self._db.dialect == "postgresql"
            try:
                new_rate_ids = self._write(rounds, now, outcomes, where, backdated, late_locks=late)
            except _AccountsChanged:  # rolled back: write it again, its accounts locked first
                for parsed in rounds:
                    for i, _ in parsed:
                        outcomes[i] = None
                backdated.clear()
                new_rate_ids = self._write(rounds, now, outcomes, where, backdated, late_locks=False)
            self._rate_ids.update(new_rate_ids)  # only after the commit: a rolled-back id is no id
            if backdated and self._on_backdated is not None:
                self._on_backdated(backdated)
        return [outcome for outcome in outcomes if outcome is not None]

    def _write(
        self,
        rounds: list[list[tuple[int, UsageEvent]]],
        now: datetime,
        outcomes: list[Outcome | None],
        where: list[int],
        backdated: set[str],
        *,
        late_locks: bool,
    ) -> dict[tuple[str, str, Rate], int]:
        """Record the parsed events in one transaction, round after round; returns the rate ids it created.

        With `late_locks` (PostgreSQL) the events are rated from their accounts as read, the entries and the daily
        totals written, and only then the accounts locked, in id order, for their balances and the reservations
        the events settle: a batch holds its accounts' rows for the last few milliseconds before its commit, so a
        call's authorization hardly waits on it. If an account changed meanwhile (closed, moved to another plan),
        _AccountsChanged rolls it all back. Without, the accounts are locked first (SQLite has one writer anyway)."""
        new_rate_ids: dict[tuple[str, str, Rate], int] = {}
        ids = {event.account_id for parsed in rounds for _, event in parsed}
        today = now.date()
        postgres = self._db.dialect == "postgresql"
        with self._db.transaction() as session:
            held = authorizations_of(session, (e.authorization_id for parsed in rounds for _, e in parsed))
            accounts = lock_accounts(session, ids, lock=not late_locks)
            prepared = self._prepare(session, rounds, accounts, held, now, new_rate_ids, outcomes, where)
            written: list[Written] = []
            settling: list[tuple[int, str]] = []
            for pending, rows in prepared:
                if postgres:
                    new = insert_usage(session, rows)
                    inserted = set(new)
                    written += new.values()
                else:
                    inserted = record_usage(session, rows)
                backdated.update(
                    e.account_id for _, e in pending if e.event_id in inserted and e.started_at.date() < today
                )
                settling += [
                    (e.authorization_id, e.event_id)
                    for _, e in pending
                    if e.authorization_id and e.event_id in inserted
                ]
                self._settle(session, pending, inserted, outcomes, where)
            if late_locks and lock_accounts(session, ids) != accounts:
                raise _AccountsChanged
            if postgres:
                add_to_balances(session, written)
            settle(session, settling, now)
        return new_rate_ids

    def _prepare(
        self,
        session: Session,
        rounds: list[list[tuple[int, UsageEvent]]],
        accounts: Mapping[str, AccountRef],
        held: Mapping[int, str],
        now: datetime,
        new_rate_ids: dict[tuple[str, str, Rate], int],
        outcomes: list[Outcome | None],
        where: list[int],
    ) -> list[tuple[list[tuple[int, UsageEvent]], list[UsageRow]]]:
        """Check and rate each round's events against `accounts`: the ledger rows to write, round by round, with
        the events they are for; the events refused get their outcome."""
        prepared = []
        for parsed in rounds:
            pending: list[tuple[int, UsageEvent]] = []
            rows: list[UsageRow] = []
            for i, event in parsed:
                try:
                    kind_rate, plan = self._rate_for(event, accounts.get(event.account_id))
                    _check_open(event, accounts[event.account_id].closed_at)
                    check_against_rate(event, kind_rate, plan)
                    _check_authorization(event, held)
                    rated = rate_event(kind_rate, duration_seconds=event.duration_seconds, quantity=event.quantity)
                    cost = event.cost if event.cost is not None else rated.cost
                    # a price in config.toml can make one event cost more than the ledger takes
                    check_amount(cost, accounts[event.account_id].currency, what="cost")
                except ValueError as exc:
                    outcomes[i] = Outcome(where[i], event.event_id, "rejected", str(exc))
                    continue
                key = (plan, event.kind, kind_rate)
                rid = self._rate_ids.get(key) or new_rate_ids.get(key)
                if rid is None:
                    rid = new_rate_ids[key] = rate_id(session, plan, event.kind, rate_snapshot(kind_rate))
                pending.append((i, event))
                rows.append(
                    (
                        event.account_id,
                        event.event_id,
                        -cost,
                        event.started_at,
                        now,
                        event.kind,
                        event.duration_seconds,
                        event.quantity,
                        rated.billable_quantity,
                        None if event.cost is not None else rid,
                    )
                )
            rows.sort(key=lambda row: row[1])  # one lock order for concurrent writers
            prepared.append((pending, rows))
        return prepared

    def _rate_for(self, event: UsageEvent, account: AccountRef | None) -> tuple[Rate, str]:
        if account is None:
            raise ValueError(f"unknown account {event.account_id!r}")
        rates = self._plans.get(account.plan)
        if rates is None:
            raise ValueError(
                f"account {account.id!r} is on plan {account.plan!r}, which {self._source} does not define"
            )
        kind_rate = rates.get(event.kind)
        if kind_rate is None:
            raise ValueError(
                f"unknown kind {event.kind!r} for plan {account.plan!r} (known: {', '.join(sorted(rates))})"
            )
        return kind_rate, account.plan

    def _settle(
        self,
        session: Any,
        pending: list[tuple[int, UsageEvent]],
        inserted: set[str],
        outcomes: list[Outcome | None],
        where: list[int],
    ) -> None:
        """Mark each event accepted, duplicate, or rejected when its id was recorded with other content."""
        already = existing_entries(session, "usage", (e.event_id for _, e in pending if e.event_id not in inserted))
        for index, event in pending:
            if event.event_id in inserted:
                outcomes[index] = Outcome(where[index], event.event_id, "accepted")
                continue
            differences = _differences(already[event.event_id], event)
            if differences:
                reason = f"event_id was already recorded with a different {', '.join(differences)}"
                outcomes[index] = Outcome(where[index], event.event_id, "rejected", reason)
            else:
                outcomes[index] = Outcome(where[index], event.event_id, "duplicate")


class _AccountsChanged(Exception):
    """An account of a batch changed between its unlocked read and its lock: the batch is written again."""


def _check_authorization(event: UsageEvent, held: Mapping[int, str]) -> None:
    """An event naming an authorization names one of its own account's."""
    if event.authorization_id is None:
        return
    owner = held.get(event.authorization_id)
    if owner is None:
        raise ValueError(f"authorization_id {event.authorization_id} is no authorization")
    if owner != event.account_id:
        raise ValueError(f"authorization_id {event.authorization_id} is another account's")


def _check_open(event: UsageEvent, closed_at: datetime | None) -> None:
    """A closed account is billed only for usage that started before it was closed (late records of earlier calls)."""
    if closed_at is not None and event.started_at >= closed_at:
        raise ValueError(
            f"account {event.account_id!r} was closed at {closed_at.isoformat()}: usage that started after its "
            "closing is not billed (`recharged accounts reopen` to bill it)"
        )


def summarize(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    for outcome in outcomes:
        counts[outcome.status] += 1
    return counts


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What a CSV import did: `rejects` is the file the rejected rows were written to, None when there were none."""

    path: Path
    accepted: int
    duplicate: int
    rejected: int
    rejects: Path | None
    elapsed: float  # seconds

    @property
    def total(self) -> int:
        return self.accepted + self.duplicate + self.rejected


def rejects_path(path: Path) -> Path:
    """Where an import of `path` writes its rejected rows unless told otherwise: FILE.rejected.csv."""
    return path.with_name(path.stem + ".rejected.csv")


def import_csv(
    recorder: UsageRecorder,
    path: Path,
    *,
    batch_size: int,
    rejects: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Record the usage events of a CSV file (header: FIELDS) in batches of `batch_size`. Duplicates are skipped;
    rejected rows, ragged ones included, are written with their line number and reason to `rejects` (default
    `rejects_path(path)`), which is created only when there are any. `progress(bytes read, file size)` is called
    once before the first batch, after each one, and once at the end."""
    rejects = rejects or rejects_path(path)
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    reject_writer: Any = None
    reject_handle: IO[str] | None = None
    started = time.perf_counter()
    try:
        with open_csv(path) as (reader, rows, bytes_read):
            check_header(
                path, reader.fieldnames, required=tuple(f for f in FIELDS if f not in CSV_OPTIONAL), known=FIELDS
            )
            size = path.stat().st_size
            if progress is not None:
                progress(0, size)
            for batch in batches(rows, batch_size):
                ragged = [(line, row, shape_problem(row)) for line, row in batch]
                fitting = [(line, row) for line, row, problem in ragged if problem is None]
                outcomes = recorder.record([row for _, row in fitting], [line for line, _ in fitting])
                outcomes += [Outcome(line, row.get("event_id"), "rejected", p) for line, row, p in ragged if p]
                for key, value in summarize(outcomes).items():
                    counts[key] += value
                rows_at = {line: row for line, row in batch}
                # In line order: rows the CSV could not shape are rejected apart from the ones recorded
                bad = sorted(
                    ((o, rows_at[o.position]) for o in outcomes if o.status == "rejected"), key=lambda b: b[0].position
                )
                if bad and reject_writer is None:
                    reject_handle = rejects.open("w", newline="", encoding="utf-8")
                    reject_writer = csv.writer(reject_handle)
                    reject_writer.writerow(["line", "reason", *FIELDS])
                for outcome, row in bad:
                    reject_writer.writerow([outcome.position, outcome.reason, *(row.get(f) or "" for f in FIELDS)])
                if progress is not None:
                    progress(min(bytes_read(), size), size)
            if progress is not None:
                progress(size, size)  # the whole file, its byte-order mark included
    finally:
        if reject_handle is not None:
            reject_handle.close()
    return ImportReport(
        path,
        counts["accepted"],
        counts["duplicate"],
        counts["rejected"],
        rejects if reject_handle is not None else None,
        time.perf_counter() - started,
    )
