"""suppression removals: who took an address off an agent's list, when and why

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatcher.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "suppression_removals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("suppressed_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("removed_by", sa.String(length=128), nullable=False),
        sa.Column("why", sa.Text(), nullable=False),
        sa.Column("removed_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_suppression_removals_user_id", "suppression_removals", ["user_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_suppression_removals_user_id", table_name="suppression_removals")
    op.drop_table("suppression_removals")
