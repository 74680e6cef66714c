"""Processor events handled durably: the inbox `processor_events` replaces `webhook_events` (whose rows are kept,
as events already handled); ledger reversals name the PaymentIntent they reverse (`entries.payment_intent`) and
are found by time through a partial index that usage entries never touch.

Adding a nullable column is a change of the catalogue only, on SQLite and PostgreSQL alike: the ledger is not
rewritten. The values in the WHERE and CHECK clauses are spelled out as they were when this revision was
written, so the revision never changes when the vocabulary grows.

Revision ID: 0007_processor_events
Revises: 0006_reversals
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_processor_events"
down_revision = "0006_reversals"
branch_labels = None
depends_on = None

REVERSALS = "entry_type IN ('refund', 'dispute', 'reinstated')"
STATUSES = "status IN ('pending', 'handled', 'ignored')"


def upgrade() -> None:
    op.create_table(
        "processor_events",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=80), nullable=False),
        sa.Column("object_id", sa.String(length=255), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("account_id", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.CheckConstraint(STATUSES, name=op.f("ck_processor_events_known_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_processor_events")),
    )
    op.create_index("ix_processor_events_status_due", "processor_events", ["status", "next_attempt_at"], unique=False)
    # Events handled before the inbox existed: their ids keep being recognised as duplicates.
    op.execute(
        "INSERT INTO processor_events (id, type, object_id, payload, received_at, status, attempts, next_attempt_at, "
        "lease_until, handled_at, account_id, outcome, last_error) "
        "SELECT id, type, payment_intent, NULL, received_at, 'handled', 1, received_at, NULL, received_at, NULL, "
        "outcome, NULL FROM webhook_events"
    )
    op.drop_table("webhook_events")

    op.add_column("entries", sa.Column("payment_intent", sa.String(length=64), nullable=True))
    op.create_index(
        "ix_entries_reversals",
        "entries",
        ["occurred_at"],
        unique=False,
        postgresql_where=sa.text(REVERSALS),
        sqlite_where=sa.text(REVERSALS),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_entries_reversals",
        table_name="entries",
        postgresql_where=sa.text(REVERSALS),
        sqlite_where=sa.text(REVERSALS),
    )
    # Not batch mode: rebuilding `entries` could lose the WHERE of its partial indexes (see 0006). SQLite 3.35+ and
    # PostgreSQL drop an unindexed column in place.
    op.execute("ALTER TABLE entries DROP COLUMN payment_intent")
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=80), nullable=False),
        sa.Column("payment_intent", sa.String(length=64), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )
    op.execute(
        "INSERT INTO webhook_events (id, type, payment_intent, received_at, outcome) "
        "SELECT id, type, CASE WHEN object_id LIKE 'pi\\_%' ESCAPE '\\' AND length(object_id) <= 64 THEN object_id "
        "END, received_at, outcome FROM processor_events WHERE status <> 'pending'"
    )
    op.drop_index("ix_processor_events_status_due", table_name="processor_events")
    op.drop_table("processor_events")
