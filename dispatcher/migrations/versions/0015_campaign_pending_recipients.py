"""campaigns.pending_recipients and reserved_at: a large campaign's recipients stored compactly
at acceptance, until its first chunk task writes their sends; when its credits were granted

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


def downgrade() -> None:
    op.drop_column("campaigns", "reserved_at")
    op.drop_column("campaigns", "pending_recipients")
