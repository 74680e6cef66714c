"""Crash points for the crash tests: `RECHARGED_CRASH_AT=name` (or `name:N`, the N-th time it is reached)
makes the process kill itself with SIGKILL there, as `kill -9` would. Unset, a crash point does nothing."""

from __future__ import annotations

import os
import signal

_ENV = "RECHARGED_CRASH_AT"
_seen: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """Die here, at once and without cleanup, if the environment asks for it."""
    wanted = os.environ.get(_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
