"""The `recharged` command. `app` holds the group and what its commands share, `render` the output that several
commands print; each other module adds one group of commands to the group when it is imported, which the group
does when one of them is asked for (`app.COMMANDS` names the module of each command)."""

from recharged.cli.app import main

__all__ = ["main"]
