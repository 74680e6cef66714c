"""The `recharged` group and what its commands share: the composition root that wires settings, database, clock
and services (`App`), the consoles, the error handling and the common options."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from recharged.clock import Clock, SystemClock, parse_instant
from recharged.config import Settings, default_config_path, load_settings
from recharged.errors import RechargedError
from recharged.logs import configure
from recharged.payments import PaymentGateway
from recharged.recharge import RechargeService
from recharged.store.engine import Database

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class App:
    """What every command may need, built on first use."""

    config_path: Path | None
    clock: Clock = field(default_factory=SystemClock)
    _settings: Settings | None = None
    _db: Database | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
            configure(self._settings.logging)
        return self._settings

    def database(self, *, migrated: bool = True) -> Database:
        if self._db is None:
            self._db = Database(self.settings.database.url)
        if migrated:
            self._db.require_current()
        return self._db

    def gateway(self) -> PaymentGateway:
        """The Stripe gateway; the key comes only from the environment or systemd credentials."""
        # lazy: the daemon package loads prometheus_client and the webhook handler, which only charging needs
        from recharged.daemon.runtime import stripe_gateway

        return stripe_gateway(self.settings, None, None, self.clock)

    def recharges(self) -> RechargeService:
        gateway = self.gateway()  # fail before doing anything when the key is missing
        return RechargeService(self.database(), self.settings, lambda: gateway, self.clock)


pass_app = click.make_pass_decorator(App)


def fail(message: str, code: int) -> NoReturn:
    """Print `message` (rich markup) as an error and exit with `code`."""
    err.print(f"[bold red]error:[/] {message}", markup=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns recharged's own errors into a clear message and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RechargedError as exc:
            fail(str(exc).replace("[", r"\["), exc.exit_code)


def parse_at(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


actor_option = click.option(
    "--actor",
    envvar="RECHARGED_ACTOR",
    required=True,
    help='First and last name of the admin signing this billing change (or $RECHARGED_ACTOR), e.g. "Jane Doe".',
)
at_option = click.option(
    "--at",
    "at",
    metavar="ISO",
    callback=parse_at,
    help="Decide as of this instant (default: now), e.g. 2026-11-20T12:00Z.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="config.toml to use (default: $RECHARGED_CONFIG, else ./config.toml, else built-in defaults).",
)
@click.version_option(package_name="recharged")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """recharged: prepaid dialer balances, usage rating and automatic recharge."""
    ctx.obj = App(config_path if config_path is not None else default_config_path(os.environ))
