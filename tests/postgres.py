"""A real PostgreSQL for tests: a throw-away cluster started by the fixtures themselves.

``initdb``/``pg_ctl`` run as the ``postgres`` user (PostgreSQL refuses to run as root) on a Unix
socket in a temporary folder: no TCP port, no systemd, nothing left behind. Debian's
``postgresql`` package provides the binaries (``.ci/run`` installs it). Each test gets its own
database (``create_database``), so one cluster serves the whole session.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BIN_CANDIDATES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
_names = itertools.count(1)


def _bin(tool: str) -> str:
    for folder in BIN_CANDIDATES:
        if (folder / tool).exists():
            return str(folder / tool)
    found = shutil.which(tool)
    if found is None:
        raise AssertionError(f"PostgreSQL's {tool} is missing: apt-get install postgresql (see .ci/run)")
    return found


def _as_postgres() -> list[str]:
    """Run a command as the postgres user when we are root (CI); as ourselves otherwise."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise AssertionError("user 'postgres' is missing: apt-get install postgresql (see .ci/run)") from None
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class Postgres:
    """One PostgreSQL cluster in ``folder``, listening on a Unix socket only."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dicomnode-pg-")))
    # Benchmarks compare against references that fsync (Orthanc's SyncStorageArea, our SQLite):
    # they run PostgreSQL with its production durability too.
    durable: bool = False

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "socket"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*_as_postgres(), *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def init(self) -> Postgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.folder, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(self.folder, 0o755)
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        return self

    def start(self) -> Postgres:
        # fsync off: a test machine does not lose power; a crash of PostgreSQL itself (stop -m
        # immediate) still loses nothing that was committed, which is what the tests exercise.
        durability = "" if self.durable else "-c fsync=off -c full_page_writes=off "
        options = (f"-k {self.socket_dir} -c listen_addresses='' {durability}"
                   "-c max_connections=200 -c shared_buffers=32MB")
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"),
                  "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL on the Unix socket, as an operator writes it in ``[cluster]``."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        with psycopg.connect(f"host={self.socket_dir} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return (self.folder / "log").read_text()[-chars:]
        except OSError:
            return ""
