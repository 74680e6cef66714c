"""Refused call authorizations (402), counted per account, hour and reason, for `recharged status`.

Revision ID: 0016_authorization_refusals
Revises: 0015_processor_budget
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_authorization_refusals"
down_revision = "0015_processor_budget"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "authorization_refusals",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_authorization_refusals_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", "hour", "reason", name=op.f("pk_authorization_refusals")),
    )
    op.create_index("ix_authorization_refusals_hour", "authorization_refusals", ["hour"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_authorization_refusals_hour", table_name="authorization_refusals")
    op.drop_table("authorization_refusals")
