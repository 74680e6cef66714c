"""Events out to the CRM: `webhook_events`, the outbox of events written in the transaction of what they report,
and `webhook_deliveries`, one row per event and endpoint with its attempts, lease and outcome.

The statuses in the CHECK clause are spelled out as they were when this revision was written, so the revision
never changes when the vocabulary grows.

Revision ID: 0013_webhooks_out
Revises: 0012_api_idempotency
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_webhooks_out"
down_revision = "0012_api_idempotency"
branch_labels = None
depends_on = None

UNROUTED = "routed_at IS NULL"
STATUSES = "status IN ('pending', 'sending', 'delivered', 'failed')"


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("routed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_webhook_events_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("key", name=op.f("uq_webhook_events_key")),
    )
    op.create_index(op.f("ix_webhook_events_account_id"), "webhook_events", ["account_id"], unique=False)
    op.create_index(
        "ix_webhook_events_unrouted",
        "webhook_events",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text(UNROUTED),
        sqlite_where=sa.text(UNROUTED),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=120), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.CheckConstraint(STATUSES, name=op.f("ck_webhook_deliveries_known_status")),
        sa.ForeignKeyConstraint(
            ["event_id"], ["webhook_events.id"], name=op.f("fk_webhook_deliveries_event_id_webhook_events")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("event_id", "endpoint", name=op.f("uq_webhook_deliveries_event_id_endpoint")),
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["endpoint", "status", "next_attempt_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index(
        "ix_webhook_events_unrouted",
        table_name="webhook_events",
        postgresql_where=sa.text(UNROUTED),
        sqlite_where=sa.text(UNROUTED),
    )
    op.drop_index(op.f("ix_webhook_events_account_id"), table_name="webhook_events")
    op.drop_table("webhook_events")
