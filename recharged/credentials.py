"""Secrets come from the environment or from systemd credentials, never from config.toml.

Each secret has an environment variable and a credential file name: `RECHARGED_STRIPE_API_KEY` or
`$CREDENTIALS_DIRECTORY/stripe_api_key` (systemd's LoadCredential=). The environment wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from recharged.errors import ConfigError

SECRET_NAMES = ("stripe_api_key", "stripe_webhook_secret", "api_tokens", "smtp_password")


def env_name(name: str) -> str:
    return f"RECHARGED_{name.upper()}"


@dataclass(frozen=True)
class Secret:
    """A secret value that never shows itself in repr, str or logs."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<secret from {self.source}>"


def read_secret(name: str, environ: Mapping[str, str] | None = None) -> Secret | None:
    """The secret `name`, or None when neither the environment nor a credential file holds it."""
    env = os.environ if environ is None else environ
    variable = env_name(name)
    if env.get(variable):
        return Secret(env[variable], f"environment {variable}")
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = Path(directory) / name
        if path.is_file():
            try:
                value = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"credential {path} cannot be read: {exc.strerror}") from None
            if value:
                return Secret(value, f"credential {path}")
    return None


def describe(name: str, environ: Mapping[str, str] | None = None) -> str:
    """Where a secret comes from, masked, for `check-config`."""
    secret = read_secret(name, environ)
    if secret is None:
        return f"not set (set {env_name(name)} or credential file {name})"
    return f"set, from {secret.source} (value hidden)"
