"""suppressions, alerts and parked retries

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatcher.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "policy_rejected",
                "smtp_auth_failed",
                name="alert_kind",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("campaign_id", sa.String(length=36), nullable=True),
        sa.Column("relay", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_user_id"), ["user_id"], unique=False)

    op.create_table(
        "suppressions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column(
            "reason",
            sa.Enum(
                "hard_bounce",
                "unsubscribe",
                "manual",
                name="suppression_reason",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("contact_id", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("expires_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_suppressions_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
        sa.UniqueConstraint("user_id", "email", name=op.f("uq_suppressions_user_id")),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suppressed", sa.JSON(), server_default="[]", nullable=False))
        batch_op.add_column(
            sa.Column("retry_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True)
        )

    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("retry_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(batch_op.f("ix_sends_retry_at"), ["retry_at"], unique=False)
        batch_op.create_index(
            "ix_sends_kind_status_lease", ["kind", "status", "lease_until"], unique=False
        )
        batch_op.create_index(
            "ix_sends_published_finished", ["outcome_published", "finished_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.drop_index("ix_sends_published_finished")
        batch_op.drop_index("ix_sends_kind_status_lease")
        batch_op.drop_index(batch_op.f("ix_sends_retry_at"))
        batch_op.drop_column("retry_at")

    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("retry_at")
        batch_op.drop_column("suppressed")

    op.drop_table("suppressions")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_user_id"))

    op.drop_table("alerts")
