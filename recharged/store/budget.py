"""The processor budget that every instance on one PostgreSQL database shares: `payments.max_requests_per_second`
is the whole deployment's, not each instance's.

One row per budget holds its next free slot, on the database's clock (every instance reads the same one, whatever
its own host's says). A request takes the slot in one statement, in a transaction of its own (autocommit, never
inside a caller's), that moves the row on by 1/rate; the caller then sleeps until the slot. Nothing is held between
requests, so an instance killed at any point leaves behind at most the slots it had taken, a moment of the budget.
The statement makes the row when it is missing; each request moves it on by its own instance's rate, so a reload
with another rate paces the next request by it. The table is UNLOGGED (migration 0015): a crash or a failover may
lose the row, which the next request makes again.

On SQLite one instance works on a database file, and the process paces itself (`payments.RateLimiter`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from recharged.errors import DatabaseError
from recharged.store.engine import masked_url, normalize_url

PROCESSOR = "stripe"  # the budget of the payment processor's account

# A next slot further ahead than this many slots is not a queue of requests (charge_concurrency is at most 256 per
# instance) but the database's clock set back since it was written: the budget starts again from now, instead of
# holding every request back for as long as the clock jumped.
HORIZON_SLOTS = 1024

# How long a request waits for its slot's statement (to connect, for a pooled connection, for the row) before it
# fails as a transient error: the gateway retries it like a processor that did not answer, and nothing was sent.
TIMEOUT_SECONDS = 5
CONNECTIONS = 4  # each request holds one for a round trip only

_TAKE = text(
    """
    INSERT INTO processor_budgets AS budget (name, next_slot) VALUES (:name, clock_timestamp() + :spacing)
    ON CONFLICT (name) DO UPDATE SET next_slot = CASE
        WHEN budget.next_slot > clock_timestamp() + :horizon THEN clock_timestamp()
        ELSE greatest(budget.next_slot, clock_timestamp())
    END + :spacing
    RETURNING budget.next_slot - :spacing AS slot, clock_timestamp() AS now
    """
)


@dataclass(frozen=True, slots=True)
class Slot:
    """A slot taken: when it is, and the database's time when it was taken (both on the database's clock)."""

    at: datetime
    taken_at: datetime

    @property
    def wait(self) -> float:
        """Seconds from when it was taken until the slot (0 when it was free at once)."""
        return max(0.0, (self.at - self.taken_at).total_seconds())


def spacing(per_second: float) -> timedelta:
    """1/per_second, rounded up to the database's microseconds: slots are never closer than the rate allows."""
    return timedelta(microseconds=math.ceil(1_000_000 / per_second))


class SharedBudget:
    """A processor budget in PostgreSQL, taken slot by slot by every instance. It keeps a few connections of its
    own, in autocommit, without the pre-ping of the main engine's pool: one round trip per request."""

    def __init__(self, url: str, name: str = PROCESSOR) -> None:
        self.url, self.name = normalize_url(url), name
        self._engine = _engine(self.url)

    def take(self, per_second: float) -> Slot:
        """The next free slot, at `per_second` requests per second; the budget moves on past it. DatabaseError when
        the database cannot give one (unreachable, or no answer within TIMEOUT_SECONDS)."""
        step = spacing(per_second)
        params = {"name": self.name, "spacing": step, "horizon": step * HORIZON_SLOTS}
        for attempt in (1, 2):
            try:
                with self._engine.connect() as connection:
                    slot, now = connection.execute(_TAKE, params).one()
                return Slot(slot, now)
            except DBAPIError as exc:
                # A pooled connection the database dropped (it restarted) is found by using it: once more, anew.
                if attempt == 1 and exc.connection_invalidated:
                    continue
                raise DatabaseError(f"processor budget in {masked_url(self.url)}: {exc.orig}") from exc
            except SQLAlchemyError as exc:  # e.g. every connection busy past the pool's timeout
                raise DatabaseError(f"processor budget in {masked_url(self.url)}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._engine.dispose()


@functools.cache
def shared_budget(url: str, name: str = PROCESSOR) -> SharedBudget | None:
    """The deployment's processor budget when the database is PostgreSQL; None on SQLite (one instance). One per
    database and process: each reload builds a new gateway, and its connections would otherwise stay open."""
    if make_url(normalize_url(url)).get_backend_name() != "postgresql":
        return None
    return SharedBudget(url, name)


def _engine(url: str) -> Engine:
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_size=CONNECTIONS,
        max_overflow=0,
        pool_timeout=TIMEOUT_SECONDS,
        connect_args={"connect_timeout": TIMEOUT_SECONDS},
    )

    @event.listens_for(engine, "connect")
    def _bounded(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET statement_timeout = {TIMEOUT_SECONDS * 1000}")
        cursor.close()
        dbapi_connection.commit()

    return engine
