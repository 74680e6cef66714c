"""Call authorizations (`POST /v1/authorizations`): a reservation of the money a call may cost, held until the
call's usage settles it, the dialer releases it or it expires.

`accounts.reserved` is the sum of the account's open reservations, kept current in the same transaction as each
change to them, so that authorizing a call reads one row; `accounts.overdraft` is how far below zero the account
may authorize calls (0 unless an admin sets it). Both start at 0: nothing is reserved before this revision.

Revision ID: 0014_authorizations
Revises: 0013_webhooks_out
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_authorizations"
down_revision = "0013_webhooks_out"
branch_labels = None
depends_on = None

STATUSES = "status IN ('open', 'settled', 'released', 'expired')"


def upgrade() -> None:
    op.create_table(
        "authorizations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("call_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("requested_seconds", sa.Integer(), nullable=True),
        sa.Column("authorized_seconds", sa.Integer(), nullable=False),
        sa.Column("reserved_amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("usage_event_id", sa.String(length=128), nullable=True),
        sa.CheckConstraint(STATUSES, name=op.f("ck_authorizations_known_status")),
        sa.CheckConstraint("reserved_amount >= 0", name=op.f("ck_authorizations_reserved_not_negative")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_authorizations_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_authorizations")),
        sa.UniqueConstraint("account_id", "call_id", name=op.f("uq_authorizations_account_id_call_id")),
        sa.UniqueConstraint("usage_event_id", name=op.f("uq_authorizations_usage_event_id")),
    )
    op.create_index(
        "ix_authorizations_open_expiry",
        "authorizations",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )
    op.add_column("accounts", sa.Column("reserved", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
    op.add_column("accounts", sa.Column("overdraft", sa.BigInteger(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    # Not batch mode: rebuilding `accounts` would trip the foreign keys that point at it. SQLite 3.35+ and
    # PostgreSQL drop an unindexed column in place. Open reservations are forgotten: the calls are billed in full.
    op.execute("ALTER TABLE accounts DROP COLUMN overdraft")
    op.execute("ALTER TABLE accounts DROP COLUMN reserved")
    op.drop_index(
        "ix_authorizations_open_expiry",
        table_name="authorizations",
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )
    op.drop_table("authorizations")
