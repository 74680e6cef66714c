"""The processor budget: `payments.max_requests_per_second` becomes the whole deployment's on PostgreSQL, where
every instance takes its requests' slots from one row per budget (store/budget.py) instead of pacing itself.

UNLOGGED on PostgreSQL: the row is only a pacing hint, written at every request to the processor, so it costs no
WAL and no wait for a flush; a crash or a failover may lose it, and the next request makes it again. The table is
made on SQLite too, to keep one schema, and stays empty there (one instance paces itself).

Revision ID: 0015_processor_budget
Revises: 0014_authorizations
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_processor_budget"
down_revision = "0014_authorizations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    unlogged = ["UNLOGGED"] if op.get_bind().dialect.name == "postgresql" else []
    op.create_table(
        "processor_budgets",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("next_slot", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_processor_budgets")),
        prefixes=unlogged,
    )


def downgrade() -> None:
    op.drop_table("processor_budgets")
