"""Charging: funding sources, recharges in phases, charge attempts, and each account's recharge state.

Revision ID: 0002_charging
Revises: 0001_ledger_core
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_charging"
down_revision = "0001_ledger_core"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "funding_sources",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("customer", sa.String(length=64), nullable=False),
        sa.Column("payment_method", sa.String(length=64), nullable=False),
        sa.Column("brand", sa.String(length=20), nullable=False),
        sa.Column("last4", sa.String(length=4), nullable=False),
        sa.Column("exp_month", sa.Integer(), nullable=False),
        sa.Column("exp_year", sa.Integer(), nullable=False),
        sa.Column("is_default", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
        sa.Column("unusable_reason", sa.String(length=200), nullable=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_funding_sources_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_funding_sources")),
        sa.UniqueConstraint("account_id", "payment_method", name=op.f("uq_funding_sources_account_id_payment_method")),
    )
    with op.batch_alter_table("funding_sources", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_funding_sources_account_id"), ["account_id"], unique=False)
        batch_op.create_index(
            "uq_funding_sources_one_default",
            ["account_id"],
            unique=True,
            postgresql_where=sa.text("is_default AND removed_at IS NULL"),
            sqlite_where=sa.text("is_default AND removed_at IS NULL"),
        )

    op.create_table(
        "recharges",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("phase", sa.String(length=10), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("vat", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("vat_percent", sa.String(length=24), nullable=False),
        sa.Column("balance_before", sa.BigInteger(), nullable=False),
        sa.Column("average_daily", sa.BigInteger(), nullable=True),
        sa.Column("threshold", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.String(length=120), nullable=True),
        sa.Column("payment_intent", sa.String(length=64), nullable=True),
        sa.Column("source_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "phase IN ('claimed', 'charging', 'paid', 'credited', 'finished', 'failed')",
            name=op.f("ck_recharges_known_phase"),
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_recharges_account_id_accounts")),
        sa.ForeignKeyConstraint(
            ["source_id"], ["funding_sources.id"], name=op.f("fk_recharges_source_id_funding_sources")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recharges")),
        sa.UniqueConstraint("payment_intent", name=op.f("uq_recharges_payment_intent")),
    )
    with op.batch_alter_table("recharges", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_recharges_account_id"), ["account_id"], unique=False)
        batch_op.create_index(
            "ix_recharges_open",
            ["phase"],
            unique=False,
            postgresql_where=sa.text("phase NOT IN ('finished', 'failed')"),
            sqlite_where=sa.text("phase NOT IN ('finished', 'failed')"),
        )
        batch_op.create_index(
            "uq_recharges_one_open_per_account",
            ["account_id"],
            unique=True,
            postgresql_where=sa.text("phase NOT IN ('finished', 'failed')"),
            sqlite_where=sa.text("phase NOT IN ('finished', 'failed')"),
        )

    op.create_table(
        "charge_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("recharge_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("source_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payment_intent", sa.String(length=64), nullable=True),
        sa.Column("decline_class", sa.String(length=10), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("decline_code", sa.String(length=64), nullable=True),
        sa.Column("advice_code", sa.String(length=64), nullable=True),
        sa.Column("message", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["recharge_id"], ["recharges.id"], name=op.f("fk_charge_attempts_recharge_id_recharges")
        ),
        sa.ForeignKeyConstraint(
            ["source_id"], ["funding_sources.id"], name=op.f("fk_charge_attempts_source_id_funding_sources")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_charge_attempts")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_charge_attempts_idempotency_key")),
    )
    with op.batch_alter_table("charge_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_charge_attempts_recharge_id"), ["recharge_id"], unique=False)
        batch_op.create_index("ix_charge_attempts_source_time", ["source_id", "created_at"], unique=False)
        batch_op.create_index(
            "uq_charge_attempts_one_pending",
            ["recharge_id"],
            unique=True,
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("recharge_state", sa.String(length=20), server_default=sa.text("'ok'"), nullable=False)
        )
        batch_op.add_column(sa.Column("failed_cycles", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("state_reason", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("state_reason")
        batch_op.drop_column("retry_at")
        batch_op.drop_column("failed_cycles")
        batch_op.drop_column("recharge_state")

    with op.batch_alter_table("charge_attempts", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_charge_attempts_one_pending",
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )
        batch_op.drop_index("ix_charge_attempts_source_time")
        batch_op.drop_index(batch_op.f("ix_charge_attempts_recharge_id"))

    op.drop_table("charge_attempts")
    with op.batch_alter_table("recharges", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_recharges_one_open_per_account",
            postgresql_where=sa.text("phase NOT IN ('finished', 'failed')"),
            sqlite_where=sa.text("phase NOT IN ('finished', 'failed')"),
        )
        batch_op.drop_index(
            "ix_recharges_open",
            postgresql_where=sa.text("phase NOT IN ('finished', 'failed')"),
            sqlite_where=sa.text("phase NOT IN ('finished', 'failed')"),
        )
        batch_op.drop_index(batch_op.f("ix_recharges_account_id"))

    op.drop_table("recharges")
    with op.batch_alter_table("funding_sources", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_funding_sources_one_default",
            postgresql_where=sa.text("is_default AND removed_at IS NULL"),
            sqlite_where=sa.text("is_default AND removed_at IS NULL"),
        )
        batch_op.drop_index(batch_op.f("ix_funding_sources_account_id"))

    op.drop_table("funding_sources")
