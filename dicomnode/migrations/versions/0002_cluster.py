"""Several writers: process heartbeats, associations and the series they carry; job queue names
and the start of a run of transient failures (retry horizon).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("process_id", sa.String(100), primary_key=True),
        sa.Column("node_id", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("stopped_at", sa.Float),
        sa.Column("running", sa.String(500), nullable=False),
    )
    op.create_table(
        "associations",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("process_id", sa.String(100), nullable=False, index=True),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("peer_host", sa.String(64), nullable=False),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.Column("closed_at", sa.Float),
        sa.Column("state", sa.String(16), nullable=False),
    )
    op.create_table(
        "association_series",
        sa.Column("association_id", sa.String(40), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), primary_key=True, index=True),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("failing_since", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("failing_since")
        batch.drop_column("queue")
    for table in ("association_series", "associations", "nodes"):
        op.drop_table(table)
