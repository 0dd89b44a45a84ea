"""Notify (issue 13): events raised from triage results, and their notifications per channel with
the times that make up the time to notification.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("analyzer", sa.String(100), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("previous_verdict", sa.String(16)),
        sa.Column("verdict_changed", sa.Boolean),
        sa.Column("supersedes", sa.String(20)),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("last_image_at", sa.Float),
        sa.Column("series_complete_at", sa.Float),
        sa.Column("result_built_at", sa.Float),
    )
    op.create_table(
        "notifications",
        sa.Column("event_id", sa.String(20), primary_key=True),
        sa.Column("channel", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job_id", sa.Integer, index=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float),
        sa.Column("acked_at", sa.Float),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("message_ids", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("notifications")
    op.drop_table("events")
