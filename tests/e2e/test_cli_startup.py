"""A command loads what it needs and no more (issue 14 item 8, "the CLI is slow to answer"): `accounts show`
answers without the Stripe SDK, the daemon's web stack, matplotlib, the email templates or Alembic. How fast it
answers is measured in bench/cli_startup.py, never here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from recharged.store.engine import Database
from tests.e2e.commands import REPO, command_runner, ok

NOT_FOR_SHOW = ("stripe", "requests", "fastapi", "uvicorn", "starlette", "matplotlib", "alembic", "jinja2")
NOT_FOR_SHOW += ("apscheduler", "prometheus_client")


def test_accounts_show_loads_neither_stripe_nor_the_web_stack_nor_alembic(tmp_path, db_url):
    env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_ACTOR": "Jane Doe"}
    run = command_runner(tmp_path, env)
    ok(run("db", "upgrade"))
    ok(run("accounts", "create", "acme", "--email", "b@acme.example", "--plan", "standard", "--vat-percent", "20"))
    script = (
        "import json, sys\n"
        "from recharged.cli import main\n"
        "try:\n"
        f"    main(['--config', {str(REPO / 'config.toml')!r}, 'accounts', 'show', 'acme'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "acme" in done.stdout
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert sorted(m for m in loaded if m.split(".")[0] in NOT_FOR_SHOW) == []


def test_the_schema_check_without_alembic_still_refuses_a_database_not_upgraded(tmp_path):
    """Every command checks the schema version, now without importing Alembic: an empty database is still refused
    with the way out, `db status` still tells, and after `db upgrade` both agree."""
    env = {**os.environ, "RECHARGED_DATABASE__URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    run = command_runner(tmp_path, env)
    refused = run("accounts", "show", "acme")
    assert refused.returncode == 69, refused.stderr
    assert "has no recharged schema: run `recharged db upgrade`" in refused.stderr
    status = run("db", "status")
    assert status.returncode == 1
    head = Database("sqlite://").alembic_head_revision()
    assert f"schema none, newest {head}: needs `recharged db upgrade`" in status.stdout
    ok(run("db", "upgrade"))
    assert "up to date" in ok(run("db", "status"))
    shown = run("accounts", "show", "acme")
    assert shown.returncode == 3, shown.stderr  # past the schema check: no such account
