"""Shared fixtures: a node on an ephemeral port, real DCMTK tools, synthetic series on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dicomnode.config import Config, parse_config  # noqa: E402
from dicomnode.node import Node  # noqa: E402

# pynetdicom installs console scripts called storescu/echoscu too; always use DCMTK's.
DCMTK_BIN = Path("/usr/bin")


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.fail(f"DCMTK tool {path} is missing: apt-get install dcmtk (see .ci/run)")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle on; without TCP_NODELAY each exchange stalls ~40 ms.
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk(tool), *args], capture_output=True, text=True, env=dcmtk_env(), timeout=timeout
    )


def storescu(port: int, *paths: str | Path, calling: str = "STORESCU", called: str = "DICOMNODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Send with DCMTK storescu; it exits 0 even on refused stores, so read its -v output."""
    return run_dcmtk("storescu", "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
                     *map(str, paths), "+sd")


def store_successes(result: subprocess.CompletedProcess[str]) -> int:
    return (result.stdout + result.stderr).count("Received Store Response (Success)")


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        # One receiver: the node process receives itself (multi-process tests ask for more).
        "node": {"port": 0, "data_dir": str(tmp_path / "data"), "min_free_mb": 1, "receivers": 1},
        "peers": [{"ae_title": "STORESCU", "hosts": ["127.0.0.1"]}, {"ae_title": "ECHOSCU"},
                  {"ae_title": "PYNETDICOM"}],
        "assembly": {"quiet_period_s": 0.5, "release_grace_s": 0.1},
        # One job at a time in a thread of the test process: no worker process to spawn.
        "jobs": {"workers": 1, "worker_kind": "thread", "poll_interval_s": 0.2, "backoff_base_s": 0.2},
        # Tests that exercise the console turn it on with a free port; others must not race for 8080.
        "admin": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@dataclass
class RunningNode:
    node: Node
    port: int

    @property
    def ledger(self) -> Any:
        return self.node.ledger


NodeFactory = Callable[..., RunningNode]


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[NodeFactory]:
    started: list[Node] = []

    def factory(**sections: Any) -> RunningNode:
        config: Config = parse_config(base_config(tmp_path, **sections))
        node = Node(config)
        node.start()
        started.append(node)
        return RunningNode(node, node.receiver.ports[0])

    yield factory
    for node in started:
        node.stop()


@pytest.fixture
def running_node(make_node: NodeFactory) -> RunningNode:
    return make_node()


@pytest.fixture(scope="session")
def ct_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synthetic import ct_series, write_series

    folder = tmp_path_factory.mktemp("ct")
    write_series(ct_series(12, seed="receiver"), folder)
    return folder


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- PostgreSQL (tests/postgres.py): one throw-away cluster per session, one database per test ---


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    from postgres import Postgres

    cluster = Postgres().init().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """The SQLAlchemy URL (Unix socket) of a new, empty database."""
    return str(postgres.create_database())
