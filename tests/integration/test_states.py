"""The vocabulary of states (recharged/states.py) is what the database holds and enforces."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import CheckConstraint, inspect, text
from sqlalchemy.exc import IntegrityError, StatementError

from recharged.states import (
    AttemptStatus,
    AuthorizationStatus,
    EventStatus,
    JobStatus,
    Phase,
    RechargeKind,
    RechargeState,
    WebhookEventType,
    WebhookStatus,
)
from recharged.store.charging import insert_recharge
from recharged.store.models import Account, Base, JobRun, StateText
from recharged.store.runs import start_job_run
from tests.helpers import NOW, add_account


def _applies(constraint: CheckConstraint, dialect: str) -> bool:
    ddl_if = constraint._ddl_if
    return ddl_if is None or ddl_if.dialect is None or ddl_if.dialect == dialect


def test_every_check_constraint_of_the_models_is_in_the_migrated_database(db):
    inspector = inspect(db.engine)
    missing = []
    for table in Base.metadata.sorted_tables:
        expected = {c.name for c in table.constraints if isinstance(c, CheckConstraint) and _applies(c, db.dialect)}
        present = {c["name"] for c in inspector.get_check_constraints(table.name)}
        missing += [f"{table.name}.{name}" for name in sorted(expected - present)]
    assert missing == []


def test_states_read_back_as_members_of_their_vocabulary(db, settings, clock):
    add_account(db, settings, clock)
    with db.transaction() as session:
        start_job_run(session, "cycle", "host:1", NOW)
    with db.reading() as session:
        account = session.get(Account, "acme")
        run = session.query(JobRun).one()
        assert account.recharge_state is RechargeState.OK
        assert run.status is JobStatus.RUNNING


def test_a_value_outside_the_vocabulary_is_refused_before_it_is_written(db, settings, clock):
    add_account(db, settings, clock)
    with pytest.raises(StatementError, match="'resting' is not a valid RechargeState"), db.transaction() as session:
        session.get(Account, "acme").recharge_state = "resting"
    with db.reading() as session:
        assert session.get(Account, "acme").recharge_state is RechargeState.OK


@pytest.mark.parametrize(
    ("table", "column", "value", "constraint", "everywhere"),
    [
        ("recharges", "phase", "refunded", "known_phase", True),
        ("recharges", "kind", "gift", "known_kind", False),
        ("job_runs", "status", "paused", "known_status", False),
    ],
)
def test_the_database_itself_refuses_an_unknown_state(
    db, settings, clock, table, column, value, constraint, everywhere
):
    """A writer that goes around recharged (a hand-written UPDATE) meets the CHECK constraint."""
    if db.dialect == "sqlite" and not everywhere:
        pytest.skip("on SQLite only the constraints of migrations 0001-0004 are in the database (see 0005)")
    add_account(db, settings, clock)
    with db.transaction() as session:
        start_job_run(session, "cycle", "host:1", NOW)
        figures = {"currency": "USD", "amount": 1000000, "vat": 0, "total": 1000000, "vat_percent": Decimal(0)}
        insert_recharge(
            session,
            {"account_id": "acme", "kind": RechargeKind.TOPUP, "phase": Phase.CLAIMED, "balance_before": 0}
            | figures
            | {"created_at": NOW, "updated_at": NOW},
        )
    refused = pytest.raises(IntegrityError, match=f"ck_{table}_{constraint}|CHECK constraint failed")
    with refused, db.engine.begin() as connection:
        connection.execute(text(f"UPDATE {table} SET {column} = :value"), {"value": value})


def test_the_models_state_columns_use_the_vocabulary():
    typed = {
        f"{table.name}.{column.name}": column.type.enum
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, StateText)
    }
    assert typed["recharges.phase"] is Phase
    assert typed["charge_attempts.status"] is AttemptStatus
    assert typed["accounts.recharge_state"] is RechargeState
    assert typed["processor_events.status"] is EventStatus
    assert typed["webhook_events.type"] is WebhookEventType
    assert typed["webhook_deliveries.status"] is WebhookStatus
    assert typed["authorizations.status"] is AuthorizationStatus
    assert len(typed) == 14
