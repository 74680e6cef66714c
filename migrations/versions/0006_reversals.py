"""Money after the charge: ledger entries for refunds, disputes and reinstated dispute funds; attempts that ended
in an integration error (our request refused, never the card's fault); recovery that records its failures per
recharge and backs off.

Revision ID: 0006_reversals
Revises: 0005_state_checks
Create Date: 2026-11-30
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0006_reversals"
down_revision = "0005_state_checks"
branch_labels = None
depends_on = None

OLD_TYPES = "entry_type IN ('usage', 'opening', 'adjustment', 'recharge', 'topup')"
NEW_TYPES = "entry_type IN ('usage', 'opening', 'adjustment', 'recharge', 'topup', 'refund', 'dispute', 'reinstated')"
OLD_STATUSES = "status IN ('pending', 'succeeded', 'declined', 'action_required', 'abandoned')"
NEW_STATUSES = "status IN ('pending', 'succeeded', 'declined', 'action_required', 'abandoned', 'error')"


def _sqlite_replace_check(table: str, old: str, new: str) -> None:
    """SQLite cannot alter a CHECK: rebuild the table from its own stored definition with the one clause changed,
    then recreate its indexes as they were (Alembic's batch mode would re-derive them and could drop the WHERE of
    a partial index). Nothing references `entries`, so dropping the old table breaks no foreign key."""
    bind = op.get_bind()
    (create,) = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).one()
    if old not in create:
        raise RuntimeError(f"{table}: the CHECK to replace is not where 0001 left it; refusing to rebuild")
    indexes = [
        sql
        for (sql,) in bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,)
        )
    ]
    rebuilt = f"{table}__0006"
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


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_replace_check("entries", OLD_TYPES, NEW_TYPES)
    else:
        op.drop_constraint(op.f("ck_entries_known_type"), "entries", type_="check")
        op.create_check_constraint(op.f("ck_entries_known_type"), "entries", NEW_TYPES)
        op.drop_constraint(op.f("ck_charge_attempts_known_status"), "charge_attempts", type_="check")
        op.create_check_constraint(op.f("ck_charge_attempts_known_status"), "charge_attempts", NEW_STATUSES)
    with op.batch_alter_table("recharges") as batch:
        batch.add_column(sa.Column("recovery_failures", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.add_column(sa.Column("recover_after", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recharges") as batch:
        batch.drop_column("recover_after")
        batch.drop_column("recovery_failures")
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_replace_check("entries", NEW_TYPES, OLD_TYPES)
    else:
        op.drop_constraint(op.f("ck_charge_attempts_known_status"), "charge_attempts", type_="check")
        op.create_check_constraint(op.f("ck_charge_attempts_known_status"), "charge_attempts", OLD_STATUSES)
        op.drop_constraint(op.f("ck_entries_known_type"), "entries", type_="check")
        op.create_check_constraint(op.f("ck_entries_known_type"), "entries", OLD_TYPES)
