"""Receipts (numbered per issuer by a counter row), the email outbox, notice episodes, monthly statements, and an
index for reading an account's credits and adjustments by time.

Revision ID: 0004_receipts
Revises: 0003_daemon
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_receipts"
down_revision = "0003_daemon"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NON_USAGE = sa.text("entry_type <> 'usage'")


def _account_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f(f"fk_{table}_account_id_accounts"))


def upgrade() -> None:
    op.create_table(
        "receipt_counters",
        sa.Column("issuer", sa.String(length=20), nullable=False),
        sa.Column("last_number", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("issuer", name=op.f("pk_receipt_counters")),
    )
    op.create_table(
        "receipts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("number", sa.String(length=32), nullable=False),
        sa.Column("issuer", sa.String(length=20), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("recharge_id", BIG_ID, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("vat", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("payment_reference", sa.String(length=64), nullable=False),
        sa.Column("content", sa.JSON(), nullable=False),
        sa.CheckConstraint("seq > 0", name=op.f("ck_receipts_positive_seq")),
        _account_fk("receipts"),
        sa.ForeignKeyConstraint(["recharge_id"], ["recharges.id"], name=op.f("fk_receipts_recharge_id_recharges")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_receipts")),
        sa.UniqueConstraint("issuer", "seq", name=op.f("uq_receipts_issuer_seq")),
        sa.UniqueConstraint("number", name=op.f("uq_receipts_number")),
        sa.UniqueConstraint("recharge_id", name=op.f("uq_receipts_recharge_id")),
    )
    op.create_index("ix_receipts_account_id", "receipts", ["account_id"], unique=False)
    op.create_table(
        "outbox",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=True),
        sa.Column("to_address", sa.String(length=254), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=10), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=120), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("subject", sa.String(length=255), nullable=True),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'sending', 'sent', 'failed')", name=op.f("ck_outbox_known_status")),
        _account_fk("outbox"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("key", name=op.f("uq_outbox_key")),
        sa.UniqueConstraint("message_id", name=op.f("uq_outbox_message_id")),
    )
    op.create_index("ix_outbox_account_id", "outbox", ["account_id"], unique=False)
    op.create_index("ix_outbox_last_attempt", "outbox", ["last_attempt_at"], unique=False)
    op.create_index("ix_outbox_status_due", "outbox", ["status", "next_attempt_at"], unique=False)
    op.create_table(
        "notice_episodes",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        _account_fk("notice_episodes"),
        sa.PrimaryKeyConstraint("account_id", "kind", name=op.f("pk_notice_episodes")),
    )
    op.create_table(
        "statements",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("opening_balance", sa.BigInteger(), nullable=False),
        sa.Column("closing_balance", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.JSON(), nullable=False),
        _account_fk("statements"),
        sa.PrimaryKeyConstraint("account_id", "month", name=op.f("pk_statements")),
    )
    op.create_index(
        "ix_entries_non_usage",
        "entries",
        ["account_id", "occurred_at"],
        unique=False,
        postgresql_where=NON_USAGE,
        sqlite_where=NON_USAGE,
    )


def downgrade() -> None:
    op.drop_index("ix_entries_non_usage", table_name="entries")
    op.drop_table("statements")
    op.drop_table("notice_episodes")
    op.drop_index("ix_outbox_status_due", table_name="outbox")
    op.drop_index("ix_outbox_last_attempt", table_name="outbox")
    op.drop_index("ix_outbox_account_id", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_receipts_account_id", table_name="receipts")
    op.drop_table("receipts")
    op.drop_table("receipt_counters")
