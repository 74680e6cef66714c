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
    with pytest.raises(ConfigError, match=rf"{path}: recharge.threshold_days = -3: .*greater than or equal to 0"):
        load_settings(path, environ={})


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, '[recharge]\nwindow_days = 0\nmin_recharge = "lots"\n[usage]\nbatch_size = 0\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    for key in ("recharge.window_days = 0", "recharge.min_recharge = 'lots'", "usage.batch_size = 0"):
        assert key in message


def test_money_with_more_than_five_decimals_is_refused(tmp_path):
    path = write(tmp_path, "[recharge]\nmin_recharge = 10.000001\n")
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
    settings = load_settings(write(tmp_path, '[recharge]\nmax_recharge = "off"\n'), environ={})
    assert settings.recharge.max_recharge is None
    assert settings.recharge.policy().max_recharge is None


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
