"""a campaign's invalid and suppressed recipients as rows (read a page at a time), their counts
on the campaign, and the index a user's suppression list is paged by

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_KINDS = sa.Enum("invalid", "suppressed", name="exclusion_kind", native_enum=False, length=32)

_exclusions = sa.table(
    "campaign_exclusions",
    sa.column("campaign_id", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("seq", sa.Integer()),
    sa.column("row", sa.Integer()),
    sa.column("contact_id", sa.Text()),
    sa.column("email", sa.Text()),
    sa.column("field", sa.Text()),
    sa.column("reason", sa.Text()),
)


def _campaigns(*lists: str) -> sa.TableClause:
    return sa.table(
        "campaigns",
        sa.column("id", sa.String()),
        *(sa.column(name, sa.JSON()) for name in lists),
        sa.column("invalid_count", sa.Integer()),
        sa.column("suppressed_count", sa.Integer()),
    )


def upgrade() -> None:
    op.create_table(
        "campaign_exclusions",
        sa.Column("campaign_id", sa.String(length=36), nullable=False),
        sa.Column("kind", _KINDS, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("row", sa.Integer(), nullable=True),
        sa.Column("contact_id", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("field", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "kind", "seq", name=op.f("pk_campaign_exclusions")),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("invalid_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("suppressed_count", sa.Integer(), server_default="0", nullable=False)
        )
    _move_lists_to_rows()
    # SQLite drops a column by copying the table, which its rows' references would forbid:
    # the reference to the campaign is made once the columns are gone.
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("suppressed")
        batch_op.drop_column("invalid")
    with op.batch_alter_table("campaign_exclusions", schema=None) as batch_op:
        batch_op.create_foreign_key(
            batch_op.f("fk_campaign_exclusions_campaign_id_campaigns"),
            "campaigns",
            ["campaign_id"],
            ["id"],
        )
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.create_index("ix_suppressions_user_id_id", ["user_id", "id"], unique=False)


def _move_lists_to_rows() -> None:
    """Each campaign's ``invalid`` and ``suppressed`` lists become rows, one campaign at a
    time (a list may hold 100,000 entries)."""
    bind = op.get_bind()
    campaigns = _campaigns("invalid", "suppressed")
    ids = bind.execute(sa.select(campaigns.c.id)).scalars().all()
    for campaign_id in ids:
        invalid, suppressed = bind.execute(
            sa.select(campaigns.c.invalid, campaigns.c.suppressed).where(
                campaigns.c.id == campaign_id
            )
        ).one()
        rows: list[dict[str, Any]] = []
        for kind, entries in (("invalid", invalid or []), ("suppressed", suppressed or [])):
            for seq, e in enumerate(entries):
                rows.append(
                    {
                        "campaign_id": campaign_id,
                        "kind": kind,
                        "seq": seq,
                        "row": e.get("index"),
                        "contact_id": str(e.get("contact_id", "")),
                        "email": str(e.get("email", "")),
                        "field": e.get("field"),
                        "reason": str(e.get("reason", "")),
                    }
                )
        if rows:
            bind.execute(sa.insert(_exclusions), rows)
        bind.execute(
            sa.update(campaigns)
            .where(campaigns.c.id == campaign_id)
            .values(invalid_count=len(invalid or []), suppressed_count=len(suppressed or []))
        )


def downgrade() -> None:
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.drop_index("ix_suppressions_user_id_id")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("invalid", sa.JSON(), server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("suppressed", sa.JSON(), server_default="[]", nullable=False))
    bind = op.get_bind()
    campaigns = _campaigns("invalid", "suppressed")
    ids = bind.execute(sa.select(campaigns.c.id)).scalars().all()
    for campaign_id in ids:
        lists: dict[str, list[dict[str, Any]]] = {"invalid": [], "suppressed": []}
        found = bind.execute(
            sa.select(_exclusions)
            .where(_exclusions.c.campaign_id == campaign_id)
            .order_by(_exclusions.c.kind, _exclusions.c.seq)
        ).all()
        for r in found:
            entry = {"contact_id": r.contact_id, "email": r.email, "reason": r.reason}
            if r.kind == "invalid":
                entry |= {"index": r.row, "field": r.field}
            lists[r.kind].append(entry)
        bind.execute(sa.update(campaigns).where(campaigns.c.id == campaign_id).values(**lists))
    op.drop_table("campaign_exclusions")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("suppressed_count")
        batch_op.drop_column("invalid_count")
