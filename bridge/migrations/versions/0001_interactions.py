"""Interactions and their steps.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interactions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("caller", sa.String(32), nullable=False),
        sa.Column("dialled", sa.String(32), nullable=False),
        sa.Column("flow", sa.String(64), nullable=False),
        sa.Column("language", sa.String(8), nullable=False),
        sa.Column("intent", sa.String(64), nullable=True),
        sa.Column("asterisk_channel", sa.String(128), nullable=False),
        sa.Column("asterisk_uniqueid", sa.String(64), nullable=False),
        sa.Column("sip_call_id", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("outcome_node", sa.String(64), nullable=True),
        sa.Column("destination", sa.String(64), nullable=True),
    )
    op.create_index("ix_interactions_state", "interactions", ["state"])
    op.create_index("ix_interactions_caller", "interactions", ["caller"])
    op.create_index("ix_interactions_asterisk_uniqueid", "interactions", ["asterisk_uniqueid"])
    op.create_index("ix_interactions_started_at", "interactions", ["started_at"])
    op.create_index("ix_interactions_outcome", "interactions", ["outcome"])
    op.create_table(
        "interaction_steps",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("interaction_id", sa.String(32), sa.ForeignKey("interactions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("value", sa.Text, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_interaction_steps_interaction_id", "interaction_steps", ["interaction_id"])


def downgrade() -> None:
    op.drop_table("interaction_steps")
    op.drop_table("interactions")
