"""refunds due (a failed send's credit still to be given back in Redis), campaign request
keys (a repeated POST answers with the campaign it created) and MailChimp job leases

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatcher.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("refund_due", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.create_index("ix_sends_refund_due", ["refund_due", "updated_at"], unique=False)

    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("request_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("lease_until", dispatcher.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column(
                "send_attempted_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch_op.create_unique_constraint(
            batch_op.f("uq_campaigns_user_id"), ["user_id", "idempotency_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_campaigns_user_id"), type_="unique")
        batch_op.drop_column("send_attempted_at")
        batch_op.drop_column("attempts")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("request_digest")
        batch_op.drop_column("idempotency_key")

    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.drop_index("ix_sends_refund_due")
        batch_op.drop_column("refund_due")
