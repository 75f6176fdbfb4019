"""Comparisons and the labelling queue.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_tasks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("responses", sa.JSON, nullable=False),
        sa.Column("category", sa.String(200), nullable=True),
        sa.Column("source", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("leased_to", sa.String(200), nullable=True),
        sa.Column("comparison_id", sa.Integer, nullable=True),
    )
    op.create_index("ix_label_tasks_status", "label_tasks", ["status"])
    op.create_table(
        "comparisons",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("labeller", sa.String(200), nullable=False),
        sa.Column("category", sa.String(200), nullable=True),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("responses", sa.JSON, nullable=False),
        sa.Column("ranking", sa.JSON, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("task_id", sa.Integer, sa.ForeignKey("label_tasks.id"), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.UniqueConstraint("idempotency_key", name="uq_comparisons_idempotency_key"),
    )
    op.create_index("ix_comparisons_created_at", "comparisons", ["created_at"])
    op.create_index("ix_comparisons_labeller", "comparisons", ["labeller"])
    op.create_index("ix_comparisons_category", "comparisons", ["category"])


def downgrade() -> None:
    op.drop_table("comparisons")
    op.drop_table("label_tasks")
