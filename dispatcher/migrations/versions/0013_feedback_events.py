"""feedback events: bounces and complaints reported after delivery; sends found by Message-ID

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatcher.models

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("send_id", sa.String(length=36), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "hard_bounce",
                "soft_bounce",
                "complaint",
                name="feedback_kind",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("outcome_published", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("occurred_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.ForeignKeyConstraint(["send_id"], ["sends.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("send_id", "kind"),
    )
    op.create_index(
        "ix_feedback_events_user_email_kind",
        "feedback_events",
        ["user_id", "email", "kind"],
        unique=False,
    )
    op.create_index("ix_sends_message_id", "sends", ["message_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_sends_message_id", table_name="sends")
    op.drop_index("ix_feedback_events_user_email_kind", table_name="feedback_events")
    op.drop_table("feedback_events")
