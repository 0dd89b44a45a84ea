"""The ledger of release 0.1.0: instances, series, jobs, results.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(300), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("peer_host", sa.String(64), nullable=False),
        sa.Column("association_id", sa.String(40), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("instance_number", sa.Integer),
        sa.Column("image_type", sa.String(200), nullable=False),
    )
    op.create_table(
        "series",
        sa.Column("series_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("body_part", sa.String(64), nullable=False),
        sa.Column("series_description", sa.String(200), nullable=False),
        sa.Column("study_description", sa.String(200), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("epoch_count", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("expected_count", sa.Integer),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("last_association_id", sa.String(40), nullable=False),
        sa.Column("released_at", sa.Float),
        sa.Column("processed_at", sa.Float),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("note", sa.String(500), nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dedup_key", sa.String(400), nullable=False, unique=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String(100)),
        sa.Column("lease_expires", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Index("ix_jobs_claim", "state", "kind", "priority", "not_before"),
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, nullable=False, index=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("analyzer", sa.String(100), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("result_series_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(300), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("results", "jobs", "series", "instances"):
        op.drop_table(table)
