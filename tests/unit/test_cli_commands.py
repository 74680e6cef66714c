"""The `recharged` group lists its commands from a static table (`app.COMMANDS`) so that `recharged --help`
imports no command module: the table must name every command, the module that defines it and its short help,
exactly as the commands themselves do (a command added without updating the table fails here)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import click
import pytest

import recharged.cli
from recharged.cli.app import COMMANDS, main

# What `recharged --help` must not load: the command modules and what only commands need.
HEAVY = ("rich", "pydantic", "sqlalchemy", "stripe", "requests", "fastapi", "uvicorn", "matplotlib", "alembic")
HEAVY += ("jinja2", "structlog", "apscheduler", "prometheus_client", "tenacity", "psycopg")


def command_modules() -> list[str]:
    """Every module of recharged.cli, imported: each adds its commands to the group."""
    names = [m.name for m in pkgutil.iter_modules(recharged.cli.__path__)]
    for name in names:
        importlib.import_module(f"recharged.cli.{name}")
    return names


def widest_limit() -> int:
    """The room click gives a short help in the listing at its widest (max_content_width, less its margins)."""
    return main.context_settings["max_content_width"] - 2 - 6 - max(len(name) for name in main.commands)


def test_the_table_names_every_command_its_module_and_short_help():
    command_modules()
    real = {
        name: (command.callback.__module__.removeprefix("recharged.cli."), command.get_short_help_str(widest_limit()))
        for name, command in main.commands.items()
        if command.callback is not None
    }
    assert set(real) == set(main.commands), "every command has a callback"
    assert dict(sorted(real.items())) == COMMANDS, "update COMMANDS in recharged/cli/app.py to:\n" + "\n".join(
        f"    {name!r}: {entry!r}," for name, entry in sorted(real.items())
    )


@pytest.mark.parametrize("width", [50, 80, 108])  # 108: the widest, max_content_width less 2
def test_the_help_lists_the_commands_as_click_lists_the_real_ones(width):
    command_modules()
    ctx = click.Context(main, info_name="recharged", terminal_width=width)
    lazy, real = ctx.make_formatter(), ctx.make_formatter()
    main.format_commands(ctx, lazy)
    click.Group.format_commands(main, ctx, real)  # click's own, over the commands the modules registered
    assert lazy.getvalue() == real.getvalue()


def test_a_command_is_found_by_name_and_an_unknown_one_is_not():
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    show = main.get_command(ctx, "accounts")
    assert isinstance(show, click.Group)
    assert "show" in show.commands
    assert main.get_command(ctx, "acounts") is None


def help_in_a_fresh_interpreter(*args: str) -> tuple[str, list[str]]:
    """What `recharged ARGS --help` prints, and the modules loaded by then, in a new interpreter."""
    script = (
        "import json, sys\n"
        "from recharged.cli import main\n"
        "try:\n"
        f"    main([*{list(args)!r}, '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout, json.loads(done.stderr.strip().splitlines()[-1])


def test_help_lists_every_command_without_importing_them_or_what_they_need():
    output, loaded = help_in_a_fresh_interpreter()
    for name in COMMANDS:
        assert f"  {name} " in output
    assert "Create, import, change, show, list" in output
    commands = {f"recharged.cli.{module}" for module, _ in COMMANDS.values()}
    assert sorted(commands & set(loaded)) == []
    assert sorted(m for m in loaded if m.split(".")[0] in HEAVY) == []


def test_a_groups_help_imports_only_its_own_module():
    output, loaded = help_in_a_fresh_interpreter("sources")
    assert "Usage: " in output
    assert "reactivate" in output
    others = {f"recharged.cli.{module}" for module, _ in COMMANDS.values()} - {"recharged.cli.funding"}
    assert sorted(others & set(loaded)) == []
