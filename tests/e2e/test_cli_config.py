"""The configuration checked against the data (issue 14, item 3): a config.toml that drops a plan, a currency or a
usage kind the database's accounts use is refused by `check-config` and by the daemon's start, with the list of
what is missing, instead of passing and then refusing every usage event."""

from __future__ import annotations

import os

import pytest

from tests.e2e.commands import REPO, command_runner, ok

PREMIUM_ONLY = """
[plans.premium]
currency = "USD"

[plans.premium.rates.dialer]
measure = "time"
price_per_minute = 0.03
"""


@pytest.fixture
def run(tmp_path, db_url):
    env = {**os.environ, "RECHARGED_DATABASE__URL": db_url, "RECHARGED_ACTOR": "Jane Doe"}
    return command_runner(tmp_path, env)


def test_check_config_and_the_daemon_refuse_a_config_that_drops_a_plan_in_use(run, tmp_path):
    ok(run("db", "upgrade"))
    ok(run("accounts", "import", str(REPO / "examples" / "accounts.csv")))
    assert "checked against the accounts in" in ok(run("check-config"))
    premium = tmp_path / "premium.toml"
    premium.write_text(PREMIUM_ONLY, encoding="utf-8")
    checked = run("check-config", config=premium)
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert "plans.standard: used by 6 accounts (e.g. acme-law), but the configuration lacks it" in checked.stderr
    assert "(it has: premium)" in checked.stderr
    daemon = run("run", config=premium, RECHARGED_HTTP__ENABLED="false")
    assert daemon.returncode == 78, daemon.stdout + daemon.stderr
    assert "plans.standard: used by 6 accounts" in daemon.stderr


def test_check_config_refuses_a_plan_that_lost_a_kind_in_use(run, tmp_path):
    ok(run("db", "upgrade"))
    ok(run("accounts", "import", str(REPO / "examples" / "accounts.csv")))
    rejects = str(tmp_path / "rejects.csv")
    ok(run("usage", "import", str(REPO / "examples" / "usage.csv"), "--rejects", rejects, "--accept-rejects"))
    narrow = tmp_path / "narrow.toml"
    narrow.write_text(PREMIUM_ONLY.replace("premium", "standard"), encoding="utf-8")
    checked = run("check-config", config=narrow)
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert "plans.standard.rates.outbound: usage of this kind was recorded" in checked.stderr


def test_check_config_on_a_fresh_directory_creates_no_database(run, tmp_path):
    result = run("check-config", RECHARGED_DATABASE__URL=f"sqlite:///{tmp_path / 'none.db'}")
    assert "not checked against a database" in ok(result)
    assert not (tmp_path / "none.db").exists()


def test_check_config_names_the_api_tokens_and_their_scopes_never_their_secrets(run):
    secret = "crm-secret-0123456789abcdef"
    shown = ok(run("check-config", RECHARGED_API_TOKENS=f"crm:billing:write+accounts:read:{secret}"))
    assert 'api_tokens.crm = "accounts:read+billing:write"' in shown
    assert secret not in shown
    refused = run("check-config", RECHARGED_API_TOKENS=f"crm:billing:wrte:{secret}")
    assert refused.returncode == 78
    assert "unknown scope 'billing:wrte'" in refused.stderr
    assert secret not in refused.stderr
