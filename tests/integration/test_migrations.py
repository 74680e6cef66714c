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


def test_the_schema_check_reads_what_alembic_reads(db):
    """`require_current` reads the version table and the scripts without Alembic (slow to import): the same
    revisions as Alembic's, before and after a downgrade."""
    from alembic import command

    def alembic_current() -> str | None:
        with db.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    assert db.head_revision() == db.alembic_head_revision() == db.current_revision() == alembic_current()
    with db.engine.begin() as connection:
        config = db._alembic()
        config.attributes["connection"] = connection
        command.downgrade(config, "0005_state_checks")
    assert db.current_revision() == alembic_current() == "0005_state_checks"
    with pytest.raises(DatabaseError, match=f"is at schema 0005_state_checks, not {db.head_revision()}"):
        db.require_current()


def _scripts(folder, *revisions: tuple[str, str]) -> None:
    folder.mkdir(exist_ok=True)
    for n, (revision, down) in enumerate(revisions):
        (folder / f"{n:04d}.py").write_text(f'"""A migration."""\n\nrevision = {revision}\ndown_revision = {down}\n')


def test_the_head_is_read_from_a_plain_chain_and_left_to_alembic_otherwise(tmp_path):
    from recharged.store.engine import _chain_head, migrations_dir

    assert _chain_head(migrations_dir() / "versions") == Database("sqlite://").alembic_head_revision()
    _scripts(tmp_path / "chain", ('"a"', "None"), ("'b'", '"a"'), ('"c"', '"b"'))
    assert _chain_head(tmp_path / "chain") == "c"
    _scripts(tmp_path / "branch", ('"a"', "None"), ('"b"', '"a"'), ('"c"', '"a"'))
    _scripts(tmp_path / "merge", ('"a"', "None"), ('"b"', '"a"'), ('"c"', '("a", "b")'))
    _scripts(tmp_path / "computed", ('"a"', "None"), ('"b"', "PREVIOUS"))
    _scripts(tmp_path / "dangling", ('"a"', "None"), ('"c"', '"b"'))
    for unreadable in ("branch", "merge", "computed", "dangling"):
        assert _chain_head(tmp_path / unreadable) is None, unreadable
    assert _chain_head(tmp_path / "nothing") is None
