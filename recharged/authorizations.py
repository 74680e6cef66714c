"""Call authorizations: before each call the dialer asks how long the account can pay for it, and that much money
is held until the call's usage arrives (CGRateS' AuthorizeEvent / GetMaxUsage, done exactly).

- Available = balance - open reservations + the account's overdraft (0 unless an admin sets one).
- `authorized_seconds` is the longest call the available money pays for at the account's rate for the kind, found
  with the rating itself (`rating.longest_call`: whole billing increments, after the connect fee and the minimum
  duration), never more than the dialer asked for, nor `[authorizations] max_seconds` when it asked for no length.
  The cost of that call is reserved (`reserved_amount`) and added to `accounts.reserved` in the same transaction.
- One authorization per call: the same (account, call_id) again answers the first one.
- A reservation ends when the call's usage arrives with its `authorization_id` (settled: the debit posts and the
  reservation is released in one transaction, `usage.UsageRecorder`), when the dialer releases it (the call was not
  placed), or when it expires (its authorized length plus `grace_seconds` after it was made). A call longer than
  authorized is still debited in full: the balance may go below zero by at most what the rest of the call costs.
- Every change takes the account's row lock first (PostgreSQL; SQLite has one writer), then reads the account's
  reservations: however many calls are authorized at once, the reservations never add up to more than was
  available. Reading the account row and the rate in config.toml is all an authorization needs: no usage window.

Reserved money counts as spent for the recharge decision (`planning.plans_in`), the account view and
`longest_call_seconds`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from recharged.clock import Clock
from recharged.config import Settings
from recharged.errors import ConflictError, InputError, NotFoundError, RechargedError
from recharged.money import format_ledger
from recharged.rating import TimeRate, longest_call, rate_time
from recharged.states import AuthorizationStatus, EntryType
from recharged.store.engine import Database, dialect_insert
from recharged.store.ledger import lock_account
from recharged.store.models import Account, Authorization, AuthorizationRefusal, Entry

_CALL_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces, as usage event ids
MAX_REQUEST_SECONDS = 86_400


class NotAuthorized(RechargedError):
    """The call may not be placed (HTTP 402): `reason` says why, for the dialer to act on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def view(authorization: Authorization, currency: str) -> dict[str, Any]:
    """An authorization as the API and the command show it."""
    return {
        "id": authorization.id,
        "account_id": authorization.account_id,
        "call_id": authorization.call_id,
        "kind": authorization.kind,
        "requested_seconds": authorization.requested_seconds,
        "authorized_seconds": authorization.authorized_seconds,
        "reserved_amount": format_ledger(authorization.reserved_amount),
        "currency": currency,
        "status": str(authorization.status),
        "created_at": authorization.created_at.isoformat(),
        "expires_at": authorization.expires_at.isoformat(),
        "ended_at": None if authorization.ended_at is None else authorization.ended_at.isoformat(),
        "usage_event_id": authorization.usage_event_id,
    }


def available(account: Account) -> int:
    """What calls may still spend: the balance less what is held for calls in progress, plus the overdraft."""
    return account.balance - account.reserved + account.overdraft


def _end(
    session: Session, account: Account, rows: list[Authorization], status: AuthorizationStatus, at: datetime
) -> int:
    """End open reservations of `account` (locked): their money is no longer held. Returns how much was freed."""
    freed = 0
    for row in rows:
        if row.status == AuthorizationStatus.OPEN:
            row.status, row.ended_at = status, at
            freed += row.reserved_amount
    account.reserved -= freed
    return freed


def expire_account(session: Session, account: Account, at: datetime) -> int:
    """Expire the account's (locked) open reservations whose time is up; returns how many."""
    due = list(
        session.scalars(
            select(Authorization).where(
                Authorization.account_id == account.id,
                Authorization.status == AuthorizationStatus.OPEN,
                Authorization.expires_at <= at,
            )
        )
    )
    _end(session, account, due, AuthorizationStatus.EXPIRED, at)
    return len(due)


def expire_due(db: Database, clock: Clock) -> int:
    """Expire every reservation whose time is up, account by account under each one's lock (the daemon's job)."""
    now = clock.now()
    with db.reading() as session:
        accounts = sorted(
            set(
                session.scalars(
                    select(Authorization.account_id).where(
                        Authorization.status == AuthorizationStatus.OPEN, Authorization.expires_at <= now
                    )
                )
            )
        )
    expired = 0
    for account_id in accounts:  # one transaction each: a busy account holds up no other
        with db.transaction() as session:
            account = lock_account(session, account_id)
            if account is not None:
                expired += expire_account(session, account, now)
    return expired


def _time_rate(settings: Settings, account: Account, kind: str) -> TimeRate:
    plan = settings.plans.get(account.plan)
    if plan is None:
        raise InputError(f"account {account.id} is on plan {account.plan!r}, which {settings.source} does not define")
    rates = plan.rate_table()
    rate = rates.get(kind)
    if rate is None:
        raise InputError(f"unknown kind {kind!r} for plan {account.plan!r} (known: {', '.join(sorted(rates))})")
    if not isinstance(rate, TimeRate):
        raise InputError(f"kind {kind!r} is billed per {rate.unit}, not by time: only calls are authorized")
    return rate


@dataclass(frozen=True, slots=True)
class Granted:
    authorization: dict[str, Any]
    created: bool  # False: this call was authorized before, and this is that authorization


class Authorizer:
    def __init__(self, db: Database, settings: Settings, clock: Clock) -> None:
        self._db, self._settings, self._clock = db, settings, clock
        self._limits = settings.authorizations

    @staticmethod
    def _check_seconds(requested_seconds: int | None) -> None:
        if requested_seconds is not None and not 1 <= requested_seconds <= MAX_REQUEST_SECONDS:
            raise InputError(f"requested_seconds must be between 1 and {MAX_REQUEST_SECONDS}, got {requested_seconds}")

    def _locked(self, session: Session, account_id: str) -> Account:
        account = lock_account(session, account_id)
        if account is None:
            raise NotFoundError(f"no account {account_id!r}")
        return account

    def authorize(self, account_id: str, kind: str, call_id: str, requested_seconds: int | None = None) -> Granted:
        """Authorize a call and hold its money; the same call again answers its first authorization."""
        if not _CALL_ID.fullmatch(call_id):
            raise InputError("call_id must be 1-128 printable characters without spaces")
        self._check_seconds(requested_seconds)
        now = self._clock.now()
        with self._db.transaction() as session:
            account = self._locked(session, account_id)
            earlier = session.scalars(
                select(Authorization).where(Authorization.account_id == account_id, Authorization.call_id == call_id)
            ).one_or_none()
            if earlier is not None:
                return Granted(view(earlier, account.currency), created=False)
            # A refusal is raised after the commit, which keeps its count and the expiries below.
            if account.closed_at is not None:
                refusal = NotAuthorized("account_closed", f"account {account_id} is closed")
            else:
                rate = _time_rate(self._settings, account, kind)
                expire_account(session, account, now)
                money = available(account)
                limit = requested_seconds or self._limits.max_seconds
                seconds = longest_call(money, rate, limit_seconds=limit)
                if seconds > 0:
                    hold = self._hold(session, account, kind, call_id, requested_seconds, seconds, rate, now)
                    return Granted(hold, True)
                refusal = NotAuthorized(
                    "insufficient_balance",
                    f"account {account_id} has {format_ledger(money)} {account.currency} available "
                    f"(balance {format_ledger(account.balance)}, held for calls {format_ledger(account.reserved)}, "
                    f"overdraft {format_ledger(account.overdraft)}): not enough for the shortest {kind} call",
                )
            count_refusal(session, account_id, refusal.reason, now)
        raise refusal

    def _hold(
        self,
        session: Session,
        account: Account,
        kind: str,
        call_id: str,
        requested_seconds: int | None,
        seconds: int,
        rate: TimeRate,
        now: datetime,
    ) -> dict[str, Any]:
        """Record the authorization of a call of `seconds` and hold its cost."""
        authorization = Authorization(
            account_id=account.id,
            call_id=call_id,
            kind=kind,
            requested_seconds=requested_seconds,
            authorized_seconds=seconds,
            reserved_amount=rate_time(seconds, rate).cost,
            status=AuthorizationStatus.OPEN,
            created_at=now,
            expires_at=now + timedelta(seconds=seconds + self._limits.grace_seconds),
        )
        session.add(authorization)
        account.reserved += authorization.reserved_amount
        session.flush()
        return view(authorization, account.currency)

    def _open_one(self, session: Session, authorization_id: int) -> tuple[Authorization, Account]:
        """The authorization and its account, the account locked first (every writer's order)."""
        account_id = session.scalar(select(Authorization.account_id).where(Authorization.id == authorization_id))
        if account_id is None:
            raise NotFoundError(f"no authorization {authorization_id}")
        account = self._locked(session, account_id)
        authorization = session.get(Authorization, authorization_id, populate_existing=True)
        assert authorization is not None
        return authorization, account

    def get(self, authorization_id: int) -> dict[str, Any]:
        with self._db.reading() as session:
            authorization = session.get(Authorization, authorization_id)
            if authorization is None:
                raise NotFoundError(f"no authorization {authorization_id}")
            currency = session.scalar(select(Account.currency).where(Account.id == authorization.account_id))
            return view(authorization, str(currency))

    def release(self, authorization_id: int) -> dict[str, Any]:
        """The call was not placed: its money is no longer held. Releasing it again changes nothing; one its
        usage settled already is a ConflictError."""
        now = self._clock.now()
        with self._db.transaction() as session:
            authorization, account = self._open_one(session, authorization_id)
            if authorization.status == AuthorizationStatus.SETTLED:
                raise ConflictError(
                    f"authorization {authorization_id} was settled by the call's usage ({authorization.usage_event_id})"
                )
            _end(session, account, [authorization], AuthorizationStatus.RELEASED, now)
            return view(authorization, account.currency)

    def extend(self, authorization_id: int, requested_seconds: int | None = None) -> dict[str, Any]:
        """More time for a call in progress: its authorized length grows to `requested_seconds` in all (or as
        long as `max_seconds`), as far as the available money pays; NotAuthorized when it pays for no more."""
        self._check_seconds(requested_seconds)
        now = self._clock.now()
        with self._db.transaction() as session:
            authorization, account = self._open_one(session, authorization_id)
            if authorization.status == AuthorizationStatus.OPEN and authorization.expires_at <= now:
                _end(session, account, [authorization], AuthorizationStatus.EXPIRED, now)
            if authorization.status != AuthorizationStatus.OPEN:
                raise ConflictError(f"authorization {authorization_id} is {authorization.status}: ask for a new one")
            rate = _time_rate(self._settings, account, authorization.kind)
            limit = requested_seconds or self._limits.max_seconds
            # what this call holds already is available to it
            seconds = longest_call(available(account) + authorization.reserved_amount, rate, limit_seconds=limit)
            if seconds > authorization.authorized_seconds:
                cost = rate_time(seconds, rate).cost
                account.reserved += cost - authorization.reserved_amount
                authorization.authorized_seconds, authorization.reserved_amount = seconds, cost
                authorization.requested_seconds = requested_seconds
                authorization.expires_at = authorization.created_at + timedelta(
                    seconds=seconds + self._limits.grace_seconds
                )
                return view(authorization, account.currency)
            refusal = NotAuthorized(
                "insufficient_balance",
                f"account {account.id} has {format_ledger(available(account))} {account.currency} available: "
                f"not enough to make the call longer than {authorization.authorized_seconds} seconds",
            )
            count_refusal(session, account.id, refusal.reason, now)  # raised after the commit, which keeps it
        raise refusal


def count_refusal(session: Session, account_id: str, reason: str, at: datetime) -> None:
    """Count a refused call (402) in its account's row for the hour (the account is locked: no other writer)."""
    hour = at.replace(minute=0, second=0, microsecond=0)
    statement = dialect_insert(session, AuthorizationRefusal.__table__).values(
        account_id=account_id, hour=hour, reason=reason, count=1
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["account_id", "hour", "reason"],
            set_={"count": AuthorizationRefusal.__table__.c["count"] + 1},
        )
    )


def refused_since(db: Database, since: datetime) -> dict[str, int]:
    """Calls refused (402) per reason since the hour that holds `since` (`status`: the last 24 hours)."""
    hour = since.replace(minute=0, second=0, microsecond=0)
    with db.reading() as session:
        rows = session.execute(
            select(AuthorizationRefusal.reason, func.sum(AuthorizationRefusal.count))
            .where(AuthorizationRefusal.hour >= hour)
            .group_by(AuthorizationRefusal.reason)
        ).all()
    return {reason: int(count) for reason, count in sorted(rows)}


def list_open(db: Database, account_id: str) -> list[dict[str, Any]]:
    """The account's open authorizations, oldest first."""
    with db.reading() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFoundError(f"no account {account_id!r}")
        rows = session.scalars(
            select(Authorization)
            .where(Authorization.account_id == account_id, Authorization.status == AuthorizationStatus.OPEN)
            .order_by(Authorization.id)
        )
        return [view(row, account.currency) for row in rows]


def authorizations_of(session: Session, ids: Iterable[int | None]) -> dict[int, str]:
    """The account of each authorization named (in a usage batch), by id; ids that are no authorization are left
    out."""
    wanted = sorted({i for i in ids if i is not None})
    if not wanted:
        return {}
    return dict(
        session.execute(select(Authorization.id, Authorization.account_id).where(Authorization.id.in_(wanted))).all()
    )


def settle(session: Session, settled: list[tuple[int, str]], at: datetime) -> None:
    """Usage just recorded for calls with an authorization (`(authorization_id, event_id)`), in the recording's
    transaction with the accounts locked: each open reservation is settled by its call's usage and its money no
    longer held. One already ended (released, expired, or settled by another event) only has the usage."""
    if not settled:
        return
    ids = sorted({authorization_id for authorization_id, _ in settled})
    rows = {
        row.id: row
        for row in session.scalars(
            select(Authorization).where(Authorization.id.in_(ids), Authorization.status == AuthorizationStatus.OPEN)
        )
    }
    freed: dict[str, int] = {}
    for authorization_id, event_id in settled:
        row = rows.pop(authorization_id, None)
        if row is None:
            continue
        row.status, row.ended_at, row.usage_event_id = AuthorizationStatus.SETTLED, at, event_id
        freed[row.account_id] = freed.get(row.account_id, 0) + row.reserved_amount
    for account_id in sorted(freed):  # the accounts are locked already, in this order
        session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(reserved=Account.reserved - freed[account_id])
            .execution_options(synchronize_session=False)
        )
    session.flush()


def reserved_problems(session: Session) -> list[str]:
    """What `verify` checks of reservations: each account's `reserved` is the sum of its open ones, and each
    settled one names the one usage entry that settled it, of its own account."""
    problems = []
    sums = dict(
        session.execute(
            select(Authorization.account_id, func.sum(Authorization.reserved_amount))
            .where(Authorization.status == AuthorizationStatus.OPEN)
            .group_by(Authorization.account_id)
        ).all()
    )
    for account_id, reserved in session.execute(select(Account.id, Account.reserved)):
        expected = int(sums.get(account_id) or 0)
        if reserved != expected:
            problems.append(
                f"account {account_id}: reserved {format_ledger(reserved)}, its open authorizations hold "
                f"{format_ledger(expected)}"
            )
    orphans = session.execute(
        select(Authorization.id, Authorization.usage_event_id)
        .outerjoin(
            Entry,
            (Entry.entry_type == EntryType.USAGE)
            & (Entry.external_id == Authorization.usage_event_id)
            & (Entry.account_id == Authorization.account_id),
        )
        .where(Authorization.status == AuthorizationStatus.SETTLED, Entry.id.is_(None))
    ).all()
    problems += [
        f"authorization {authorization_id}: settled by usage {event_id!r}, which is no usage entry of its account"
        for authorization_id, event_id in orphans
    ]
    return problems


def held_per_currency(db: Database) -> dict[str, tuple[int, int]]:
    """Open authorizations and the money they hold, per currency (`status`, /metrics)."""
    with db.reading() as session:
        rows = session.execute(
            select(
                Account.currency,
                func.count(Authorization.id),
                func.coalesce(func.sum(Authorization.reserved_amount), 0),
            )
            .join(Account, Account.id == Authorization.account_id)
            .where(Authorization.status == AuthorizationStatus.OPEN)
            .group_by(Account.currency)
        ).all()
    return {currency: (int(count), int(amount)) for currency, count, amount in rows}


def expired_since(db: Database, since: datetime) -> int:
    """Reservations that expired unsettled since `since` (`status`): calls whose usage never came."""
    with db.reading() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Authorization)
                .where(Authorization.status == AuthorizationStatus.EXPIRED, Authorization.ended_at >= since)
            )
            or 0
        )


def balance_of(db: Database, settings: Settings, account_id: str, kind: str = "dialer") -> dict[str, Any]:
    """What a dialer reads before a call, from the account's row alone (one statement by primary key): the
    balance, what is held for calls, the overdraft, what is available, and the longest call of `kind` that pays."""
    with db.reading() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFoundError(f"no account {account_id!r}")
        plan = settings.plans.get(account.plan)
        rate = plan.rate_table().get(kind) if plan is not None else None
        free = available(account)
        return {
            "account_id": account.id,
            "currency": account.currency,
            "balance": format_ledger(account.balance),
            "reserved": format_ledger(account.reserved),
            "overdraft": format_ledger(account.overdraft),
            "available": format_ledger(free),
            "kind": kind,
            "longest_call_seconds": longest_call(free, rate) if isinstance(rate, TimeRate) else None,
            "status": "open" if account.closed_at is None else "closed",
        }
