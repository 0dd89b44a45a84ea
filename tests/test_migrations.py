"""Schema migrations (Alembic) on SQLite and PostgreSQL: they build exactly ``ledger.metadata``, a
ledger of release 0.1.0 upgrades in place, and several processes may start on one ledger at once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import tomlkit
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import base_config, store_successes, storescu
from synthetic import ct_series, write_series
from test_ledger import race

from dicomnode.config import parse_config
from dicomnode.domain import JobKind, JobState, SeriesState
from dicomnode.ledger import Ledger, metadata
from dicomnode.migrations import current, head, ours, upgrade
from dicomnode.node import Node

# Written by the code of release 0.1.0 (main before the cluster work): a 4-image CT series, one
# succeeded analysis, one dead delivery. That release created its tables without Alembic.
RELEASE_0_1_0_LEDGER = Path(__file__).parent / "data" / "ledger-0.1.0.sqlite3"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


def test_migrations_build_exactly_the_tables_the_code_uses(empty_url: str) -> None:
    ledger = Ledger(empty_url)
    try:
        with ledger.engine.connect() as conn:
            assert current(conn) == head()
            context = MigrationContext.configure(conn, opts={"include_name": ours})
            assert compare_metadata(context, metadata) == []
            tables = set(sa.inspect(conn).get_table_names())
        if ledger.dialect == "postgresql":  # the engine's schema comes with the ledger's
            assert {"procrastinate_jobs", "procrastinate_workers"} <= tables
        else:
            assert not any(t.startswith("procrastinate") for t in tables)
    finally:
        ledger.close()


def test_several_processes_starting_at_once_migrate_once(empty_url: str) -> None:
    engines = [sa.create_engine(empty_url, poolclass=sa.pool.NullPool) for _ in range(4)]
    try:
        outcomes = race(*(lambda e=e: upgrade(e) for e in engines))
    finally:
        for engine in engines:
            engine.dispose()
    assert {after for _, after in outcomes} == {head()}
    assert sum(before is None for before, _ in outcomes) == 1  # one migrated; the others found it done


def test_a_release_0_1_0_ledger_upgrades_in_place_and_keeps_working(tmp_path: Path) -> None:
    data = base_config(tmp_path, rules=[{"name": "ct", "match": {"modality": "CT"}, "then": {"analyzers": ["qc-ct"]}}])
    data_dir = Path(data["node"]["data_dir"])
    data_dir.mkdir(parents=True)
    shutil.copy(RELEASE_0_1_0_LEDGER, data_dir / "ledger.sqlite3")
    config_path = tmp_path / "dicomnode.toml"
    config_path.write_text(tomlkit.dumps(data))

    upgraded = subprocess.run([sys.executable, "-m", "dicomnode.cli", "db", "upgrade", "--config", str(config_path)],
                              capture_output=True, text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from 0001 to revision {head()}" in upgraded.stdout
    again = subprocess.run([sys.executable, "-m", "dicomnode.cli", "db", "upgrade", "--config", str(config_path)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout

    node = Node(parse_config(data))
    node.start()
    try:
        # What release 0.1.0 recorded is all there.
        assert node.ledger.count_instances() == 4
        old = {j.kind: j for j in node.ledger.list_jobs()}
        assert old[JobKind.ANALYZE].state == JobState.SUCCEEDED and old[JobKind.DELIVER].state == JobState.DEAD
        assert old[JobKind.DELIVER].queue == "" and old[JobKind.DELIVER].failing_since is None
        assert node.ledger.results_for_series(old[JobKind.ANALYZE].series_instance_uid)
        # And the upgraded ledger takes new work: a new series goes all the way to done.
        files = write_series(ct_series(3, seed="after-upgrade"), tmp_path / "ct")
        assert store_successes(storescu(node.receiver.ports[0], *files)) == 3
        node.run_until_idle(timeout=120)
        old_uid = old[JobKind.ANALYZE].series_instance_uid
        new = [s for s in node.ledger.recent_series() if s.series_instance_uid != old_uid]
        assert [s.state for s in new] == [SeriesState.DONE]
        assert node.ledger.retry_job(old[JobKind.DELIVER].id)  # a 0.1.0 dead letter can be replayed
    finally:
        node.stop()
