"""Accounts and their audited billing settings."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from recharged.accounts import audit_trail, change_account, create_accounts, new_account, parse_actor
from recharged.errors import ActorError, ConflictError, InputError, NotFoundError
from recharged.store.models import Account, AuditRecord
from tests.helpers import NOW


def fields(account_id="acme", **extra):
    return {"id": account_id, "email": f"b@{account_id}.example", "plan": "standard", "vat_percent": "20", **extra}


@pytest.mark.parametrize("actor", ["", "Jane", "jane@example.com", "J4ne Doe", "  Doe  "])
def test_billing_changes_need_a_first_and_last_name(actor):
    with pytest.raises(ActorError):
        parse_actor(actor)


@pytest.mark.parametrize("actor", ["Jane Doe", "Zoë O'Brien-Müller", "José  María  García"])
def test_real_names_sign(actor):
    assert parse_actor(actor) == " ".join(actor.split())


def test_creation_is_audited_with_the_actor_and_settings(db, settings, clock):
    create_accounts(db, [new_account(fields(opening_balance="25"), settings, NOW)], "Jane Doe", clock)
    [record] = audit_trail(db, "acme")
    assert (record.actor, record.action, record.before) == ("Jane Doe", "account.created", None)
    assert record.after["vat_percent"] == "20"
    assert record.after["opening_balance"] == "25.00000"


def test_import_is_all_or_nothing_and_rerunnable(db, settings, clock):
    first = [new_account(fields("a"), settings, NOW), new_account(fields("b"), settings, NOW)]
    assert create_accounts(db, first, "Jane Doe", clock).created == ["a", "b"]
    again = create_accounts(db, [*first, new_account(fields("c"), settings, NOW)], "Jane Doe", clock)
    assert (again.created, again.unchanged) == (["c"], ["a", "b"])
    changed = [
        new_account(fields("d"), settings, NOW),
        new_account({**fields("a"), "email": "x@y.example"}, settings, NOW),
    ]
    with pytest.raises(ConflictError, match=r"account a: email: recorded b@a\.example, given x@y\.example"):
        create_accounts(db, changed, "Jane Doe", clock)
    with db.transaction() as s:
        assert s.get(Account, "d") is None  # nothing of the failed import was written
        assert s.scalar(select(func.count()).select_from(AuditRecord)) == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"plan": "gold"}, "plan 'gold' is not defined"),
        ({"currency": "EUR"}, "does not match plan 'standard'"),
        ({"vat_percent": "120"}, "between 0 and 100"),
        ({"vat_percent": ""}, "vat_percent is missing"),
        ({"email": "nope"}, "not an email"),
        ({"created_at": "2027-01-01T00:00:00Z"}, "in the future"),
        ({"opening_balance": "1.234567"}, "more than 5 decimal places"),
        ({"id": "has space"}, "not a valid account id"),
    ],
)
def test_bad_account_fields_name_the_problem(settings, changes, message):
    with pytest.raises(ValueError, match=message):
        new_account(fields(**changes), settings, NOW)


def test_auto_recharge_change_records_before_and_after(db, settings, clock):
    create_accounts(db, [new_account(fields(), settings, NOW)], "Jane Doe", clock)
    change_account(
        db,
        "acme",
        actor="John Smith",
        clock=clock,
        settings=settings,
        auto_recharge=True,
        overrides={"threshold_days": "5", "max_recharge": "250"},
    )
    record = audit_trail(db, "acme")[0]
    assert record.actor == "John Smith"
    assert record.action == "auto_recharge.changed"
    assert record.before == {"auto_recharge": False, "threshold_days": None, "max_recharge": None}
    assert record.after == {"auto_recharge": True, "threshold_days": 5, "max_recharge": "250.00000"}
    change_account(
        db, "acme", actor="John Smith", clock=clock, settings=settings, overrides={"threshold_days": "default"}
    )
    assert audit_trail(db, "acme")[0].after == {"threshold_days": None}


def test_overrides_that_contradict_the_policy_are_refused_naming_both_settings(db, settings, clock):
    create_accounts(db, [new_account(fields(), settings, NOW)], "Jane Doe", clock)
    with pytest.raises(InputError, match=r"account acme: max_recharge 2500.00 USD is above max_charged_per_day 2000"):
        change_account(db, "acme", actor="Jane Doe", clock=clock, settings=settings, overrides={"max_recharge": "2500"})
    overrides = {"min_recharge": "50", "max_recharge": "40"}
    with pytest.raises(InputError, match=r"min_recharge 50.00 USD is above max_recharge 40.00 USD"):
        change_account(db, "acme", actor="Jane Doe", clock=clock, settings=settings, overrides=overrides)
    assert len(audit_trail(db, "acme")) == 1  # nothing changed
    with db.transaction() as s:
        account = s.get(Account, "acme")
        assert account is not None
        assert (account.max_recharge, account.min_recharge) == (None, None)


def test_a_change_that_changes_nothing_is_not_audited(db, settings, clock):
    create_accounts(db, [new_account(fields(), settings, NOW)], "Jane Doe", clock)
    change_account(db, "acme", actor="Jane Doe", clock=clock, settings=settings, auto_recharge=False)
    assert len(audit_trail(db, "acme")) == 1


def test_invalid_override_is_refused_and_nothing_changes(db, settings, clock):
    create_accounts(db, [new_account(fields(), settings, NOW)], "Jane Doe", clock)
    with pytest.raises(InputError, match="threshold_days"):
        change_account(
            db,
            "acme",
            actor="Jane Doe",
            clock=clock,
            settings=settings,
            auto_recharge=True,
            overrides={"threshold_days": "-1"},
        )
    with db.transaction() as s:
        assert s.get(Account, "acme").auto_recharge is False


def test_changing_an_unknown_account_is_not_found(db, settings, clock):
    with pytest.raises(NotFoundError):
        change_account(db, "ghost", actor="Jane Doe", clock=clock, settings=settings, auto_recharge=True)
