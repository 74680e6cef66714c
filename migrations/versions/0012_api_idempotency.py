"""The HTTP API's idempotency keys (`POST /v1/accounts/{id}/topups` with `Idempotency-Key`) and the API token
that made each audited change (`audit_log.via`).

`api_idempotency` keeps one row per (token, key): the fingerprint of the request it first came with, the recharge
it claimed (written in the claim's own transaction, so a key never exists without its recharge or the other way
round) and, once the recharge has finished, the answer given, which a retry with the same key gets again.

Revision ID: 0012_api_idempotency
Revises: 0011_outbox_cancelled
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_api_idempotency"
down_revision = "0011_outbox_cancelled"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_idempotency",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("recharge_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_api_idempotency_account_id_accounts")),
        sa.ForeignKeyConstraint(
            ["recharge_id"], ["recharges.id"], name=op.f("fk_api_idempotency_recharge_id_recharges")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_idempotency")),
        sa.UniqueConstraint("token", "key", name=op.f("uq_api_idempotency_token_key")),
    )
    op.add_column("audit_log", sa.Column("via", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Not batch mode: rebuilding `audit_log` is not needed; SQLite 3.35+ and PostgreSQL drop the column in place.
    op.execute("ALTER TABLE audit_log DROP COLUMN via")
    op.drop_table("api_idempotency")
