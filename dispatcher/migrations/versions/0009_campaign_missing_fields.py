"""a campaign's count of recipients lacking each merge field its message uses without a default

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("campaigns", sa.Column("missing_fields", sa.JSON(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+ and PostgreSQL): a batch copy of
    # `campaigns` would trip the foreign keys of the rows that refer to it.
    op.drop_column("campaigns", "missing_fields")
