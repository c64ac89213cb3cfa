"""partial sweep indexes: ix_sends_retry_at holds parked sends only, ix_sends_refund_due the
sends whose refund is still due only (by updated_at)

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_PARKED = sa.column("retry_at").is_not(None)
_REFUND_DUE = sa.column("refund_due", sa.Boolean()).is_(True)


def upgrade() -> None:
    op.drop_index("ix_sends_retry_at", table_name="sends")
    op.drop_index("ix_sends_refund_due", table_name="sends")
    op.create_index(
        "ix_sends_retry_at",
        "sends",
        ["retry_at"],
        sqlite_where=_PARKED,
        postgresql_where=_PARKED,
    )
    op.create_index(
        "ix_sends_refund_due",
        "sends",
        ["updated_at"],
        sqlite_where=_REFUND_DUE,
        postgresql_where=_REFUND_DUE,
    )


def downgrade() -> None:
    op.drop_index("ix_sends_refund_due", table_name="sends")
    op.drop_index("ix_sends_retry_at", table_name="sends")
    op.create_index("ix_sends_refund_due", "sends", ["refund_due", "updated_at"])
    op.create_index("ix_sends_retry_at", "sends", ["retry_at"])
