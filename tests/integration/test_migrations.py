"""The Alembic chain and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from recharged.errors import DatabaseError
from recharged.store.engine import Database
from recharged.store.models import Base


def test_models_and_migrations_agree(db):
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_idempotent(db):
    before, after = db.upgrade()
    assert before == after == db.head_revision()


def test_commands_refuse_an_unmigrated_database(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseError, match="recharged db upgrade"):
        db.require_current()
    db.upgrade()
    db.require_current()


def test_sqlite_runs_in_wal_mode(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'wal.db'}")
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def _write_elsewhere(path) -> None:
    """Another writer that gives up after half a second if the database is locked."""
    import sqlite3

    other = sqlite3.connect(path, timeout=0.5, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE TABLE IF NOT EXISTS scratch (x INTEGER)")
        other.execute("COMMIT")
    finally:
        other.close()


def test_reading_on_sqlite_never_holds_up_a_writer(tmp_path):
    import sqlite3

    from sqlalchemy import text

    path = tmp_path / "read.db"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    with db.reading() as session:
        assert session.execute(text("SELECT count(*) FROM accounts")).scalar() == 0
        _write_elsewhere(path)  # a deferred read transaction: the writer goes ahead
    with db.transaction() as session:
        session.execute(text("SELECT count(*) FROM accounts"))
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            _write_elsewhere(path)  # a write transaction holds the lock from its start
    db.close()


def test_0006_keeps_the_ledger_and_its_partial_indexes_and_accepts_reversals(db_url):
    """Upgrading a database that already holds entries: every row is kept, the partial indexes keep their WHERE
    (exactly-once and the spend caps depend on them), and the new reversal types are accepted."""
    from alembic import command

    from recharged.store.engine import migrations_dir

    db = Database(db_url)
    with db.engine.begin() as connection:  # back to 0005, then an entry written as 0005 knew it
        config = db._alembic()
        config.attributes["connection"] = connection
        command.downgrade(config, "0005_state_checks")
    with db.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO accounts (id, email, plan, currency, vat_percent, auto_recharge, balance, recharge_state, "
            "failed_cycles, created_at, updated_at) VALUES ('acme', 'a@example.com', 'standard', 'USD', '0', "
            "false, 5000000, 'ok', 0, '2026-11-01 00:00:00', '2026-11-01 00:00:00')"
        )
        connection.exec_driver_sql(
            "INSERT INTO entries (account_id, entry_type, external_id, amount, occurred_at, recorded_at) "
            "VALUES ('acme', 'recharge', 'pi_1', 5000000, '2026-11-02 00:00:00', '2026-11-02 00:00:00')"
        )
    assert migrations_dir().is_dir()
    db.upgrade()
    with db.engine.begin() as connection:
        rows = connection.exec_driver_sql("SELECT external_id, amount FROM entries").all()
        assert [tuple(r) for r in rows] == [("pi_1", 5000000)]
        connection.exec_driver_sql(
            "INSERT INTO entries (account_id, entry_type, external_id, amount, occurred_at, recorded_at) "
            "VALUES ('acme', 'refund', 're_1', -1000000, '2026-11-03 00:00:00', '2026-11-03 00:00:00')"
        )
    with pytest.raises(IntegrityError), db.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO entries (account_id, entry_type, external_id, amount, occurred_at, recorded_at) "
            "VALUES ('acme', 'gift', 'g_1', 1, '2026-11-03 00:00:00', '2026-11-03 00:00:00')"
        )
    indexes = {ix["name"]: ix for ix in inspect(db.engine).get_indexes("entries")}
    assert {"ix_entries_charges", "ix_entries_non_usage"} <= set(indexes)
    if db.dialect == "sqlite":
        with db.engine.connect() as connection:
            charges_sql = connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'ix_entries_charges'"
            ).scalar_one()
        assert "WHERE entry_type IN ('recharge', 'topup')" in charges_sql
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    db.close()
