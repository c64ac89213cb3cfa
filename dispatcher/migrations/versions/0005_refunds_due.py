"""refunds due: a failed send's credit still to be given back in Redis

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

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


def downgrade() -> None:
    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.drop_index("ix_sends_refund_due")
        batch_op.drop_column("refund_due")
