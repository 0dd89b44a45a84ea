"""Config: the embedded default ships in the package and is the documented example; lookup
without --config; `dicomnode init`; problems are reported one line each with their path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.config import (
    ADMIN_TOKEN_ENV,
    CONFIG_ENV,
    Destination,
    embedded_config_text,
    load_config,
    parse_config,
)
from dicomnode.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "dicomnode.toml"


def cli(*args: str, cwd: Path | None = None, **environment: str) -> subprocess.CompletedProcess[str]:
    """``dicomnode ARGS`` in a subprocess, without an inherited $DICOMNODE_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**env, **environment}, timeout=120)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return cli("check-config", str(path))


def test_shipped_example_is_the_valid_embedded_default() -> None:
    config = load_config(None)
    assert config.node.ae_title == "DICOMNODE" and config.node.port == 11112
    assert [p.ae_title for p in config.peers] == ["SCANNER1", "STORESCU"]
    # One source of truth: the packaged file; config/ holds a copy for readers of the repository.
    assert EXAMPLE.read_text(encoding="utf-8") == embedded_config_text(), \
        "config/dicomnode.toml must be a copy of dicomnode/dicomnode.toml (copy it again)"
    assert check_config(EXAMPLE).returncode == 0


def test_without_config_option_the_environment_then_the_folder_then_the_embedded_default(
    tmp_path: Path,
) -> None:
    embedded = cli("check-config", cwd=tmp_path)
    assert embedded.returncode == 0, embedded.stdout + embedded.stderr
    assert embedded.stdout.startswith("embedded default: ok (2 peers, 1 destinations")

    local = tmp_path / "dicomnode.toml"
    local.write_text('[[peers]]\nae_title = "LOCAL"\n')
    found = cli("check-config", cwd=tmp_path)
    assert found.stdout.startswith("dicomnode.toml: ok (1 peers, 0 destinations"), found.stdout
    assert "LOCAL" in cli("peers", "list", cwd=tmp_path).stdout

    other = tmp_path / "other.toml"
    other.write_text('[[peers]]\nae_title = "A"\n[[peers]]\nae_title = "B"\n')
    by_environment = cli("check-config", cwd=tmp_path, **{CONFIG_ENV: str(other)})
    assert by_environment.stdout.startswith(f"{other}: ok (2 peers"), by_environment.stdout
    explicit = cli("check-config", str(local), cwd=tmp_path, **{CONFIG_ENV: str(other)})
    assert explicit.stdout.startswith(f"{local}: ok (1 peers"), explicit.stdout

    # A file named by the environment must exist: no silent fall back to the defaults.
    missing = cli("check-config", cwd=tmp_path, **{CONFIG_ENV: str(tmp_path / "missing.toml")})
    assert missing.returncode == 2
    assert missing.stdout == f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory\n"


def test_init_writes_the_commented_starter_config_and_never_overwrites(tmp_path: Path) -> None:
    written = cli("init", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    local = tmp_path / "dicomnode.toml"
    assert local.read_text(encoding="utf-8") == embedded_config_text()
    assert "no --config needed" in written.stdout
    assert cli("check-config", cwd=tmp_path).stdout.startswith("dicomnode.toml: ok")

    local.write_text(local.read_text() + "# my edits\n")
    again = cli("init", cwd=tmp_path)
    assert again.returncode == 1 and "already exists; not overwritten" in again.stderr
    assert local.read_text().endswith("# my edits\n")

    elsewhere = cli("init", str(tmp_path / "site.toml"), cwd=tmp_path)
    assert elsewhere.returncode == 0 and f"{CONFIG_ENV}={tmp_path / 'site.toml'}" in elsewhere.stdout
    no_folder = cli("init", str(tmp_path / "nowhere" / "x.toml"))
    assert no_folder.returncode == 1 and "cannot create: No such file or directory" in no_folder.stderr


def test_peer_edits_without_a_config_file_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    before = embedded_config_text()
    refused = cli("peers", "add", "NEWSCU", cwd=tmp_path)
    assert refused.returncode == 2
    assert "embedded default" in refused.stderr and "dicomnode init" in refused.stderr
    assert list(tmp_path.iterdir()) == []
    assert embedded_config_text() == before
    assert EXAMPLE.read_text(encoding="utf-8") == before


@pytest.mark.parametrize("token", ["", " ", "\t \n"])
def test_blank_admin_token_is_a_config_error(token: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"admin": {"host": "0.0.0.0", "token": token}})
    assert info.value.problems == ["admin.token: must not be empty or blank; leave the key out to run "
                                   "without a token"]


def test_blank_environment_token_is_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "  ")
    assert parse_config({}).admin_token is None
    assert parse_config({"admin": {"token": "from-file"}}).admin_token == "from-file"
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-environment")
    assert parse_config({"admin": {"token": "from-file"}}).admin_token == "from-environment"


def test_results_uid_root_is_validated() -> None:
    assert parse_config({}).results.uid_root is None
    assert parse_config({"results": {"uid_root": "1.2.826.0.1.3680043.10.543"}}).results.uid_root == \
        "1.2.826.0.1.3680043.10.543."
    assert parse_config({"results": {"uid_root": "1.2.3."}}).results.uid_root == "1.2.3."
    bad = {
        "1.2.03": "'1.2.03' is not a UID root: digits separated by dots, no leading zeros (PS3.5 9.1)",
        "1.2.x": "'1.2.x' is not a UID root: digits separated by dots, no leading zeros (PS3.5 9.1)",
        "": "'' is not a UID root: digits separated by dots, no leading zeros (PS3.5 9.1)",
        "3.1": "'3.1' is not a UID root: the first component is 0, 1 or 2 (ISO/IEC 8824)",
        "2.25.123": "2.25 is for UUID-derived UIDs (PS3.5 B.2); use a root registered to your organisation",
        "1.2." + "3" * 40: "longer than 40 characters (44)",
    }
    for root, problem in bad.items():
        with pytest.raises(ConfigError) as info:
            parse_config({"results": {"uid_root": root}})
        assert info.value.problems == [f"results.uid_root: {problem}"], root


def test_destination_scu_settings_and_client_certificate() -> None:
    pacs = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    default = Destination.model_validate(pacs)
    assert (default.max_pdu, default.acse_timeout, default.dimse_timeout, default.network_timeout) == \
        (16382, 30.0, 120.0, 60.0)
    tuned = parse_config({"destinations": {"PACS": {**pacs, "max_pdu": 0, "dimse_timeout": 5}}})
    assert tuned.destinations["PACS"].max_pdu == 0 and tuned.destinations["PACS"].dimse_timeout == 5
    cases = [
        ({"tls": True, "certificate": "c.pem"},
         "destinations.PACS: certificate and private_key go together: give both or neither"),
        ({"certificate": "c.pem", "private_key": "k.pem"},
         "destinations.PACS: certificate is a TLS client certificate: it needs tls = true"),
        ({"dimse_timeout": 0}, "destinations.PACS.dimse_timeout: Input should be greater than 0"),
        ({"max_pdu": -1}, "destinations.PACS.max_pdu: Input should be greater than or equal to 0"),
    ]
    for extra, problem in cases:
        with pytest.raises(ConfigError) as info:
            parse_config({"destinations": {"PACS": {**pacs, **extra}}})
        assert info.value.problems == [problem], extra


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
