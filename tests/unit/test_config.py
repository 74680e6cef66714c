"""config.toml -> settings: defaults, overrides, and errors that name the file, key, value and what is allowed."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from recharged.config import Settings, load_settings
from recharged.credentials import read_secret
from recharged.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_toml_is_exactly_the_defaults():
    assert load_settings(REPO / "config.toml", environ={}) == Settings()


def test_prices_are_exact_decimals_not_floats(tmp_path):
    text = (REPO / "config.toml").read_text().replace("price_per_minute = 0.0200", "price_per_minute = 0.01999", 1)
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.plans["standard"].rates["dialer"].price_per_minute == Decimal("0.01999")
    assert settings.plans["standard"].rate_table()["dialer"].price_per_minute == 1_999


def test_unknown_key_is_an_error_listing_what_is_allowed(tmp_path):
    path = write(tmp_path, "[recharge]\nthreshhold_days = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert f"{path}: recharge.threshhold_days: unknown setting" in message
    assert "threshold_days" in message.split("allowed here:")[1]


def test_bad_value_names_file_key_value_and_rule(tmp_path):
    path = write(tmp_path, "[recharge]\nthreshold_days = -3\n")
    with pytest.raises(ConfigError, match=rf"{path}: recharge.threshold_days = -3: .*greater than or equal to 1"):
        load_settings(path, environ={})


def test_all_problems_are_reported_at_once(tmp_path):
    text = '[recharge]\nwindow_days = 0\n[recharge.currencies.USD]\nmin_recharge = "lots"\n[usage]\nbatch_size = 0\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    message = str(caught.value)
    for key in ("recharge.window_days = 0", "recharge.currencies.USD.min_recharge = 'lots'", "usage.batch_size = 0"):
        assert key in message


def test_money_with_more_than_five_decimals_is_refused(tmp_path):
    path = write(tmp_path, "[recharge.currencies.USD]\nmin_recharge = 10.000001\n")
    with pytest.raises(ConfigError, match="more than 5 decimal places"):
        load_settings(path, environ={})


def test_rate_with_unknown_measure_is_explained(tmp_path):
    text = '[plans.p]\ncurrency = "EUR"\n[plans.p.rates.dialer]\nmeasure = "weight"\nprice_per_minute = 0.01\n'
    with pytest.raises(ConfigError, match=r"plans.p.rates.dialer.* measure must be 'time' .* or 'count'"):
        load_settings(write(tmp_path, text), environ={})


def test_unknown_currency_is_refused(tmp_path):
    text = '[plans.p]\ncurrency = "XYZ"\n[plans.p.rates.lookup]\nmeasure = "count"\nprice_per_unit = 0.01\n'
    with pytest.raises(ConfigError, match=r"plans.p.currency = 'XYZ': .*unknown currency"):
        load_settings(write(tmp_path, text), environ={})


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "[recharge]\nthreshold_days = 5\n")
    settings = load_settings(path, environ={"RECHARGED_RECHARGE__THRESHOLD_DAYS": "9", "RECHARGED_TEST_X": "ignored"})
    assert settings.recharge.threshold_days == 9


def test_bad_environment_value_names_the_variable(tmp_path):
    with pytest.raises(
        ConfigError, match=r"environment RECHARGED_RECHARGE__WINDOW_DAYS: recharge.window_days = 'soon'"
    ):
        load_settings(None, environ={"RECHARGED_RECHARGE__WINDOW_DAYS": "soon"})


def test_caps_can_be_switched_off(tmp_path):
    settings = load_settings(write(tmp_path, '[recharge.currencies.USD]\nmax_recharge = "off"\n'), environ={})
    assert settings.recharge.currencies["USD"].max_recharge is None
    assert settings.policy_of("standard").max_recharge is None
    assert settings.policy_of("standard").max_charged_per_day == 200_000_000  # the rest stays built in


JPY_PLAN = '[plans.yen]\ncurrency = "JPY"\n[plans.yen.rates.dialer]\nmeasure = "time"\nprice_per_minute = 3\n'


def test_amounts_are_per_currency(tmp_path):
    """A JPY account used to get the bare [recharge] numbers: a 10 yen minimum recharge (below Stripe's 50) and
    a 1,000 yen ceiling."""
    settings = load_settings(write(tmp_path, JPY_PLAN), environ={})
    yen, dollars = settings.policy_of("yen"), settings.recharge.policy("USD")
    assert (yen.min_recharge, yen.max_recharge) == (100_000_000, 10_000_000_000)  # 1,000 and 100,000 yen
    assert (dollars.min_recharge, dollars.max_recharge) == (1_000_000, 100_000_000)  # 10.00 and 1,000.00 USD


def test_a_plan_overrides_its_currency_amounts(tmp_path):
    text = JPY_PLAN + "[plans.yen.recharge]\nmax_recharge = 50000\nthreshold_days = 3\n"
    policy = load_settings(write(tmp_path, text), environ={}).policy_of("yen")
    assert (policy.max_recharge, policy.threshold_days, policy.min_recharge) == (5_000_000_000, 3, 100_000_000)


def test_bare_amounts_say_where_they_go_now(tmp_path):
    with pytest.raises(ConfigError, match=r"min_recharge: recharge amounts are set per currency now.*currencies.USD"):
        load_settings(write(tmp_path, "[recharge]\nmin_recharge = 10\n"), environ={})


def test_a_plan_in_a_currency_without_amounts_is_refused(tmp_path):
    text = '[plans.kw]\ncurrency = "KWD"\n[plans.kw.rates.lookup]\nmeasure = "count"\nprice_per_unit = 0.01\n'
    with pytest.raises(ConfigError, match=r"plans.kw: priced in KWD, which has no recharge amounts.*currencies.KWD"):
        load_settings(write(tmp_path, text), environ={})
    text += "[recharge.currencies.KWD]\nmin_threshold = 1\nmin_recharge = 3\nmax_recharge = 300\n"
    text += 'max_charged_per_day = 600\nmax_charged_per_30_days = "off"\n'
    assert load_settings(write(tmp_path, text), environ={}).policy_of("kw").min_recharge == 300_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[recharge.currencies.USD]\nmin_recharge = 50\nmax_recharge = 20\n",
            "recharge.currencies.USD: min_recharge 50.00 USD is above max_recharge 20.00 USD",
        ),
        (
            "[recharge.currencies.EUR]\nmax_recharge = 3000\n",
            "recharge.currencies.EUR: max_recharge 3000.00 EUR is above max_charged_per_day 2000.00 EUR",
        ),
        (
            JPY_PLAN + "[plans.yen.recharge]\nmin_recharge = 300000\n",
            "plans.yen.recharge (over recharge.currencies.JPY): min_recharge 300000 JPY is above max_recharge 100000",
        ),
        (
            "[recharge.currencies.GBP]\nmax_recharge = 0.20\n",
            "max_recharge 0.20 GBP is below the processor's minimum charge of 0.30 GBP",
        ),
    ],
)
def test_contradictions_are_refused_naming_both_keys(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert message in str(caught.value)


@pytest.mark.parametrize("key", ["stripe_api_key", "password", "api_tokens", "smtp_password"])
def test_secrets_in_config_toml_are_refused(tmp_path, key):
    with pytest.raises(ConfigError, match=r"secrets never go in config.toml"):
        load_settings(write(tmp_path, f'[database]\n{key} = "hunter2"\n'), environ={})


def test_not_toml_is_reported_with_the_file(tmp_path):
    path = write(tmp_path, "[recharge\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML"):
        load_settings(path, environ={})


def test_secret_comes_from_environment_before_credentials(tmp_path):
    (tmp_path / "stripe_api_key").write_text("sk_test_from_file\n")
    from_file = read_secret("stripe_api_key", {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert from_file is not None
    assert from_file.value == "sk_test_from_file"
    both = {"CREDENTIALS_DIRECTORY": str(tmp_path), "RECHARGED_STRIPE_API_KEY": "sk_test_env"}
    secret = read_secret("stripe_api_key", both)
    assert secret is not None
    assert secret.value == "sk_test_env"
    assert "sk_test" not in repr(secret)
    assert "sk_test" not in str(secret)
    assert read_secret("stripe_api_key", {}) is None


def test_every_setting_is_written_out_in_config_toml_and_the_readme():
    import tomllib

    shipped = tomllib.loads((REPO / "config.toml").read_text())
    readme = (REPO / "README.md").read_text()
    for section, field in Settings.model_fields.items():
        if section == "plans":
            continue
        for key in field.annotation.model_fields:
            assert key in shipped[section], f"config.toml lacks {section}.{key}"
            assert key in readme, f"README.md does not describe {section}.{key}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:/recharged.db", "'sqlite:/recharged.db' is not a SQLite URL: write sqlite:///relative/path.db"),
        ("sqlite://", "'sqlite://' names no database file"),
        ("recharged.db", "'recharged.db' is not a URL"),
        ("mysql://app@db/recharged", "mysql:// is not supported: recharged runs on SQLite"),
        ("postgresql://app@db", "the PostgreSQL URL names no database"),
        ("postgresql://app:hunter2@db/recharged", "a password in the URL in a config file: remove it"),
    ],
)
def test_database_urls_are_checked_before_any_connection(tmp_path, url, message):
    """Issue 14, item 4: `sqlite:/recharged.db` gave a SQLAlchemy traceback, `mysql://` passed check-config, and a
    password written into config.toml was taken."""
    path = write(tmp_path, f'[database]\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert f"{path}: database.url: {message}" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_a_password_in_the_url_may_come_from_the_environment(tmp_path):
    url = "postgresql://app:hunter2@db/recharged"
    settings = load_settings(None, environ={"RECHARGED_DATABASE__URL": url})
    assert settings.database.url == url
    assert load_settings(None, environ={"RECHARGED_DATABASE__URL": "sqlite:////var/lib/recharged/r.db"})


def test_a_misspelt_section_in_the_environment_names_the_variable():
    with pytest.raises(ConfigError, match=r"environment RECHARGED_RECHARG__THRESHOLD_DAYS: recharg: unknown setting"):
        load_settings(None, environ={"RECHARGED_RECHARG__THRESHOLD_DAYS": "3"})


def test_a_cap_that_is_not_an_amount_mentions_off(tmp_path):
    path = write(tmp_path, '[recharge.currencies.USD]\nmax_recharge = "of"\n')
    with pytest.raises(ConfigError, match=r"max_recharge = 'of': must be an amount such as 1000.00, or \"off\""):
        load_settings(path, environ={})
