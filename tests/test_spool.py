"""Spool: validated paths, never overwrite, durable write, debris removal."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.errors import CannotUnderstand, OutOfResources
from dicomnode.spool import Spool, valid_uid


@pytest.mark.parametrize("uid", ["1.2.3", "0.1", "1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 38])
def test_valid_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.02", "../etc", "1..2", "1.2.", "a.b", "1.2/3", "1." + "1" * 70, None])
def test_invalid_uids(uid: object) -> None:
    assert not valid_uid(uid)


def test_path_is_built_from_validated_uids_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.instance_path("1.2", "1.2.3", "1.2.3.4") == "instances/1.2/1.2.3/1.2.3.4.dcm"
    with pytest.raises(CannotUnderstand, match="SeriesInstanceUID"):
        spool.instance_path("1.2", "../../x", "1.2.3.4")
    with pytest.raises(ValueError, match="escapes"):
        spool.path("../outside")


def test_first_copy_wins_and_no_temp_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    assert spool.write(rel, b"first", b"-copy") is True
    assert spool.write(rel, b"second") is False
    assert spool.read(rel) == b"first-copy"
    assert list(spool.incoming.iterdir()) == []
    assert list(spool.files()) == [rel]


def test_free_space_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=2**62)
    with pytest.raises(OutOfResources, match="below the floor"):
        spool.write(spool.instance_path("1.2", "1.2.3", "1.2.3.4"), b"x")
    assert list(spool.incoming.iterdir()) == []


def test_remove_debris(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.incoming / "a.part").write_bytes(b"x")
    (spool.incoming / "b.part").write_bytes(b"y")
    assert spool.remove_debris() == 2
    assert spool.remove_debris() == 0
