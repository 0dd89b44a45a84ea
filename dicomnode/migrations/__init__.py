"""Alembic migrations of the ledger schema, for SQLite and PostgreSQL alike.

:func:`upgrade` brings a ledger to the newest revision; ``dicomnode serve``, ``dicomnode worker`` and
``dicomnode db upgrade`` call it. An unversioned ledger of release 0.1.0 (created with
``create_all``) is recognised, stamped as revision 0001 and upgraded in place. Several processes
may start at once: on PostgreSQL an advisory lock, on SQLite ``BEGIN IMMEDIATE``, lets exactly one
of them migrate while the others wait and then find the schema current.

To add a revision: change the tables in :mod:`dicomnode.ledger`, then write
``versions/000N_<what>.py`` with ``revision = "000N"`` and ``down_revision`` naming the previous
one; change columns inside ``op.batch_alter_table`` (SQLite cannot alter them in place).
``tests/test_migrations.py`` fails while the migrations and ``ledger.metadata`` disagree.
"""

from __future__ import annotations

import functools
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
BASELINE = "0001"  # the schema of release 0.1.0, which had no alembic_version table
_LOCK_KEY = 0x6469636F6D6E  # "dicomn": the advisory lock every migrating process takes


def ours(name: str | None, type_: str, _parent: object) -> bool:
    """The engine's tables (Procrastinate) live in the same database but are not the ledger's."""
    return not (type_ == "table" and (name or "").startswith("procrastinate_"))


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def head() -> str:
    """The newest revision shipped with this release."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Create or upgrade the ledger schema; returns (revision before, revision after)."""
    with engine.connect() as conn:
        before = current(conn)
    if before == head():
        return before, before
    migrating = engine if engine.dialect.name != "sqlite" else _sqlite_migration_engine(engine)
    try:
        with migrating.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
            before = current(conn)  # another process may have migrated while we waited
            if before is None and sa.inspect(conn).has_table("instances"):
                command.stamp(alembic_config(conn), BASELINE)  # a ledger of release 0.1.0
                before = BASELINE
            command.upgrade(alembic_config(conn), "head")
            after = current(conn)
    finally:
        if migrating is not engine:
            migrating.dispose()
    assert after is not None
    return before, after


def _sqlite_migration_engine(engine: Engine) -> Engine:
    """pysqlite opens transactions only before DML, so DDL would run outside them: this engine
    begins each transaction itself, with BEGIN IMMEDIATE (the write lock, waited for up to 30 s),
    so a migration is all or nothing and exactly one process runs it."""
    migrating = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)

    @sa.event.listens_for(migrating, "connect")
    def _connect(dbapi_connection: object, _record: object) -> None:
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(migrating, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return migrating
