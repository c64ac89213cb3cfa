"""the agent's postal address, shown in the footer of their campaign and SmartPlan mail

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("postal_address", sa.String(length=300), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN on both backends (SQLite 3.35+): a batch copy of the table
    # would drop the users table, which the other tables' foreign keys refuse.
    op.drop_column("users", "postal_address")
