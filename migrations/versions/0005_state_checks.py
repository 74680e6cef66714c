"""CHECK constraints for the states the vocabulary in `recharged/states.py` defines: charge attempt statuses and
decline classes, job run statuses, receipt and recharge kinds, rate measures.

PostgreSQL only. SQLite can add a CHECK only by rebuilding the table, and these tables carry partial unique
indexes that exactly-once depends on and foreign keys that forbid dropping them; there the models' StateText
type refuses any value outside the vocabulary before it is written. The values are spelled out here, as they
were when this revision was written, so the revision never changes when the vocabulary grows.

Revision ID: 0005_state_checks
Revises: 0004_receipts
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0005_state_checks"
down_revision = "0004_receipts"
branch_labels = None
depends_on = None

CHECKS = (
    (
        "charge_attempts",
        "known_status",
        "status IN ('pending', 'succeeded', 'declined', 'action_required', 'abandoned')",
    ),
    ("charge_attempts", "known_decline", "decline_class IS NULL OR decline_class IN ('hard', 'soft')"),
    ("job_runs", "known_status", "status IN ('running', 'succeeded', 'stopped', 'failed', 'interrupted')"),
    ("receipts", "known_kind", "kind IN ('auto', 'topup')"),
    ("recharges", "known_kind", "kind IN ('auto', 'topup')"),
    ("rates", "known_measure", "measure IN ('time', 'count')"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, name, condition in CHECKS:
        op.create_check_constraint(op.f(f"ck_{table}_{name}"), table, condition)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, name, _ in reversed(CHECKS):
        op.drop_constraint(op.f(f"ck_{table}_{name}"), table, type_="check")
