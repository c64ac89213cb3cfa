"""campaigns.pending_recipients, reserved_at and packed_written: a large campaign's recipients
stored compactly at acceptance, until its first chunk task writes their sends; when its credits
were granted; how many chunks are written

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatcher.models

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("campaigns", sa.Column("pending_recipients", sa.LargeBinary(), nullable=True))
    op.add_column(
        "campaigns",
        sa.Column("reserved_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "campaigns",
        sa.Column("packed_written", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("campaigns", "packed_written")
    op.drop_column("campaigns", "reserved_at")
    op.drop_column("campaigns", "pending_recipients")
