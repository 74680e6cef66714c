"""An outbox message not sent yet can be cancelled by an admin (`recharged outbox cancel`): the outbox's status
CHECK takes `cancelled`.

SQLite cannot alter a CHECK: the outbox table is rebuilt from its own stored definition with the one clause
changed, and its indexes recreated as they were (as 0006 does for `entries`; nothing references `outbox`, so
dropping the old table breaks no foreign key). PostgreSQL drops and recreates the constraint. Downgrading turns
cancelled messages into failed ones, with their reason kept in last_error (`outbox send --retry-failed` would then
send them: review them first).

Revision ID: 0011_outbox_cancelled
Revises: 0010_account_lifecycle
Create Date: 2026-12-01
"""

from __future__ import annotations

import re

from alembic import op

revision = "0011_outbox_cancelled"
down_revision = "0010_account_lifecycle"
branch_labels = None
depends_on = None

CHECK = "ck_outbox_known_status"
OLD_STATUSES = "status IN ('pending', 'sending', 'sent', 'failed')"
NEW_STATUSES = "status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')"


def _sqlite_replace_check(table: str, old: str, new: str) -> None:
    bind = op.get_bind()
    (create,) = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).one()
    if old not in create:
        raise RuntimeError(f"{table}: the CHECK to replace is not where 0004 left it; refusing to rebuild")
    indexes = [
        sql
        for (sql,) in bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,)
        )
    ]
    rebuilt = f"{table}__0011"
    renamed, found = re.subn(
        rf'^CREATE TABLE\s+"?{table}"?\s*\(', f"CREATE TABLE {rebuilt} (", create.replace(old, new)
    )
    if found != 1:
        raise RuntimeError(f"{table}: unexpected stored definition; refusing to rebuild")
    bind.exec_driver_sql(renamed)
    bind.exec_driver_sql(f"INSERT INTO {rebuilt} SELECT * FROM {table}")  # noqa: S608 - fixed table names
    bind.exec_driver_sql(f"DROP TABLE {table}")
    bind.exec_driver_sql(f"ALTER TABLE {rebuilt} RENAME TO {table}")
    for sql in indexes:
        bind.exec_driver_sql(sql)


def _replace_check(old: str, new: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_replace_check("outbox", old, new)
    else:
        op.drop_constraint(op.f(CHECK), "outbox", type_="check")
        op.create_check_constraint(op.f(CHECK), "outbox", new)


def upgrade() -> None:
    _replace_check(OLD_STATUSES, NEW_STATUSES)


def downgrade() -> None:
    op.execute("UPDATE outbox SET status = 'failed' WHERE status = 'cancelled'")
    _replace_check(NEW_STATUSES, OLD_STATUSES)
