"""What the queue and the desktop add to an interaction: skill, agent, queue and answer times, wrap-up code.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("interactions") as batch:
        batch.add_column(sa.Column("skill", sa.String(64), nullable=True))
        batch.add_column(sa.Column("agent", sa.String(64), nullable=True))
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("wrapup_code", sa.String(32), nullable=True))
        batch.create_index("ix_interactions_agent", ["agent"])


def downgrade() -> None:
    with op.batch_alter_table("interactions") as batch:
        batch.drop_index("ix_interactions_agent")
        for column in ("wrapup_code", "answered_at", "queued_at", "agent", "skill"):
            batch.drop_column(column)
