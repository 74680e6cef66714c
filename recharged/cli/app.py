"""The `recharged` group and what its commands share: the composition root that wires settings, database, clock
and services (`App`), the consoles, the error handling and the common options.

The command modules are imported only when one of their commands runs (or shows its help), and so is what
they need: `recharged --help` lists the commands from `COMMANDS` and imports neither them nor settings, the
database, rich, Stripe, the daemon's web stack, matplotlib or Alembic."""

from __future__ import annotations

import gc
import importlib
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from recharged.clock import Clock, SystemClock, parse_instant
from recharged.errors import RechargedError

if TYPE_CHECKING:
    from rich.console import Console

    from recharged.config import Settings
    from recharged.payments import PaymentGateway
    from recharged.recharge import RechargeService
    from recharged.store.engine import Database

    out: Console  # stdout and stderr, made on first use by __getattr__ below
    err: Console

# Every command of the group: name -> (module of recharged.cli that defines it, its short help as `recharged
# --help` lists it at its widest). tests/unit/test_cli_commands.py checks it against the commands themselves.
COMMANDS: dict[str, tuple[str, str]] = {
    "accounts": ("accounts", "Create, import, change, show, list, search, export, close and reopen accounts."),
    "adjust": ("charging", "Record a manual credit or debit on the balance, audited."),
    "api": ("ops", "Serve the HTTP API in a process of its own, on [api] host:port: the endpoints of..."),
    "audit": ("accounts", "Who changed billing settings, when, and the values before and after (newest first)."),
    "authorizations": (
        "authorizations",
        "Calls authorized and the money held for them until their usage arrives (POST...",
    ),
    "auto-recharge": (
        "accounts",
        "Turn automatic recharge on or off, and set this account's own policy (signed and...",
    ),
    "check-config": ("ops", "Validate the configuration and print the effective settings (secrets masked)."),
    "cycle": ("charging", "Run one recharge cycle now: recover unfinished recharges, decide, charge, credit;..."),
    "db": ("ops", "Database schema: upgrade and status."),
    "demo": ("demo", "Sixty days of six made-up customers in under a minute: usage, recharge cycles,..."),
    "events": ("events", "The inbox of processor (Stripe) events: refunds, disputes, card changes and..."),
    "issue-statements": ("mail", "Issue and queue last month's statement for every account that has none yet (the..."),
    "outbox": ("mail", "Emails to customers: `outbox` lists them (failures included), `outbox send`..."),
    "plan": ("charging", "What the next recharge cycle would charge, for every account, and why."),
    "receipts": ("mail", "Credit receipts: `receipts ACCOUNT` lists an account's, `receipts show NUMBER`..."),
    "reconcile": ("charging", "Match the processor's PaymentIntents for our customers one to one with the ledger's..."),
    "recover": ("charging", "Finish every recharge left half-way (after a crash, a timeout or a lost..."),
    "run": ("ops", "Run the daemon: recharge cycles on schedule, the HTTP API, health and metrics,..."),
    "sources": ("funding", "Cards on file: the default is charged first, then the backups in the order added."),
    "statement": ("mail", "An account's monthly statement: as issued, or for a month not issued yet, as it..."),
    "status": ("ops", "The daemon's last and next cycle, what it charged in the last 24 hours, and what..."),
    "testserver": (
        "testserver",
        "Run the bundled Stripe-compatible test server until Ctrl-C or SIGTERM: a sandbox to...",
    ),
    "topup": ("charging", "Charge a one-time purchase of AMOUNT (plus VAT) now and credit the balance."),
    "usage": ("usage", "Record usage: one event, or a CSV of call-detail records."),
    "verify": ("ops", "Prove the ledger's invariants: balances, rating, daily totals, first usage."),
    "webhooks": ("webhooks", "Signed events to the CRM's webhook endpoints: `list` the deliveries, `send` what is..."),
}

_consoles: dict[str, Console] = {}


def __getattr__(name: str) -> Console:
    """`out` and `err`: `from recharged.cli.app import out` makes the console then (a module's __getattr__)."""
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _console(name)


def _console(name: str) -> Console:
    """The console of stdout ("out") or stderr ("err"), made on first use: rich takes a while to import."""
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = (
            Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
            if name == "out"
            else Console(stderr=True, highlight=False, soft_wrap=True)
        )
    return _consoles[name]


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
            from recharged.config import load_settings
            from recharged.logs import configure

            self._settings = load_settings(self.config_path)
            configure(self._settings.logging)
        return self._settings

    def database(self, *, migrated: bool = True) -> Database:
        if self._db is None:
            from recharged.store.engine import Database

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
        from recharged.recharge import RechargeService

        gateway = self.gateway()  # fail before doing anything when the key is missing
        return RechargeService(self.database(), self.settings, lambda: gateway, self.clock)


pass_app = click.make_pass_decorator(App)


def fail(message: str, code: int) -> NoReturn:
    """Print `message` (rich markup) as an error and exit with `code`."""
    _console("err").print(f"[bold red]error:[/] {message}", markup=True)
    sys.exit(code)


class _Group(click.Group):
    """Lists its commands from COMMANDS and imports a command's module when the command is asked for; turns
    recharged's own errors into a clear message and an exit status, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            _import_frozen(f"recharged.cli.{COMMANDS[cmd_name][0]}")  # its decorators add it to the group
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The "Commands" section of `recharged --help`, as click writes it, from COMMANDS alone."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, click.Command(name, help=short).get_short_help_str(limit)) for name, (_, short) in COMMANDS.items()
        ]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RechargedError as exc:
            fail(str(exc).replace("[", r"\["), exc.exit_code)


def _import_frozen(module: str) -> None:
    """Import a command module with the cyclic garbage collector off, then freeze what exists (gc.freeze).

    What it imports (SQLAlchemy, pydantic and the settings, the models) allocates a great many objects that live as
    long as the process and are no garbage: the collector would walk them again and again while they are made,
    and once more at exit (a quarter of what `accounts show` took). Frozen, they are left out of every later
    collection; what the command allocates afterwards is collected as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        importlib.import_module(module)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


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
    help="As the ledger stood at this instant (default: now), e.g. 2026-11-20T12:00Z: the balance, the usage "
    "and the recharges then.",
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
    from recharged.config import default_config_path

    ctx.obj = App(config_path if config_path is not None else default_config_path(os.environ))
