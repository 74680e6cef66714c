"""The ledger's bounds (money.MAX_AMOUNT for one amount, MAX_BALANCE for a balance): every way money enters the
ledger refuses what would pass them, naming the amount and the limit, with nothing written. SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from recharged.accounts import adjust_balance, new_account, read_csv
from recharged.config import load_settings
from recharged.errors import InputError
from recharged.funding import add_source
from recharged.money import MAX_AMOUNT, MAX_BALANCE, SCALE
from recharged.recharge import RechargeService
from recharged.states import EntryType
from recharged.store.ledger import post_entry
from recharged.store.models import Account, AuditRecord, Entry, Recharge
from recharged.usage import UsageRecorder
from tests.e2e.commands import REPO
from tests.helpers import add_account, call, card_on_file

ACTOR = "Jane Doe"
LIMIT = "10000000000.00 USD"  # MAX_AMOUNT as the messages show it
BALANCE_LIMIT = "100000000000.00 USD"  # MAX_BALANCE


def state(db) -> tuple[int, int, int, int]:
    """The balance of acme, and how many entries, audit records and recharges there are."""
    with db.reading() as s:
        return (
            s.scalar(select(Account.balance).where(Account.id == "acme")),
            s.scalar(select(func.count()).select_from(Entry)),
            s.scalar(select(func.count()).select_from(AuditRecord)),
            s.scalar(select(func.count()).select_from(Recharge)),
        )


def adjust(db, clock, amount: int, reference: str | None = None) -> bool:
    return adjust_balance(db, "acme", amount, reason="bounds test", actor=ACTOR, clock=clock, reference=reference)


def fill_to_the_limit(db, clock) -> None:
    """acme holds MAX_BALANCE exactly: its opening balance and credits of MAX_AMOUNT, each allowed."""
    for step in range(MAX_BALANCE // MAX_AMOUNT - 1):
        assert adjust(db, clock, MAX_AMOUNT, reference=f"fill-{step}")


@pytest.fixture
def acme(db, settings, clock):
    add_account(db, settings, clock, opening_balance=str(MAX_AMOUNT // SCALE))  # the largest opening balance
    return db


def test_the_bounds_fit_64_bits_with_room_for_sums():
    assert 0 < MAX_AMOUNT < MAX_BALANCE
    assert 900 * MAX_BALANCE < 2**63 - 1  # sums over many balances (and many entries) stay exact
    assert MAX_BALANCE + MAX_AMOUNT < 2**63 - 1  # one amount past the limit is refused, never overflows


def test_an_adjustment_over_the_limit_is_refused_naming_it_and_writes_nothing(acme, clock):
    """Issue 13 item 9: two credits of 92233720368547 turned the SQLite balance into a REAL."""
    before = state(acme)
    for amount in (9_223_372_036_854_700_000, -9_223_372_036_854_700_000, MAX_AMOUNT + 1):
        with pytest.raises(InputError) as refused:
            adjust(acme, clock, amount)
        message = str(refused.value)
        assert "account acme" in message
        assert f"over the limit of {LIMIT} for one amount in the ledger" in message
        assert "nothing was written" in message
        assert state(acme) == before
    with pytest.raises(InputError) as refused:
        adjust(acme, clock, 9_223_372_036_854_700_000)
    assert "adjustment of 92233720368547.00 USD" in str(refused.value)


def test_a_balance_is_kept_within_the_limit_both_ways(acme, clock):
    fill_to_the_limit(acme, clock)
    at_the_limit = state(acme)
    assert at_the_limit[0] == MAX_BALANCE
    with pytest.raises(InputError) as refused:
        adjust(acme, clock, 1)  # 0.00001 more
    assert (
        f"adjustment of 0.00001 USD would take the balance from {BALANCE_LIMIT} to 100000000000.00001 USD, past "
        f"the limit of {BALANCE_LIMIT} for a balance" in str(refused.value)
    )
    assert state(acme) == at_the_limit

    for step in range(2 * MAX_BALANCE // MAX_AMOUNT):  # all the way down to -MAX_BALANCE, each step allowed
        assert adjust(acme, clock, -MAX_AMOUNT, reference=f"down-{step}")
    at_the_bottom = state(acme)
    assert at_the_bottom[0] == -MAX_BALANCE
    with pytest.raises(InputError) as refused:
        adjust(acme, clock, -1)
    assert f"past the limit of -{BALANCE_LIMIT} for a balance" in str(refused.value)
    assert state(acme) == at_the_bottom


def test_an_entry_already_posted_is_still_the_same_entry_at_the_limit(acme, clock):
    """The backstop in post_entry refuses before writing, but a credit posted before (a recovery posting it
    again) is no new money: it changes nothing, as always, rather than failing."""
    with acme.transaction() as s:
        assert post_entry(s, "acme", EntryType.TOPUP, "pi_bounds_1", 100 * SCALE, clock.now())
    adjust(acme, clock, -100 * SCALE, reference="back")
    fill_to_the_limit(acme, clock)
    adjust(acme, clock, -100 * SCALE, reference="room")
    with acme.transaction() as s:  # exactly at the limit: allowed
        assert post_entry(s, "acme", EntryType.TOPUP, "pi_bounds_2", 100 * SCALE, clock.now())
    before = state(acme)
    with acme.transaction() as s:
        assert post_entry(s, "acme", EntryType.TOPUP, "pi_bounds_1", 100 * SCALE, clock.now()) is False
    with pytest.raises(InputError, match=r"top-up of 100\.00 USD would take the balance"), acme.transaction() as s:
        post_entry(s, "acme", EntryType.TOPUP, "pi_bounds_3", 100 * SCALE, clock.now())
    assert state(acme) == before


def test_an_opening_balance_over_the_limit_is_refused_at_creation_and_import(db, settings, clock, tmp_path: Path):
    fields = {"id": "big", "email": "a@big.example", "plan": "standard", "vat_percent": "0"}
    with pytest.raises(ValueError, match=f"opening_balance of 92233720368547.00 USD is over the limit of {LIMIT}"):
        new_account({**fields, "opening_balance": "92233720368547"}, settings, clock.now())
    with pytest.raises(ValueError, match=f"opening_balance of -10000000000.00001 USD is over the limit of {LIMIT}"):
        new_account({**fields, "opening_balance": "-10000000000.00001"}, settings, clock.now())
    assert (
        new_account({**fields, "opening_balance": "10000000000"}, settings, clock.now()).opening_balance == MAX_AMOUNT
    )

    listing = tmp_path / "accounts.csv"
    listing.write_text(
        "id,email,plan,vat_percent,opening_balance\n"
        "fine,a@fine.example,standard,20,10.00\n"
        "huge,a@huge.example,standard,20,92233720368547\n"
    )
    with pytest.raises(InputError) as refused:
        read_csv(listing, settings, clock.now())
    assert f"{listing}:3: opening_balance of 92233720368547.00 USD is over the limit of {LIMIT}" in str(refused.value)


def test_a_topup_that_would_pass_the_limit_is_refused_before_the_card_is_charged(
    acme, settings, gateway_factory, clock, stripe_client
):
    """Issue 13 item 9: a large top-up died with an OverflowError traceback."""
    add_source(acme, "acme", card_on_file(stripe_client, "pm_card_visa"), actor=ACTOR, clock=clock)
    fill_to_the_limit(acme, clock)
    adjust(acme, clock, -10 * SCALE, reference="room")  # $10.00 below the limit
    before = state(acme)
    service = RechargeService(acme, settings, gateway_factory, clock)
    with pytest.raises(InputError) as refused:
        service.topup("acme", 20 * SCALE, ACTOR)
    assert (
        "account acme: top-up of 20.00 USD would take the balance from 99999999990.00 USD to 100000000010.00 USD, "
        f"past the limit of {BALANCE_LIMIT} for a balance; nothing was charged" in str(refused.value)
    )
    assert state(acme) == before
    assert stripe_client.intents() == []
    assert service.topup("acme", 10 * SCALE, ACTOR).phase == "finished"  # up to the limit is fine
    assert state(acme)[0] == MAX_BALANCE


def test_a_usage_cost_over_the_limit_is_rejected_and_the_rest_of_the_batch_recorded(db, clock, tmp_path: Path):
    """A price in config.toml can rate one event past what the ledger takes (past 64 bits, even): that event is
    rejected with its reason, the others are recorded."""
    config = tmp_path / "config.toml"
    config.write_text(
        (REPO / "config.toml").read_text().replace("price_per_minute = 0.0200", "price_per_minute = 1000000000000", 1)
    )
    settings = load_settings(config, environ={})
    assert settings.plans["standard"].rates["dialer"].price_per_minute == 1_000_000_000_000
    add_account(db, settings, clock)
    week = int(timedelta(days=7).total_seconds())
    outcomes = UsageRecorder(db, settings, clock).record(
        [
            call("long", seconds=week),  # 10,080 minutes at 1,000,000,000,000 a minute: past 64 bits
            call("short", seconds=60),  # one minute: past MAX_AMOUNT
            call("recording", seconds=60, kind="recording"),  # priced as usual
        ]
    )
    assert [(o.event_id, o.status) for o in outcomes] == [
        ("long", "rejected"),
        ("short", "rejected"),
        ("recording", "accepted"),
    ]
    assert (
        outcomes[0].reason
        == f"cost of 10080000000000000.00 USD is over the limit of {LIMIT} for one amount in the ledger"
    )
    with db.reading() as s:
        assert s.scalar(select(func.count()).select_from(Entry).where(Entry.entry_type == "usage")) == 1
