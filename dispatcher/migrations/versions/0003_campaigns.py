"""campaigns

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatcher.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "campaigns",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column(
            "provider",
            sa.Enum(
                "command_email", "mailchimp", name="campaign_provider", native_enum=False, length=32
            ),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "reserving",
                "running",
                "paused",
                "cancelled",
                "completed",
                "failed",
                name="campaign_status",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("from_name", sa.String(length=200), nullable=True),
        sa.Column("reply_to", sa.String(length=254), nullable=True),
        sa.Column("recipients", sa.Integer(), nullable=False),
        sa.Column("invalid", sa.JSON(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=True),
        sa.Column("grant_seq", sa.Integer(), nullable=True),
        sa.Column("provider_campaign_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("enqueued_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_campaigns_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_campaigns_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chunk", sa.Integer(), nullable=True))
        batch_op.create_index(
            "ix_sends_campaign_chunk_status", ["campaign_id", "chunk", "status"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.drop_index("ix_sends_campaign_chunk_status")
        batch_op.drop_column("chunk")

    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_campaigns_user_id"))

    op.drop_table("campaigns")
