"""Durable bytes: every file is written to a temporary name, fsynced, linked into its final path
(built only from validated UIDs) and the directory fsynced, before anyone is told it exists.

Layout under the spool root::

    incoming/[<node_id>/]          temporary files <pid>-<random>.part; after a crash, those of
                                   processes that no longer exist are debris. In a cluster each
                                   node has its own folder of a shared spool, so that start-up
                                   never touches another node's files in flight.
    instances/<study>/<series>/<sop>.dcm
    results/<study>/<series>/<sop>.dcm

The final link is made with ``os.link`` so an existing file is never overwritten: the first copy of
a SOP Instance wins (see ``docs/conformance.md``, duplicates).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from dicomnode.errors import CannotUnderstand, OutOfResources

# PS3.5 9.1: components of digits, no leading zero unless the component is "0"; 64 characters max.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


_CACHE_LIMIT = 10_000  # folders remembered; one per series, forgotten wholesale when full


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def require_uid(name: str, value: object) -> str:
    """Return ``value`` if it is a valid UID; the path components of the spool depend on it."""
    if not valid_uid(value):
        raise CannotUnderstand(f"{name} {str(value)[:70]!r} is not a valid UID")
    return str(value)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A directory of immutable DICOM files, written crash-safely."""

    def __init__(self, root: Path, min_free_bytes: int = 0, node_id: str = "") -> None:
        self.root = root.resolve()
        self.incoming = self.root / "incoming" / node_id if node_id else self.root / "incoming"
        self.min_free_bytes = min_free_bytes
        for sub in ("instances", "results"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()  # directories known to exist durably
        self._resolved: dict[str, Path] = {}  # relative parent folder -> resolved, checked path

    # --- paths ----------------------------------------------------------------------------------

    @staticmethod
    def instance_path(study_uid: str, series_uid: str, sop_uid: str, area: str = "instances") -> str:
        """Relative path of an object; every component is a validated UID, so no traversal."""
        parts = [
            require_uid("StudyInstanceUID", study_uid),
            require_uid("SeriesInstanceUID", series_uid),
            require_uid("SOPInstanceUID", sop_uid) + ".dcm",
        ]
        return "/".join([area, *parts])

    def path(self, relative: str) -> Path:
        full = (self.root / relative).resolve()
        if self.root not in full.parents:
            raise ValueError(f"spool path {relative!r} escapes the spool")
        return full

    # --- writing --------------------------------------------------------------------------------

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`OutOfResources` when accepting ``incoming_bytes`` would cross the floor."""
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfResources(
                f"spool has {free // 2**20} MiB free, below the floor of "
                f"{self.min_free_bytes // 2**20} MiB"
            )

    def _target(self, relative: str) -> Path:
        """:meth:`path` for writing, with the parent folder's resolution cached: resolving every
        component of a six-deep path costs a system call each, once per stored instance."""
        parent, _, name = relative.rpartition("/")
        if not parent or name in ("", ".", ".."):
            return self.path(relative)
        folder = self._resolved.get(parent)
        if folder is None:
            folder = self.path(parent)
            if len(self._resolved) >= _CACHE_LIMIT:
                self._resolved.clear()
            self._resolved[parent] = folder
        return folder / name

    def write(self, relative: str, *chunks: bytes) -> bool:
        """Durably write ``chunks`` to ``relative``. Returns False if the file already existed
        (nothing is overwritten). Raises :class:`OutOfResources` on a full disk."""
        created, folder = self.write_linked(relative, *chunks)
        self.sync_folder(folder)
        return created

    def write_linked(self, relative: str, *chunks: bytes) -> tuple[bool, Path]:
        """:meth:`write` up to the link: the file's bytes are fsynced and it has its final name, but
        that name is durable only once :meth:`sync_folder` has flushed the returned folder. Lets the
        receiver flush the folder while the ledger commits (two flush latencies in sequence instead
        of three); Success still waits for both. Returns (False: the file already existed, its
        folder). The folder is flushed for an existing file too: a process killed between its link
        and its folder flush left a name that is not durable yet."""
        target = self._target(relative)
        size = sum(len(c) for c in chunks)
        self.check_space(size)
        temp = self.incoming / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._link(temp, target), target.parent
        except OSError as exc:
            raise OutOfResources(f"cannot write to spool: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def sync_folder(self, folder: Path) -> None:
        """Make the names in ``folder`` durable (fsync of the directory)."""
        try:
            _fsync_dir(folder)
        except OSError as exc:
            raise OutOfResources(f"cannot write to spool: {exc.strerror or exc}") from exc

    def _link(self, temp: Path, target: Path) -> bool:
        parent = target.parent
        if parent not in self._known_dirs:
            created = not parent.exists()
            parent.mkdir(parents=True, exist_ok=True)
            if created:
                # New directories must themselves be durable entries of their parents.
                for ancestor in [parent, *parent.parents]:
                    if ancestor == self.root:
                        break
                    _fsync_dir(ancestor.parent)
            if len(self._known_dirs) >= _CACHE_LIMIT:
                self._known_dirs.clear()
            self._known_dirs.add(parent)
        try:
            os.link(temp, target)
        except FileExistsError:
            return False
        return True

    # --- reading and recovery -------------------------------------------------------------------

    def read(self, relative: str) -> bytes:
        return self.path(relative).read_bytes()

    def discard(self, relative: str) -> None:
        """Remove a file that must not stay in the spool (already gone is fine)."""
        target = self.path(relative)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
            _fsync_dir(target.parent)

    def exists(self, relative: str) -> bool:
        return self.path(relative).is_file()

    def remove_debris(self) -> int:
        """Delete temporary files left by a crash; returns how many were removed. Files of another
        live process writing into the same folder (receivers sharing a port) are left alone."""
        removed = 0
        for entry in self.incoming.iterdir():
            if entry.is_dir():  # another node's folder of a shared spool
                continue
            writer, _, _ = entry.name.partition("-")
            if writer.isdigit() and int(writer) != os.getpid() and process_exists(int(writer)):
                continue
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
        if removed:
            _fsync_dir(self.incoming)
        return removed

    def files(self, area: str = "instances") -> Iterator[str]:
        """Relative paths of every stored object in ``area``."""
        base = self.root / area
        for path in base.rglob("*.dcm"):
            yield path.relative_to(self.root).as_posix()


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists on this host (any owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
