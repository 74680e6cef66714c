"""Currencies through the charge flow: what Stripe receives for zero-, two- and three-decimal currencies and for
ISK, top-ups outside Stripe's limits refused before any request, and an automatic recharge raised to Stripe's
minimum (the plan says so, and so does the receipt)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from recharged.config import STANDARD_CURRENCY_POLICIES, Settings, load_settings
from recharged.errors import InputError
from recharged.mail.receipts import receipt_text
from recharged.planning import plan_accounts
from recharged.recharge import RechargeService
from recharged.store.models import Account, Receipt, Recharge
from recharged.verify import verify
from tests.helpers import busy_account

ACTOR = "Jane Doe"


def settings_in(tmp_path: Path, currency: str) -> Settings:
    """The defaults with the standard plan in `currency` (0.02 a dialer minute) and the outbox in `tmp_path`; a
    currency with no built-in recharge amounts gets no floors and no caps."""
    config = tmp_path / f"config-{currency}.toml"
    amounts = (
        ""
        if currency in STANDARD_CURRENCY_POLICIES
        else (
            f'[recharge.currencies.{currency}]\nmin_threshold = 0\nmin_recharge = 0\nmax_recharge = "off"\n'
            'max_charged_per_day = "off"\nmax_charged_per_30_days = "off"\n\n'
        )
    )
    config.write_text(
        f'{amounts}[plans.standard]\ncurrency = "{currency}"\n\n'
        '[plans.standard.rates.dialer]\nmeasure = "time"\nprice_per_minute = 0.02\nincrement_seconds = 60\n',
        encoding="utf-8",
    )
    environ = {
        "RECHARGED_OUTBOX__JOURNAL": str(tmp_path / "outbox.journal"),
        "RECHARGED_OUTBOX__FOLDER": str(tmp_path / "eml"),
    }
    return load_settings(config, environ=environ)


@pytest.fixture
def make_service(db, gateway_factory, clock, tmp_path):
    def make(currency: str) -> tuple[Settings, RechargeService]:
        settings = settings_in(tmp_path, currency)
        return settings, RechargeService(db, settings, gateway_factory, clock)

    return make


def recharges(db) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(Recharge)) or 0)


def balance(db, account: str = "acme") -> int:
    with db.transaction() as s:
        row = s.get(Account, account)
        assert row is not None
        return int(row.balance)


# --- refused before any request ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "vat", "amount", "message"),
    [
        (
            "USD",
            "20",
            10_000,
            "top-up of 0.10 USD (0.12 USD with VAT) is below Stripe's minimum charge of 0.50 USD",
        ),
        ("JPY", "0", 4_000_000, "top-up of 40 JPY is below Stripe's minimum charge of 50 JPY"),
        (
            "USD",
            "20",
            90_000_000_000,
            "top-up of 900000.00 USD (1080000.00 USD with VAT) is above Stripe's maximum charge of 999999.99 USD",
        ),
        (
            "KWD",
            "0",
            123_400,
            "top-up of 1.234 KWD is not a whole multiple of 0.010 KWD, the smallest amount Stripe charges in KWD",
        ),
        (
            "ISK",
            "0",
            550_000,
            "top-up of 5.5 ISK is not a whole multiple of 1 ISK, the smallest amount Stripe charges in ISK",
        ),
        ("USD", "20", 0, "top-up of 0.00 USD must be positive"),
    ],
)
def test_a_top_up_stripe_would_refuse_is_refused_before_any_request(
    db, clock, make_service, stripe_client, stripe_server, currency, vat, amount, message
):
    settings, service = make_service(currency)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", vat=vat)
    sent = len(stripe_server.requests())
    before = balance(db)
    with pytest.raises(InputError) as refused:
        service.topup("acme", amount, ACTOR)
    assert str(refused.value) == message
    assert len(stripe_server.requests()) == sent  # not one request
    assert recharges(db) == 0
    assert balance(db) == before


# --- what Stripe receives ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "amount", "sent"),
    [
        ("ISK", 500_000_000, 500_000),  # 5,000 ISK: whole krónur, sent as a two-decimal amount
        ("UGX", 500_000_000, 500_000),  # the same rule as ISK
        ("JPY", 500_000_000, 5_000),  # zero-decimal: whole yen
        ("KWD", 512_000, 5_120),  # 5.120 KWD: thousandths ending in 0
        ("HUF", 17_555_000, 17_555),  # two-decimal for charges (the divisible-by-100 rule is for payouts)
        ("USD", 2_500_000, 2_500),
    ],
)
def test_a_top_up_sends_stripe_its_integer_amount(db, clock, make_service, stripe_client, currency, amount, sent):
    settings, service = make_service(currency)
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", vat="0")
    before = balance(db)
    report = service.topup("acme", amount, ACTOR)
    assert (report.phase, report.total) == ("finished", amount)
    [intent] = stripe_client.intents(status="succeeded")
    assert (intent["amount"], intent["currency"]) == (sent, currency.lower())
    assert balance(db) == before + amount
    assert verify(db).ok


# --- an automatic recharge raised to the minimum -----------------------------------------------------------


def test_an_automatic_recharge_below_the_minimum_is_raised_to_it(db, clock, make_service, stripe_client):
    # 6.00 HUF a day: the recharge is 84.00 HUF, 100.80 with 20% VAT, under Stripe's 175.00 HUF.
    settings, service = make_service("HUF")
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", vat="20")
    [plan] = plan_accounts(db, settings, clock.now())
    decision = plan.decision
    assert decision.recharge_amount == 8_400_000
    assert (decision.action, decision.limited_by) == ("charge", "processor_minimum")
    assert decision.charge_amount == 14_583_000  # 145.83 + 29.17 VAT = 175.00; 145.82 + 29.16 = 174.98

    [charged] = service.run_cycle().charged
    assert (charged.phase, charged.amount, charged.total) == ("finished", 14_583_000, 17_500_000)
    [intent] = stripe_client.intents(status="succeeded")
    assert (intent["amount"], intent["currency"]) == (17_500, "huf")

    with db.transaction() as s:
        receipt = s.scalars(select(Receipt)).one()
    assert receipt.content["processor_minimum"] == 17_500_000
    text = " ".join(receipt_text(settings, receipt).split())
    assert (
        "We charged 175.00 HUF, more than your usage called for, because the smallest payment our card processor "
        "accepts in HUF is 175.00 HUF. All of it but the VAT went to your balance."
    ) in text
    assert "bring your balance back above the minimum" not in text
    assert verify(db).ok


def test_a_yen_account_gets_the_yen_floors_and_caps(db, clock, make_service, stripe_client):
    """Issue 13, item 4: the bare [recharge] numbers applied to every currency gave a JPY account a 10 yen
    minimum recharge (raised to Stripe's 50) and a 1,000 yen ceiling. JPY has its own amounts now."""
    settings, service = make_service("JPY")
    busy_account(db, settings, clock, stripe_client, "pm_card_visa", vat="0")  # 6 yen a day, 181 yen held
    [plan] = plan_accounts(db, settings, clock.now())
    assert (plan.policy.min_recharge, plan.policy.max_recharge) == (100_000_000, 10_000_000_000)
    assert (plan.decision.threshold, plan.decision.action) == (50_000_000, "charge")  # the 500 yen floor
    assert (plan.decision.charge_amount, plan.decision.limited_by) == (100_000_000, None)  # 1,000 yen, the floor
    [charged] = service.run_cycle().charged
    assert [i["amount"] for i in stripe_client.intents(status="succeeded")] == [1_000]
    assert charged.phase == "finished"


def test_a_receipt_of_an_ordinary_recharge_says_nothing_of_the_minimum(db, clock, make_service, stripe_client):
    settings, service = make_service("USD")
    busy_account(db, settings, clock, stripe_client, "pm_card_visa")
    service.run_cycle()
    service.topup("acme", 50_000, ACTOR)  # 0.50 + VAT: a top-up is never "raised"
    with db.transaction() as s:
        receipts = list(s.scalars(select(Receipt).order_by(Receipt.seq)))
    assert [r.content["processor_minimum"] for r in receipts] == [None, None]
    assert all("card processor accepts" not in receipt_text(settings, r) for r in receipts)
