"""Adjustment references are per account: `entries.reference` holds an adjustment's reference, unique per account
through a partial index that usage entries never touch; `external_id` stays the ledger's own id, unique over all
accounts.

Existing adjustments keep their external_id (the reference given, or the one made up) and get it as their
reference: that is what their audit records show. Adding a nullable column is a change of the catalogue only, on
SQLite and PostgreSQL alike: the ledger is not rewritten.

Revision ID: 0008_adjustment_references
Revises: 0007_processor_events
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_adjustment_references"
down_revision = "0007_processor_events"
branch_labels = None
depends_on = None

HAS_REFERENCE = "reference IS NOT NULL"


def upgrade() -> None:
    op.add_column("entries", sa.Column("reference", sa.String(length=128), nullable=True))
    op.execute("UPDATE entries SET reference = external_id WHERE entry_type = 'adjustment'")
    op.create_index(
        "uq_entries_adjustment_reference",
        "entries",
        ["account_id", "reference"],
        unique=True,
        postgresql_where=sa.text(HAS_REFERENCE),
        sqlite_where=sa.text(HAS_REFERENCE),
    )


def downgrade() -> None:
    # Adjustments made since keep their made-up external_id; their references stay in the audit log.
    op.drop_index(
        "uq_entries_adjustment_reference",
        table_name="entries",
        postgresql_where=sa.text(HAS_REFERENCE),
        sqlite_where=sa.text(HAS_REFERENCE),
    )
    # Not batch mode: rebuilding `entries` could lose the WHERE of its partial indexes (see 0006). SQLite 3.35+ and
    # PostgreSQL drop an unindexed column in place.
    op.execute("ALTER TABLE entries DROP COLUMN reference")
