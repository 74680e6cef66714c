"""recharged's one error tree.

RechargedError
├── ConfigError          config.toml or the environment is wrong; the command exits 78 (EX_CONFIG)
├── InputError           an argument, a CSV row or an API payload is wrong; nothing was written
│   └── ActorError       a billing change was not signed with a first and last name
├── NotFoundError        an account (or other record) that was named does not exist
├── ConflictError        the request contradicts what is recorded (same id, different content)
└── DatabaseError        the database is missing, not migrated, or unreachable
"""

from __future__ import annotations


class RechargedError(Exception):
    """Base of every error recharged raises on purpose."""

    exit_code = 1


class ConfigError(RechargedError):
    """The configuration is invalid; nothing starts."""

    exit_code = 78


class InputError(RechargedError):
    """Bad input: the message names what was wrong and where."""

    exit_code = 2


class ActorError(InputError):
    """A billing change needs a signature: the admin's first and last name."""


class NotFoundError(RechargedError):
    """A named record does not exist."""

    exit_code = 3


class ConflictError(RechargedError):
    """The input contradicts what is already recorded."""

    exit_code = 4


class DatabaseError(RechargedError):
    """The database cannot be used as it is (missing, not migrated, unreachable)."""

    exit_code = 69
