"""Each automatic recharge keeps the decision it was claimed on (`recharges.decision`, its inputs and figures, and
`recharges.limited_by`), and the spend caps find an account's recent recharges by claim time through an index.

Adding nullable columns changes the catalogue only; recharges claimed before this revision keep no decision
(their receipts were issued already).

Revision ID: 0009_recharge_decisions
Revises: 0008_adjustment_references
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_recharge_decisions"
down_revision = "0008_adjustment_references"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recharges") as batch:
        batch.add_column(sa.Column("decision", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("limited_by", sa.String(length=40), nullable=True))
    op.create_index("ix_recharges_account_created", "recharges", ["account_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_recharges_account_created", table_name="recharges")
    with op.batch_alter_table("recharges") as batch:
        batch.drop_column("limited_by")
        batch.drop_column("decision")
