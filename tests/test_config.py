"""Config: the shipped example is valid; problems are reported one line each with their path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from dicomnode.errors import ConfigError


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", str(path)],
                          capture_output=True, text=True)


def test_shipped_example_is_the_valid_embedded_default() -> None:
    config = load_config(None)
    assert config.node.ae_title == "DICOMNODE" and config.node.port == 11112
    assert [p.ae_title for p in config.peers] == ["SCANNER1", "STORESCU"]
    assert check_config(DEFAULT_CONFIG_PATH).returncode == 0


def test_check_config_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[node]\nae_title = "DICOMNODE"\nport = 70000\ncolour = "blue"\n'
        '[[peers]]\nae_title = "OK"\n[[peers]]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n'
        '[[peers]]\nae_title = "BAD\\\\AE"\nhosts = ["not a host"]\n'
    )
    result = check_config(bad)
    assert result.returncode == 2
    lines = sorted(result.stdout.splitlines())
    assert lines == sorted([
        f"{bad}: node.port: Input should be less than or equal to 65535",
        f"{bad}: node.colour: unknown key",
        f"{bad}: peers[1].ae_title: longer than 16 characters",
        f"{bad}: peers[2].ae_title: only printable ASCII without backslash is allowed",
        f"{bad}: peers[2].hosts[0]: 'not a host' is neither an IP address nor a host name",
    ])


def test_rule_references_unknown_destination() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"destinations": {"PACS": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
                      "rules": [{"name": "a"}, {"then": {"destinations": ["PACS", "PACS2"]}}]})
    assert info.value.problems == ["rules[1].then.destinations[1]: unknown destination 'PACS2' (known: PACS)"]


def test_bad_regex_and_range_in_rule_match() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"rules": [{"match": {"series_description": ["*head*", "re:(("],
                                           "min_instances": 5, "max_instances": 2}}]})
    problems = info.value.problems
    assert any(p.startswith("rules[0].match.series_description[1]: invalid regular expression") for p in problems)
    with pytest.raises(ConfigError) as info:
        parse_config({"rules": [{"match": {"min_instances": 5, "max_instances": 2}}]})
    assert info.value.problems == ["rules[0].match: min_instances is greater than max_instances"]


def test_duplicate_peer_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"peers": [{"ae_title": "A"}, {"ae_title": "A"}]})
    assert info.value.problems == ["peers[1].ae_title: 'A' is already peers[0]"]
    (tmp_path / "x.toml").write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "x.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_required_client_certificates_need_a_ca_bundle() -> None:
    tls = {"port": 2762, "certificate": "node.crt", "private_key": "node.key", "require_client_certificate": True}
    with pytest.raises(ConfigError) as info:
        parse_config({"node": {"tls": tls}})
    assert info.value.problems == ["node.tls: require_client_certificate needs ca_certificates to verify them against"]
    assert parse_config({"node": {"tls": {**tls, "ca_certificates": "ca.crt"}}}).node.tls is not None
