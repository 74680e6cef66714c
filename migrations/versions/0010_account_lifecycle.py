"""Accounts can be closed (`recharged accounts close`) and reopened: `accounts.closed_at` (NULL while open) and
`accounts.closed_reason`, set and cleared together (a CHECK on PostgreSQL; SQLite adds a CHECK only by rebuilding
the table, which the foreign keys to `accounts` forbid: see 0005).

Adding nullable columns changes the catalogue only: every existing account stays open.

Revision ID: 0010_account_lifecycle
Revises: 0009_recharge_decisions
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_account_lifecycle"
down_revision = "0009_recharge_decisions"
branch_labels = None
depends_on = None

CHECK = "ck_accounts_closed_with_reason"


def upgrade() -> None:
    op.add_column("accounts", sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("accounts", sa.Column("closed_reason", sa.String(length=200), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.create_check_constraint(op.f(CHECK), "accounts", "(closed_at IS NULL) = (closed_reason IS NULL)")


def downgrade() -> None:
    # Closed accounts become open again; their closing stays in the audit log.
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(op.f(CHECK), "accounts", type_="check")
    # Not batch mode: rebuilding `accounts` would trip the foreign keys that point at it. SQLite 3.35+ and
    # PostgreSQL drop an unindexed column in place.
    op.execute("ALTER TABLE accounts DROP COLUMN closed_reason")
    op.execute("ALTER TABLE accounts DROP COLUMN closed_at")
