"""Time is UTC and injected: code that needs `now` takes a Clock (or a datetime) instead of reading the system."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that stands still until told to move: for tests and for `--at`."""

    def __init__(self, at: datetime) -> None:
        self._at = as_utc(at)

    def now(self) -> datetime:
        return self._at

    def advance(self, delta: timedelta) -> None:
        self._at += delta

    def set(self, at: datetime) -> None:
        self._at = as_utc(at)


def as_utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is refused rather than guessed."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{value.isoformat()} has no UTC offset; give one, e.g. {value.isoformat()}Z")
    return value.astimezone(UTC)


def parse_instant(text: str) -> datetime:
    """Parse an ISO 8601 instant with an offset (`Z` allowed) into UTC.

    Raises ValueError naming the text when it is not a valid instant or lacks an offset.
    """
    raw = text.strip()
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date-time (e.g. 2026-11-01T09:30:00Z)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; add Z or +HH:MM")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-23:59 is past the year 9999 in UTC
        raise ValueError(f"{text!r} is out of range in UTC") from None


def midnight(day: date) -> datetime:
    """The UTC midnight at which a UTC day begins."""
    return datetime.combine(day, time(), tzinfo=UTC)


def start_of_day(value: datetime) -> datetime:
    """Midnight UTC of the UTC day that holds `value`."""
    utc = as_utc(value)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)
