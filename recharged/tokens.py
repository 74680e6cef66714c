"""The HTTP API's bearer tokens, each with a name and scopes.

`RECHARGED_API_TOKENS` (or the credential `api_tokens`) holds comma- or newline-separated entries
`NAME:SCOPES:SECRET`, the scopes joined with `+` (`dialer:usage:write+accounts:read:SECRET`). A bare secret, the
format before scopes, is a full-access token named `default` (`default-2`, ... for more than one; the daemon
warns at start-up).

Only a SHA-256 digest of each secret is kept in memory; a presented token is compared with every digest in
constant time, and nothing but the token's name ever reaches a log or the audit trail.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from recharged.credentials import read_secret
from recharged.errors import ConfigError

USAGE_WRITE = "usage:write"
ACCOUNTS_READ = "accounts:read"
BILLING_WRITE = "billing:write"
ADMIN = "admin"
SCOPES = {
    USAGE_WRITE: "post usage (and authorize calls)",
    ACCOUNTS_READ: "every GET under /v1/",
    BILLING_WRITE: "accounts, automatic recharge, top-ups, funding sources",
    ADMIN: "everything, adjustments included",
}
LEGACY_NAME = "default"
MIN_SECRET_LENGTH = 16
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}", re.IGNORECASE)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class ApiToken:
    name: str
    scopes: frozenset[str]
    digest: bytes = field(repr=False)
    legacy: bool = False  # a bare secret of the format before scopes

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


def parse_tokens(text: str, source: str) -> tuple[ApiToken, ...]:
    """The tokens of one secret's value. ConfigError names the entry (by position and name, never its secret)."""
    entries = [entry.strip() for entry in text.replace("\n", ",").split(",") if entry.strip()]
    tokens: list[ApiToken] = []
    for position, entry in enumerate(entries, 1):
        where = f"api_tokens ({source}), entry {position}"
        legacy = ":" not in entry
        if legacy:  # several bare secrets (a rotation) are default, default-2, ...
            bare = sum(1 for token in tokens if token.legacy)
            name, scopes, secret = LEGACY_NAME if not bare else f"{LEGACY_NAME}-{bare + 1}", frozenset({ADMIN}), entry
        else:
            parts = entry.split(":")
            # the scopes contain colons themselves (usage:write): the name is the first part, the secret the last
            if len(parts) < 3:
                raise ConfigError(f"{where}: write NAME:SCOPES:SECRET (scopes joined with +), or a bare secret")
            name, secret = parts[0], parts[-1]
            scopes_text = ":".join(parts[1:-1])
            if not _NAME.fullmatch(name):
                raise ConfigError(f"{where}: the name must be letters, digits, '_', '.' or '-' (at most 63)")
            where = f"api_tokens ({source}), token {name!r}"
            given = [scope.strip() for scope in scopes_text.split("+")]
            unknown = [repr(scope) for scope in given if scope not in SCOPES]
            if unknown:
                raise ConfigError(
                    f"{where}: unknown scope {', '.join(unknown)} (known: {', '.join(SCOPES)}; join several with +)"
                )
            scopes = frozenset(given)
        if len(secret) < MIN_SECRET_LENGTH:
            raise ConfigError(f"{where}: the secret must have at least {MIN_SECRET_LENGTH} characters")
        tokens.append(ApiToken(name, scopes, _digest(secret), legacy))
    names = [token.name for token in tokens]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"api_tokens ({source}): the name {twice[0]!r} is given to more than one token")
    digests = [token.digest for token in tokens]
    if len(set(digests)) != len(digests):
        raise ConfigError(f"api_tokens ({source}): two tokens have the same secret")
    return tuple(tokens)


def configured_tokens(environ: Mapping[str, str] | None = None) -> tuple[ApiToken, ...]:
    """The tokens of RECHARGED_API_TOKENS or the credential api_tokens; none when neither is set."""
    secret = read_secret("api_tokens", environ)
    return () if secret is None else parse_tokens(secret.value, secret.source)


def find_token(tokens: Sequence[ApiToken], presented: str) -> ApiToken | None:
    """The token whose secret is `presented`; every digest is compared, in constant time, whatever matches."""
    digest = _digest(presented)
    found = None
    for token in tokens:
        if hmac.compare_digest(digest, token.digest):
            found = token
    return found


def presented_secret(text: str) -> str | None:
    """The secret a command line client sends to the daemon (the first entry's secret), when it has tokens."""
    for entry in (entry.strip() for entry in text.replace("\n", ",").split(",")):
        if entry:
            return entry.rsplit(":", 1)[-1] if ":" in entry else entry
    return None
