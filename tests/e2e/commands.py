"""Running the real `recharged` command in end-to-end tests: one way to build the runner and its environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
Runner = Callable[..., subprocess.CompletedProcess[str]]


def command_runner(cwd: Path, env: dict[str, str]) -> Runner:
    """`run(*args, config=..., **extra_env)` runs `python -m recharged --config CONFIG ARGS` in `cwd`."""

    def run(
        *args: str, config: Path | None = REPO / "config.toml", **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["--config", str(config)] if config else []
        return subprocess.run(
            [sys.executable, "-m", "recharged", *prefix, *args],
            capture_output=True,
            text=True,
            env={**env, **extra_env},
            cwd=cwd,
            timeout=120,
        )

    return run


def charging_env(db_url: str, stripe_url: str) -> dict[str, str]:
    """The environment of commands that charge through the local Stripe-compatible server, retrying at once."""
    return {
        **os.environ,
        "RECHARGED_DATABASE__URL": db_url,
        "RECHARGED_PAYMENTS__STRIPE_API_BASE": stripe_url,
        "RECHARGED_PAYMENTS__RETRY_INITIAL_SECONDS": "0",
        "RECHARGED_PAYMENTS__RETRY_MAX_SECONDS": "0",
        "RECHARGED_OUTBOX__RETRY_INITIAL_SECONDS": "0",
        "RECHARGED_OUTBOX__RETRY_MAX_SECONDS": "0",
        "RECHARGED_STRIPE_API_KEY": "sk_test_cli",
        "RECHARGED_ACTOR": "Jane Doe",
        "RECHARGED_LOGGING__LEVEL": "warning",
    }


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The command's output, after checking it succeeded (the failure shows what it printed)."""
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout
