"""Edit the ``[[peers]]`` of a config file in place: comment-preserving, validated, atomic.

The operator console and ``dicomnode peers add|remove`` change who may send (the Calling AE Titles
accepted on association, PS3.8 7.1.1.3) without a restart. An edit is applied to the TOML document
with tomlkit, so comments and layout survive; the whole edited document is validated by
:func:`dicomnode.config.parse_config` (the same code that reads the file at start-up) *before*
anything is written; only then is it written to a temporary file in the same folder, fsynced and
renamed over the original, and the folder fsynced, so a crash leaves either the old or the new file,
never half of one. Concurrent editors (console and CLI) are serialised with an advisory lock file.

Only ``peers`` is edited here. Everything else in the file is left byte-for-byte as it was.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT, Comment, Item, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from dicomnode.config import Config, Peer, parse_config
from dicomnode.errors import ConfigError

_LOCK = threading.Lock()


class PeerNotFound(LookupError):
    """No peer with this AE title in the config file."""

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title
        super().__init__(f"peers: no peer with AE title {ae_title!r}")


def add_peer(path: Path, peer: dict[str, Any]) -> Config:
    """Append a ``[[peers]]`` table; returns the new validated config (nothing is written if the
    result is invalid, e.g. a duplicate AE title: ``peers[2].ae_title: 'X' is already peers[0]``)."""

    def change(document: TOMLDocument, peers: AoT) -> None:
        table = _table(peer)
        if len(peers):
            # Comments after the last peer belong to what follows it (tomlkit keeps them inside
            # the last table): keep them after the new one.
            trailing = _pop_trailing(peers[-1])
            if trailing and not isinstance(trailing[0][1], Whitespace):
                trailing.insert(0, (None, Whitespace("\n")))
            _extend(table, trailing)
            _extend(peers[-1], [(None, Whitespace("\n"))])  # a blank line between tables
        peers.append(table)

    return _edit(path, change)


def replace_peer(path: Path, ae_title: str, peer: dict[str, Any]) -> Config:
    """Replace the keys of the peer called ``ae_title``, keeping its comments and position."""

    def change(document: TOMLDocument, peers: AoT) -> None:
        table = peers[_index(peers, ae_title)]
        wanted = _plain(peer)
        for key in [k for k in table if k not in wanted]:
            del table[key]
        for key, value in wanted.items():
            if key not in table or table[key].unwrap() != value:
                table[key] = value

    return _edit(path, change)


def remove_peer(path: Path, ae_title: str) -> Config:
    """Delete the peer called ``ae_title``; comments that followed it stay where they were."""

    def change(document: TOMLDocument, peers: AoT) -> None:
        index = _index(peers, ae_title)
        # Comments after a table (tomlkit keeps them inside it) usually introduce what follows:
        # hand them to whatever now precedes that.
        trailing = _pop_trailing(peers[index])
        while trailing and isinstance(trailing[0][1], Whitespace):
            trailing.pop(0)  # the table before already ends with its own blank line
        before = peers[index - 1] if index > 0 else _table_before(document, peers)
        if before is not None:
            _extend(before, trailing)
        if len(peers) == 1:
            del document["peers"]  # an empty [[peers]] array would be written as `peers = []`
        else:
            del peers[index]

    return _edit(path, change)


def _edit(path: Path, change: Callable[[TOMLDocument, AoT], None]) -> Config:
    target = Path(path).resolve()  # a symlinked config is edited where it lives
    with _locked(target):
        try:
            text = target.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
        try:
            document = tomlkit.parse(text)
        except tomlkit.exceptions.ParseError as exc:
            raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
        change(document, _peers(document))
        config = parse_config(document.unwrap(), str(path))  # raises ConfigError; nothing written
        _write_atomically(target, tomlkit.dumps(document))
        return config


def _peers(document: TOMLDocument) -> AoT:
    peers = document.get("peers")
    if isinstance(peers, list) and not isinstance(peers, AoT) and not peers:
        del document["peers"]  # `peers = []`: start [[peers]] tables instead
        peers = None
    if peers is None:
        peers = tomlkit.aot()
        if document.body:
            document.add(tomlkit.nl())
        document.append("peers", peers)
    if not isinstance(peers, AoT):
        raise ConfigError(["peers: must be written as [[peers]] tables to be edited"])
    return peers


def _table_before(document: TOMLDocument, peers: AoT) -> Table | None:
    """The table written just before the first ``[[peers]]`` (e.g. ``[node]``), if any."""
    previous: Item | None = None
    for _key, item in document.body:
        if item is peers:
            break
        previous = item
    if isinstance(previous, AoT) and len(previous):
        return previous[-1]
    if isinstance(previous, Table):
        last: Table = previous
        while True:  # a super-table such as [node] + [node.tls]: its last sub-table is written last
            tables = [item for _key, item in last.value.body if isinstance(item, Table)]
            if not tables:
                return last
            last = tables[-1]
    return None


def _index(peers: AoT, ae_title: str) -> int:
    wanted = ae_title.strip()
    for i, table in enumerate(peers):
        if str(table.get("ae_title", "")).strip() == wanted:
            return i
    raise PeerNotFound(wanted)


def _plain(peer: dict[str, Any]) -> dict[str, Any]:
    """The peer as TOML keys; empty ``hosts``/``description`` are left out (they are defaults)."""
    known = set(Peer.model_fields)
    unknown = sorted(set(peer) - known)
    if unknown:
        raise ConfigError([f"peers: unknown key {k!r}" for k in unknown])
    return {k: v for k, v in peer.items() if v not in (None, "", [])}


def _table(peer: dict[str, Any]) -> Table:
    table = tomlkit.table()
    for key, value in _plain(peer).items():
        table[key] = value
    return table


def _pop_trailing(table: Table) -> list[tuple[None, Item]]:
    body = table.value.body
    cut = len(body)
    while cut > 0 and body[cut - 1][0] is None and isinstance(body[cut - 1][1], Comment | Whitespace):
        cut -= 1
    trailing: list[tuple[None, Item]] = [(None, item) for _, item in body[cut:]]
    del body[cut:]
    return trailing


def _extend(table: Table, items: list[tuple[None, Item]]) -> None:
    table.value.body.extend(items)


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """One editor at a time: a thread lock here, an advisory lock file for other processes."""
    lock_path = target.with_name(f".{target.name}.lock")
    with _LOCK, open(lock_path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(target: Path, text: str) -> None:
    """temp file in the same folder -> write -> fsync -> rename -> fsync folder (keeps the mode)."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    mode = target.stat().st_mode & 0o7777 if target.exists() else 0o640
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
