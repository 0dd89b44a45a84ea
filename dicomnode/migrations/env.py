"""Alembic environment: runs on the connection :func:`dicomnode.migrations.upgrade` hands over, or,
from the ``alembic`` command line, on ``sqlalchemy.url`` of the ini file."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from dicomnode.ledger import metadata
from dicomnode.migrations import ours


def _run(connection: sa.engine.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_name=ours,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url") or "", poolclass=sa.pool.NullPool)
    with engine.begin() as own:
        _run(own)
