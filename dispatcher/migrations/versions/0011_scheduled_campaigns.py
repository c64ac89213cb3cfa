"""scheduled campaigns: a campaign's ``send_at`` and the index the beat finds due ones by

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (SQLite 3.35+ adds and drops columns itself): a batch copy of
    # campaigns would trip the foreign keys of campaign_exclusions.
    op.add_column("campaigns", sa.Column("send_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_campaigns_status_send_at", "campaigns", ["status", "send_at"])


def downgrade() -> None:
    # Campaigns still waiting cannot be told apart from running ones without their time:
    # they fail, as campaigns whose request died do (no credit is kept for them either way
    # once the reserving sweep settles them).
    op.execute("UPDATE campaigns SET status = 'failed' WHERE status = 'scheduled'")
    op.drop_index("ix_campaigns_status_send_at", "campaigns")
    op.drop_column("campaigns", "send_at")
