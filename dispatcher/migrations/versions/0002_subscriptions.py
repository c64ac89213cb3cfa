"""plans, grants, orders, notifications, system emails

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dispatcher.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "grants",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("plan", sa.String(length=64), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column(
            "reason",
            sa.Enum(
                "period_start",
                "upgrade",
                "cancel",
                name="grant_reason",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("notified", sa.Integer(), nullable=False),
        sa.Column("created_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_grants_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grants")),
        sa.UniqueConstraint("user_id", "period", "seq", name=op.f("uq_grants_user_id")),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("number", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("upgrade", "renewal", name="order_kind", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("plan", sa.String(length=64), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("recurring_cents", sa.Integer(), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("renewal_key", sa.String(length=160), nullable=True),
        sa.Column("charge_id", sa.String(length=200), nullable=False),
        sa.Column("created_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_orders_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
        sa.UniqueConstraint("number", name=op.f("uq_orders_number")),
        sa.UniqueConstraint("renewal_key", name=op.f("uq_orders_renewal_key")),
    )
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_orders_user_id"), ["user_id"], unique=False)

    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("grant_id", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("read_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["grants.id"], name=op.f("fk_notifications_grant_id_grants")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_notifications_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint("grant_id", "threshold", name=op.f("uq_notifications_grant_id")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_notifications_user_id"), ["user_id"], unique=False)

    op.create_table(
        "system_emails",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "usage_notice", "receipt", name="system_email_kind", native_enum=False, length=32
            ),
            nullable=False,
        ),
        sa.Column("notification_id", sa.Integer(), nullable=True),
        sa.Column("order_id", sa.Integer(), nullable=True),
        sa.Column("to_address", sa.String(length=254), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "reserved",
                "sending",
                "sent",
                "failed",
                "unknown",
                name="send_status",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("message_id", sa.String(length=200), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_until", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", dispatcher.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", dispatcher.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_system_emails_notification_id_notifications"),
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_system_emails_order_id_orders")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_system_emails_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_system_emails")),
    )
    with op.batch_alter_table("system_emails", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_system_emails_enqueued_at"), ["enqueued_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_system_emails_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.add_column(sa.Column("grant_seq", sa.Integer(), nullable=True))

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_plan", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("period", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("grant_seq", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("period_end", dispatcher.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(batch_op.f("ix_users_period_end"), ["period_end"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_period_end"))
        batch_op.drop_column("period_end")
        batch_op.drop_column("grant_seq")
        batch_op.drop_column("period")
        batch_op.drop_column("pending_plan")

    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.drop_column("grant_seq")

    with op.batch_alter_table("system_emails", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_system_emails_user_id"))
        batch_op.drop_index(batch_op.f("ix_system_emails_enqueued_at"))

    op.drop_table("system_emails")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notifications_user_id"))

    op.drop_table("notifications")
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_orders_user_id"))

    op.drop_table("orders")
    op.drop_table("grants")
