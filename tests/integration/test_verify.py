"""`verify` finds what breaks the charging invariants: phases that disagree with their attempts, and
duplicates that only the database's unique indexes keep out (an index dropped by hand, a restore without it)."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text, update

from recharged.recharge import RechargeService
from recharged.store.models import Account, ChargeAttempt, Recharge
from recharged.verify import verify
from tests.helpers import busy_account


@pytest.fixture
def charged(db, settings, gateway_factory, clock, stripe_backend):
    """One account recharged once, through the local Stripe-compatible server."""
    busy_account(db, settings, clock, stripe_backend, "pm_card_visa")
    report = RechargeService(db, settings, gateway_factory, clock).run_cycle()
    assert [r.phase for r in report.charged] == ["finished"]
    assert verify(db).ok
    return report.charged[0].recharge_id


def test_a_finished_recharge_without_its_succeeded_attempt_is_reported(db, charged):
    with db.transaction() as session:
        session.execute(update(ChargeAttempt).where(ChargeAttempt.recharge_id == charged).values(status="declined"))
    assert any(f"recharge {charged} (finished): expected one succeeded attempt" in v for v in verify(db).violations)


def test_a_pending_attempt_outside_the_charging_phase_is_reported(db, charged):
    with db.transaction() as session:
        session.execute(update(ChargeAttempt).where(ChargeAttempt.recharge_id == charged).values(status="pending"))
    violations = verify(db).violations
    assert any("has a pending attempt outside the charging phase" in v for v in violations)


def test_an_account_backing_off_without_a_retry_time_is_reported(db, charged):
    with db.transaction() as session:
        session.execute(update(Account).where(Account.id == "acme").values(recharge_state="backing_off"))
    assert "account acme: backing off without a retry time" in verify(db).violations


def test_a_second_open_recharge_that_slipped_past_a_dropped_index_is_reported(db, charged):
    with db.transaction() as session:
        recharge = session.scalars(select(Recharge).where(Recharge.id == charged)).one()
        values = {c.name: getattr(recharge, c.key) for c in Recharge.__table__.columns if c.name != "id"}
        session.execute(text("DROP INDEX uq_recharges_one_open_per_account"))
        for _ in range(2):
            session.execute(Recharge.__table__.insert().values({**values, "phase": "claimed", "payment_intent": None}))
    assert "account acme: 2 open recharges" in verify(db).violations
