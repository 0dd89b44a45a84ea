"""PostgreSQL only: the schema of Procrastinate 3.10, the engine that carries jobs to workers in
cluster mode. A later Procrastinate release gets a revision that applies its SQL migrations
(``procrastinate.schema.migrations_path``) newer than 03.04.00.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PROCRASTINATE_SERIES = "3.10."


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return  # embedded SQLite ledgers run no engine
    import procrastinate
    from procrastinate.schema import SchemaManager

    if not procrastinate.__version__.startswith(PROCRASTINATE_SERIES):
        raise RuntimeError(f"this revision applies the Procrastinate {PROCRASTINATE_SERIES}x schema; "
                           f"Procrastinate {procrastinate.__version__} is installed")
    # The driver's cursor, so that the script runs as written (no bind-parameter parsing), in the
    # migration's transaction.
    cursor = bind.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(SchemaManager.get_schema())
    finally:
        cursor.close()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        raise NotImplementedError("the Procrastinate schema is not removed by a downgrade; drop the "
                                  "procrastinate_* tables, types and functions by hand if you must")
