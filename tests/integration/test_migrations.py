"""The Alembic chain and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

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
