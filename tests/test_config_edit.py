"""Peer edits: comments kept, validated before writing, atomic, serialised."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dicomnode import config_edit
from dicomnode.config import embedded_config_text, load_config
from dicomnode.errors import ConfigError


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    path = tmp_path / "dicomnode.toml"
    path.write_text(embedded_config_text(), encoding="utf-8")  # what `dicomnode init` writes
    return path


def comments(text: str) -> list[str]:
    return [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]


def test_add_replace_remove_keep_every_comment_and_other_sections(shipped: Path) -> None:
    before = shipped.read_text()
    config = config_edit.add_peer(shipped, {"ae_title": "CT2", "hosts": ["10.1.1.1"],
                                            "description": "second CT"})
    assert [p.ae_title for p in config.peers] == ["SCANNER1", "STORESCU", "CT2"]
    text = shipped.read_text()
    assert comments(text) == comments(before)
    # The comment introducing [destinations.PACS] still sits right above it, after the new peer.
    assert text.index('ae_title = "CT2"') < text.index("# Where results") < text.index("[destinations.PACS]")

    config_edit.replace_peer(shipped, "STORESCU", {"ae_title": "STORESCU", "hosts": ["127.0.0.1", "::1"]})
    text = shipped.read_text()
    assert 'ae_title = "STORESCU"           # DCMTK\'s default calling AE title' in text
    assert load_config(shipped).peer("STORESCU").hosts == ["127.0.0.1", "::1"]  # type: ignore[union-attr]

    for name in ("SCANNER1", "CT2", "STORESCU"):
        config = config_edit.remove_peer(shipped, name)
    assert config.peers == []
    text = shipped.read_text()
    assert comments(text) == [c for c in comments(before) if "DCMTK's default" not in c]
    assert "[[peers]]" not in text and "peers = []" not in text
    assert load_config(shipped).destinations == load_config(None).destinations

    config = config_edit.add_peer(shipped, {"ae_title": "AGAIN"})
    assert [p.ae_title for p in config.peers] == ["AGAIN"] == [p.ae_title for p in load_config(shipped).peers]


@pytest.mark.parametrize(
    ("peer", "problem"),
    [({"ae_title": "X" * 17}, "peers[2].ae_title: longer than 16 characters"),
     ({"ae_title": "STORESCU"}, "peers[2].ae_title: 'STORESCU' is already peers[1]"),
     ({"ae_title": "OK", "hosts": ["not a host!"]}, "peers[2].hosts[0]: 'not a host!' is neither"),
     ({"ae_title": "OK", "colour": "red"}, "peers: unknown key 'colour'")],
)
def test_invalid_edit_is_refused_with_the_config_message_and_nothing_is_written(
    shipped: Path, peer: dict[str, object], problem: str
) -> None:
    before = shipped.read_bytes()
    with pytest.raises(ConfigError) as caught:
        config_edit.add_peer(shipped, peer)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems
    assert shipped.read_bytes() == before
    assert sorted(p.name for p in shipped.parent.iterdir() if not p.name.endswith(".lock")) == [shipped.name]


def test_unknown_peer_is_named(shipped: Path) -> None:
    with pytest.raises(config_edit.PeerNotFound, match="'NOPE'"):
        config_edit.remove_peer(shipped, "NOPE")


def test_symlinked_config_is_edited_where_it_lives_and_mode_is_kept(tmp_path: Path, shipped: Path) -> None:
    shipped.chmod(0o600)
    link = tmp_path / "link.toml"
    link.symlink_to(shipped)
    config_edit.add_peer(link, {"ae_title": "VIA-LINK"})
    assert link.is_symlink()
    assert "VIA-LINK" in shipped.read_text()
    assert shipped.stat().st_mode & 0o777 == 0o600


def test_concurrent_editors_lose_no_peer(shipped: Path) -> None:
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            config_edit.add_peer(shipped, {"ae_title": f"PEER{i}"})
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {f"PEER{i}" for i in range(8)} <= {p.ae_title for p in load_config(shipped).peers}
