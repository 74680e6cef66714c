"""Who made a change, beyond the signer's name: the API token a request came with.

The HTTP API sets `via` for the duration of a request (`acting_via`); every audit record written meanwhile, by
whichever service, carries it (`AuditRecord.via`). The CLI sets nothing: its records say NULL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_via: ContextVar[str | None] = ContextVar("recharged_audit_via", default=None)


def current_via() -> str | None:
    return _via.get()


@contextmanager
def acting_via(via: str) -> Iterator[None]:
    token = _via.set(via)
    try:
        yield
    finally:
        _via.reset(token)
