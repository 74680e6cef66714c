"""The `recharged` command. `app` holds the group and what its commands share, `render` the output that several
commands print; each other module adds one group of commands to the group when it is imported."""

from recharged.cli import accounts, charging, demo, events, funding, mail, ops, usage  # noqa: F401 (registers the commands)
from recharged.cli.app import main

__all__ = ["main"]
