"""Configuration: one immutable, validated object, read from TOML.

This is the only module that reads configuration files. Every stage receives the part of
:class:`Config` it needs, explicitly. Problems are reported one line each, addressed by their path
in the file, e.g. ``peers[1].ae_title: longer than 16 characters``.

Relative paths (``node.data_dir``, ``analysis.model_dirs``) are resolved against the current
working directory of the process, like the paths given on the command line.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicomnode.errors import ConfigError
from dicomnode.models.qc import QcSettings

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "dicomnode.toml"
ADMIN_TOKEN_ENV = "DICOMNODE_ADMIN_TOKEN"


def _ae_title(value: str) -> str:
    """PS3.5 6.2: AE is 16 characters at most, no backslash or control characters, not blank."""
    if len(value) > 16:
        raise ValueError("longer than 16 characters")
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("only printable ASCII without backslash is allowed")
    return value.strip()


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]
Host = Annotated[str, AfterValidator(_host)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Settings):
    """DICOM TLS (PS3.15 B.1 / BCP 195): TLS 1.2 or newer."""

    port: Port = Field(description="port of the TLS listener, beside the plain one")
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = Field(
        default=None, description="CA bundle used to verify client certificates"
    )
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_certificates_need_a_ca(self) -> TlsSettings:
        # Without a CA bundle the check would silently turn into CERT_NONE.
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to verify them against")
        return self


class NodeSettings(_Settings):
    ae_title: AETitle = "DICOMNODE"
    host: Host = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535, description="0 picks a free port (tests)")
    data_dir: Path = Path("./data")
    max_associations: int = Field(default=16, ge=1, le=1024)
    max_pdu: int = Field(
        default=4_194_304,
        ge=0,
        description="largest P-DATA PDU we accept; 0 means unlimited. Larger PDUs cost fewer "
        "round trips and decode calls per image.",
    )
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    min_free_mb: int = Field(
        default=512,
        ge=0,
        description="refuse new instances (0xA700) while the spool's file system has less free",
    )
    tls: TlsSettings | None = None


class Peer(_Settings):
    """A sender we accept: its calling AE title, and the hosts it may call from (empty: any)."""

    ae_title: AETitle
    hosts: list[Host] = Field(default_factory=list)
    description: str = ""


class Destination(_Settings):
    """A Storage SCP that receives our results (usually the PACS)."""

    ae_title: AETitle
    host: Host
    port: Port
    tls: bool = False
    ca_certificates: Path | None = None
    warning_is_success: list[int] = Field(
        # Every warning of PS3.7 C.4 and PS3.4 B.2.3: the object was stored. Remove one to treat it
        # as a failure (dead letter; a replay then sends the object again).
        default_factory=lambda: [0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007],
        description="C-STORE warning statuses counted as delivered",
    )


class Match(_Settings):
    """Rule conditions; all given conditions must hold. Text patterns are case-insensitive globs,
    or regular expressions when prefixed with ``re:``. A list means "any of"."""

    modality: list[str] = Field(default_factory=list)
    sop_class_uid: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    series_description: list[str] = Field(default_factory=list)
    study_description: list[str] = Field(default_factory=list)
    calling_ae: list[str] = Field(default_factory=list)
    image_type: list[str] = Field(default_factory=list)
    min_instances: int | None = Field(default=None, ge=0)
    max_instances: int | None = Field(default=None, ge=0)

    @field_validator(
        "modality",
        "sop_class_uid",
        "body_part",
        "series_description",
        "study_description",
        "calling_ae",
        "image_type",
        mode="before",
    )
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(
        "modality",
        "sop_class_uid",
        "body_part",
        "series_description",
        "study_description",
        "calling_ae",
        "image_type",
    )
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            try:
                compile_pattern(pattern)
            except re.error as exc:
                raise ValueError(f"[{i}] invalid regular expression {pattern!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _range(self) -> Match:
        if (
            self.min_instances is not None
            and self.max_instances is not None
            and self.min_instances > self.max_instances
        ):
            raise ValueError("min_instances is greater than max_instances")
        return self


LatePolicy = Literal["reprocess", "ignore"]


class Then(_Settings):
    """What to do with a matching series. ``analyzers``/``destinations`` left out mean the
    embedded default (every matching analyzer / every destination); an empty list means none."""

    analyzers: list[str] | None = None
    destinations: list[str] | None = None
    priority: Literal["stat", "routine"] = "routine"
    quiet_period_s: float | None = Field(default=None, gt=0)
    late_policy: LatePolicy | None = None
    late_window_min: float | None = Field(default=None, ge=0)


class Rule(_Settings):
    name: str = ""
    match: Match = Field(default_factory=Match)
    then: Then = Field(default_factory=Then)


class AssemblySettings(_Settings):
    quiet_period_s: float = Field(
        default=5.0,
        gt=0,
        description="a series is complete after this long without a new instance",
    )
    release_grace_s: float = Field(
        default=1.0,
        ge=0,
        description="after the sender releases the association that carried the series' last "
        "instance, wait this long instead of the full quiet period",
    )
    late_policy: LatePolicy = "reprocess"
    late_window_min: float = Field(
        default=60.0,
        ge=0,
        description="with late_policy='ignore', late instances within this many minutes of "
        "processing still reopen the series",
    )


class JobsSettings(_Settings):
    workers: int = Field(default=1, ge=0, le=64, description="analysis worker processes")
    lease_s: float = Field(default=900.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_base_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=900.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)


class AnalysisSettings(_Settings):
    shipped_models: bool = Field(default=True, description="register the models shipped with dicomnode")
    model_dirs: list[Path] = Field(
        default_factory=list,
        description="extra model folders (manifest.toml + a torch.export .pt2 or a TorchScript file)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    qc: QcSettings = Field(default_factory=QcSettings)


class AdminSettings(_Settings):
    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8080
    token: str | None = Field(
        default=None,
        description=f"bearer token for the console and API; the {ADMIN_TOKEN_ENV} environment "
        "variable overrides it",
    )


class AuditSettings(_Settings):
    enabled: bool = True
    include_patient_names: bool = False


class Config(_Settings):
    node: NodeSettings = Field(default_factory=NodeSettings)
    peers: list[Peer] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    rules: list[Rule] = Field(default_factory=list)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = reference_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    @property
    def admin_token(self) -> str | None:
        return os.environ.get(ADMIN_TOKEN_ENV) or self.admin.token


def reference_problems(config: Config, analyzer_names: list[str] | None = None) -> list[str]:
    """Cross-references that a field validator cannot see: names used in rules must exist.

    ``analyzer_names`` is checked only when given (the registry is built outside this module).
    """
    problems: list[str] = []
    known_dest = sorted(config.destinations)
    seen_peers: dict[str, int] = {}
    for i, peer in enumerate(config.peers):
        if peer.ae_title in seen_peers:
            problems.append(
                f"peers[{i}].ae_title: {peer.ae_title!r} is already peers[{seen_peers[peer.ae_title]}]"
            )
        seen_peers.setdefault(peer.ae_title, i)
    for i, rule in enumerate(config.rules):
        for j, dest in enumerate(rule.then.destinations or []):
            if dest not in config.destinations:
                problems.append(
                    f"rules[{i}].then.destinations[{j}]: unknown destination {dest!r} "
                    f"(known: {', '.join(known_dest) or 'none'})"
                )
        if analyzer_names is not None:
            for j, name in enumerate(rule.then.analyzers or []):
                if name not in analyzer_names:
                    problems.append(
                        f"rules[{i}].then.analyzers[{j}]: unknown analyzer {name!r} "
                        f"(known: {', '.join(sorted(analyzer_names)) or 'none'})"
                    )
    tls = config.node.tls
    if tls is not None and tls.port == config.node.port:
        problems.append("node.tls.port: must differ from node.port")
    return problems


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A rule text pattern: ``re:`` prefix for a regular expression, else a glob; both ignore case."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:], re.IGNORECASE)
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part).startswith("function-") or part in ("function-after", "function-before"):
            continue
        else:
            text += ("." if text else "") + str(part)
    return text


def _problems(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for item in error.errors():
        message = str(item["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        loc = _location(tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        for line in message.splitlines():
            # A nested validator may address a sub-item itself ("[0] invalid ...").
            if line.startswith("[") and loc:
                index, _, rest = line.partition(" ")
                lines.append(f"{loc}{index}: {rest}")
            elif loc and line.split(":", 1)[0].replace("[", ".").split(".")[0] not in Config.model_fields:
                lines.append(f"{loc}: {line}")
            else:
                lines.append(line)
    return lines


def parse_config(data: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc), source) from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a TOML config; ``None`` reads the shipped embedded default."""
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(file)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(file)) from None
    return parse_config(data, str(file))
